"""Sampling through the whole engine: seeded requests reproduce whatever shares their batch,
n > 1 computes the prompt once, stop strings spanning tokens end the request in the core, and
the three output kinds report the same text."""

from __future__ import annotations

import random

import pytest

from pagedllm import SamplingParams
from pagedllm.sampling_params import RequestOutputKind
from tests.tiny_models import VOCAB_SIZE


def ids_prompt(rng: random.Random, n: int) -> dict:
    return {"prompt_token_ids": [rng.randrange(3, VOCAB_SIZE) for _ in range(n)]}


def run(engine, requests: dict[str, tuple[object, SamplingParams]]) -> dict[str, list]:
    """Runs requests to the end; returns every RequestOutput of each, in order."""
    for req_id, (prompt, params) in requests.items():
        engine.add_request(req_id, prompt, params)
    outputs: dict[str, list] = {r: [] for r in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return outputs


def test_seeded_request_is_reproducible_in_any_batch(llm) -> None:
    rng = random.Random(5)
    prompt = ids_prompt(rng, 20)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=12, ignore_eos=True)
    alone = llm.generate(prompt, seeded, use_tqdm=False)[0].outputs[0].token_ids
    for trial in range(2):
        others = [
            SamplingParams(
                temperature=rng.choice([0.0, 0.7, 1.3]),
                top_k=rng.choice([0, 5]),
                seed=rng.choice([None, 7, 42]),
                max_tokens=rng.randint(1, 15),
                ignore_eos=True,
            )
            for _ in range(5)
        ]
        prompts = [ids_prompt(rng, rng.randint(1, 60)) for _ in others]
        at = rng.randrange(len(others) + 1)
        prompts.insert(at, prompt)
        others.insert(at, seeded)
        outs = llm.generate(prompts, others, use_tqdm=False)
        assert outs[at].outputs[0].token_ids == alone, trial
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    assert llm.generate(prompt, unseeded, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_n_samples_share_the_prompt(llm) -> None:
    engine = llm.llm_engine
    rng = random.Random(9)
    prompt = ids_prompt(rng, 40)  # 2 full blocks of 16, and 8 tokens no block can share
    stats, cache = engine.get_stats(), engine.prefix_cache_stats
    computed, hits = stats.num_prompt_tokens, cache.hits
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    (out,) = llm.generate(prompt, params, use_tqdm=False)
    assert engine.get_stats().num_prompt_tokens - computed == 40 + 3 * 8
    assert cache.hits - hits == 3 * 32
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    samples = [tuple(c.token_ids) for c in out.outputs]
    assert all(len(s) == 8 for s in samples) and len(set(samples)) == 4, "seeded children differ"
    again = llm.generate(prompt, params, use_tqdm=False)[0]
    assert [tuple(c.token_ids) for c in again.outputs] == samples, "and each is reproducible"


def test_n_samples_stream_as_one_request(llm) -> None:
    """DELTA outputs of n = 3 samples that end at different steps: one stream, finished once
    every sample is, each sample's deltas adding up to its whole."""
    engine = llm.llm_engine
    base = dict(n=3, temperature=1.0, seed=4, max_tokens=10, stop_token_ids=list(range(3, 120)))
    final = run(engine, {"f": ([5, 6, 7], SamplingParams(**base))})["f"][-1]
    lengths = [len(c.token_ids) for c in final.outputs]
    assert len(set(lengths)) > 1, "the samples end at different steps"
    delta = SamplingParams(**base, output_kind=RequestOutputKind.DELTA)
    outs = run(engine, {"p": ([5, 6, 7], delta)})["p"]
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for out in outs:
        for c in out.outputs:
            tokens[c.index] += c.token_ids
    assert [tokens[i] for i in range(3)] == [c.token_ids for c in final.outputs]


def greedy_with_boundary(llm, prompt) -> tuple[list[int], str, int]:
    """The greedy output, and a stop string made of the last character of token i and the
    first of token i + 1 that first occurs there; returns (ids, stop, i)."""
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ids = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    for i in range(2, len(ids) - 1):
        left, right = tok.decode(ids[: i + 1]), tok.decode(ids[: i + 2])
        if not left or len(right) <= len(left) or not right.startswith(left):
            continue
        stop = left[-1] + right[len(left)]
        if "\ufffd" not in stop and right.find(stop) == len(left) - 1:
            return ids, stop, i
    raise AssertionError("no usable token boundary")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens_ends_the_request(llm, include) -> None:
    tok = llm.get_tokenizer()
    prompt = "The quick brown fox"
    ids, stop, i = greedy_with_boundary(llm, prompt)
    text_before = tok.decode(ids[: i + 1])[:-1]
    engine = llm.llm_engine
    generated = engine.get_stats().num_generation_tokens
    params = SamplingParams(
        temperature=0,
        max_tokens=24,
        ignore_eos=True,
        stop=["never-there", stop],
        include_stop_str_in_output=include,
    )
    completion = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert completion.text == text_before + (stop if include else "")
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop)
    assert completion.token_ids == ids[: i + 2]
    assert engine.get_stats().num_generation_tokens - generated == i + 2, "no token after it"
    assert not engine.has_unfinished_requests()


def test_output_kinds_agree_and_delta_holds_back_stop_prefixes(llm) -> None:
    prompt = "The quick brown fox"
    _, stop, i = greedy_with_boundary(llm, prompt)
    base = dict(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], logprobs=1)
    kinds = {k: SamplingParams(**base, output_kind=k) for k in RequestOutputKind}
    outs = run(llm.llm_engine, {k.name: (prompt, p) for k, p in kinds.items()})
    final = outs["FINAL_ONLY"]
    assert len(final) == 1 and final[0].finished
    expected = final[0].outputs[0]
    assert expected.finish_reason == "stop" and stop not in expected.text
    cumulative = outs["CUMULATIVE"]
    assert len(cumulative) == i + 2
    assert cumulative[-1].outputs[0] == expected
    text, token_ids, logprobs = "", [], []
    for out in outs["DELTA"]:
        c = out.outputs[0]
        text += c.text
        token_ids += c.token_ids
        logprobs += c.logprobs
        assert expected.text.startswith(text), "a delta never takes back text"
        assert stop not in text
    assert (text, token_ids, logprobs) == (expected.text, expected.token_ids, expected.logprobs)
    held = [len(o.outputs[0].text) for o in cumulative]
    assert held == sorted(held)
    assert cumulative[-2].outputs[0].text == expected.text, "the stop's first char was held"


def test_min_tokens_bad_words_and_allowed_ids(llm) -> None:
    tok = llm.get_tokenizer()
    eos = tok.eos_token_id
    # Bias EOS up so it would come first; min_tokens keeps it out of the first 5 tokens.
    params = SamplingParams(temperature=0, max_tokens=10, min_tokens=5, logit_bias={eos: 100.0})
    (out,) = llm.generate([5, 6, 7], params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 6 and out.outputs[0].token_ids[-1] == eos
    # A bad word of two tokens bans its second token right after its first.
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ids = llm.generate([5, 6, 7], greedy, use_tqdm=False)[0].outputs[0].token_ids
    i = next(
        i
        for i in range(len(ids) - 1)
        if tok.encode(tok.decode(ids[i : i + 2]), add_special_tokens=False) == ids[i : i + 2]
    )
    word = tok.decode(ids[i : i + 2])
    banned = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, bad_words=[word])
    ids2 = llm.generate([5, 6, 7], banned, use_tqdm=False)[0].outputs[0].token_ids
    assert ids2[: i + 1] == ids[: i + 1] and ids2[i + 1] != ids[i + 1]
    allowed = SamplingParams(
        temperature=1.0, max_tokens=20, ignore_eos=True, allowed_token_ids=[9, 99]
    )
    ids3 = llm.generate([5, 6, 7], allowed, use_tqdm=False)[0].outputs[0].token_ids
    assert set(ids3) <= {9, 99}


def test_preemption_keeps_seeded_samples_and_prompt_logprobs(llm, small_llm) -> None:
    """Under a KV cache too small for the batch, requests are preempted and recomputed: seeded
    samples and prompt logprobs come out as in a roomy engine."""
    rng = random.Random(11)
    prompts = [ids_prompt(rng, 40) for _ in range(3)]
    params = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=24, ignore_eos=True, prompt_logprobs=2)
        for i in range(3)
    ]
    expected = llm.generate(prompts, params, use_tqdm=False)
    preemptions = small_llm.llm_engine.get_stats().num_preemptions
    got = small_llm.generate(prompts, params, use_tqdm=False)
    assert small_llm.llm_engine.get_stats().num_preemptions > preemptions
    for e, g in zip(expected, got):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        assert len(g.prompt_logprobs) == len(e.prompt_logprobs) == 40
        for a, b in zip(e.prompt_logprobs[1:], g.prompt_logprobs[1:]):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)
