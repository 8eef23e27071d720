"""Logprobs and prompt logprobs of the engine against HF's log_softmax of the same tokens
(within 1e-4), with chunked prefill and with a prefix-cache hit available."""

from __future__ import annotations

import random

import pytest
import torch

from pagedllm import SamplingParams
from tests.tiny_models import VOCAB_SIZE, load_hf

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_model(llama_dir):
    return load_hf(llama_dir)


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row i is the distribution of the token after ids[: i + 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return logits.float().log_softmax(-1)


def check_position(entry, chosen: int, ref: torch.Tensor, n: int) -> None:
    """One position's dict: the chosen token (logprob, rank) and the top-n, against `ref`."""
    assert chosen in entry
    assert abs(entry[chosen].logprob - float(ref[chosen])) < TOL
    assert entry[chosen].rank == int((ref >= ref[chosen]).sum())
    top = ref.topk(n)
    for rank, (lp, tok) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
        assert tok in entry, (tok, entry)
        assert abs(entry[tok].logprob - lp) < TOL
        if tok != chosen:
            assert entry[tok].rank == rank
    assert set(entry) <= set(top.indices.tolist()) | {chosen}


def test_sample_logprobs_match_hf(llm, hf_model) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in (5, 23, 40)]
    params = [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=5),
        SamplingParams(
            temperature=1.0, top_k=10, seed=1, max_tokens=6, ignore_eos=True, logprobs=3
        ),
        SamplingParams(
            temperature=0.8, repetition_penalty=1.5, max_tokens=6, ignore_eos=True, logprobs=0
        ),
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, sp, out in zip(prompts, params, outs):
        completion = out.outputs[0]
        ref = hf_logprobs(hf_model, prompt + completion.token_ids)
        assert completion.logprobs is not None and len(completion.logprobs) == 6
        total = 0.0
        for i, (tok, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
            row = ref[len(prompt) - 1 + i]
            check_position(entry, tok, row, sp.logprobs)
            assert entry[tok].decoded_token == llm.get_tokenizer().decode([tok])
            total += float(row[tok])
        assert completion.cumulative_logprob == pytest.approx(total, abs=1e-3)


def test_prompt_logprobs_match_hf_with_chunks_and_cache(small_llm, hf_model) -> None:
    llm = small_llm
    rng = random.Random(1)
    prompt = [rng.randrange(3, VOCAB_SIZE) for _ in range(53)]
    warm = SamplingParams(temperature=0, max_tokens=1)
    llm.generate({"prompt_token_ids": prompt}, warm, use_tqdm=False)  # caches 3 full blocks
    hits_before = llm.llm_engine.prefix_cache_stats.hits
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=4)
    other = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    out, _ = llm.generate(
        [{"prompt_token_ids": prompt}, {"prompt_token_ids": prompt[:30]}],
        [params, other],
        use_tqdm=False,
    )
    assert llm.llm_engine.prefix_cache_stats.hits - hits_before == 16, "only the other one hits"
    ref = hf_logprobs(hf_model, prompt)
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt)
    assert out.prompt_logprobs[0] is None
    for i in range(1, len(prompt)):
        check_position(out.prompt_logprobs[i], prompt[i], ref[i - 1], 4)
