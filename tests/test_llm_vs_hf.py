"""End to end on the CPU in fp32: greedy tokens of `LLM.generate` equal HF `generate`, token for
token, for every supported architecture, and stay equal with prefix caching off, with every
prompt chunked, and with a KV cache small enough to force preemption."""

from __future__ import annotations

import random

import pytest

from pagedllm import LLM, SamplingParams
from tests.tiny_models import ARCHS, VOCAB_SIZE, hf_greedy, load_hf

PROMPT_LENS = [1, 2, 17, 64, 100, 150, 299, 300]
MAX_TOKENS = [64, 5, 33, 64, 1, 48, 64, 20]


def random_prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in PROMPT_LENS]


def generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def hf_reference(tiny_model_dirs):
    """HF's greedy outputs per architecture, computed once."""
    prompts = random_prompts(1234)
    return prompts, {
        arch: hf_greedy(load_hf(tiny_model_dirs[arch]), prompts, MAX_TOKENS) for arch in ARCHS
    }


@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_matches_hf(arch, tiny_model_dirs, hf_reference) -> None:
    prompts, expected = hf_reference
    llm = LLM(tiny_model_dirs[arch], dtype="float32", kv_cache_memory="64MiB", max_model_len=512)
    assert generate(llm, prompts) == expected[arch]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_caching_chunking_preemption_match_hf(arch, tiny_model_dirs, hf_reference) -> None:
    prompts, expected = hf_reference
    path = tiny_model_dirs[arch]
    common = dict(dtype="float32", max_model_len=512)

    no_cache = LLM(path, enable_prefix_caching=False, kv_cache_memory="64MiB", **common)
    assert generate(no_cache, prompts) == expected[arch]

    # Every prompt longer than 16 tokens is split across steps.
    chunked = LLM(
        path, max_num_batched_tokens=16, max_num_seqs=8, kv_cache_memory="64MiB", **common
    )
    assert generate(chunked, prompts) == expected[arch]
    assert generate(chunked, prompts) == expected[arch], "second pass: all prefix-cache hits"
    assert chunked.llm_engine.prefix_cache_stats.hits > 0

    # 24 blocks of 16 tokens (the least one 384-token sequence needs) cannot hold the batch.
    tight = LLM(path, dtype="float32", max_model_len=384, num_gpu_blocks_override=24)
    assert generate(tight, prompts) == expected[arch]
    assert tight.llm_engine.get_stats().num_preemptions > 0


def test_shared_prefix_reports_hits(tiny_model_dirs) -> None:
    llm = LLM(tiny_model_dirs["llama"], dtype="float32", kv_cache_memory="64MiB", max_model_len=512)
    rng = random.Random(7)
    prefix = [rng.randrange(3, VOCAB_SIZE) for _ in range(100)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate({"prompt_token_ids": prefix + [5, 6, 7]}, params, use_tqdm=False)
    stats = llm.llm_engine.prefix_cache_stats
    before = stats.hits
    outs = llm.generate(
        [{"prompt_token_ids": prefix + [10 + i] * 3} for i in range(4)], params, use_tqdm=False
    )
    assert stats.hits - before == 4 * 96, "6 full blocks of 16 tokens hit for each request"
    assert all(o.num_cached_tokens == 96 for o in outs)
