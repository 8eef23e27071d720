"""Async scheduling end to end on the CPU (fp32, tiny models): with one step always in flight,
and each step's decode inputs fed from the previous step's sampled ids, the engine gives the
same tokens as HF `generate` and as one-step-at-a-time scheduling: greedy with chunked prompts,
preemption and prefix caching; seeded sampling; logprobs and prompt logprobs; penalties (which
fall back to waiting for each step)."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from tests.test_llm_vs_hf import MAX_TOKENS, generate, random_prompts
from tests.tiny_models import VOCAB_SIZE, hf_greedy, load_hf


def test_async_greedy_matches_hf(tiny_model_dirs) -> None:
    path = tiny_model_dirs["llama"]
    prompts = random_prompts(1234)
    expected = hf_greedy(load_hf(path), prompts, MAX_TOKENS)
    common = dict(dtype="float32", max_model_len=512, async_scheduling=True)
    chunked = LLM(
        path, max_num_batched_tokens=16, max_num_seqs=8, kv_cache_memory="64MiB", **common
    )
    assert chunked.llm_engine.engine_core.async_scheduling
    assert generate(chunked, prompts) == expected
    assert generate(chunked, prompts) == expected, "second pass: all prefix-cache hits"
    tight = LLM(
        path, max_num_seqs=8, num_gpu_blocks_override=24, **{**common, "max_model_len": 384}
    )
    assert generate(tight, prompts) == expected
    assert tight.llm_engine.get_stats().num_preemptions > 0


def _outputs(llm: LLM, prompts: list[list[int]], **params) -> list[tuple]:
    """Per request: tokens, finish reason, and per position the (token id, rank) of its logprobs
    entries with the logprobs apart (a batch of another size may move their last bits)."""
    sp = [SamplingParams(max_tokens=m, **params) for m in MAX_TOKENS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)

    def entries(positions):
        rows = [
            sorted((t, lp.rank, lp.logprob) for t, lp in (d or {}).items()) for d in positions or []
        ]
        return [[e[:2] for e in r] for r in rows], [e[2] for r in rows for e in r]

    return [
        (o.outputs[0].token_ids, o.outputs[0].finish_reason, entries(o.outputs[0].logprobs),
         entries(o.prompt_logprobs))
        for o in outs
    ]  # fmt: skip


def _assert_same(got: list[tuple], want: list[tuple]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g[:2] == w[:2]
        for (g_ids, g_lps), (w_ids, w_lps) in zip(g[2:], w[2:]):
            assert g_ids == w_ids
            assert g_lps == pytest.approx(w_lps, abs=1e-4)


def test_async_equals_sync_seeded_logprobs_penalties_stops(tiny_model_dirs) -> None:
    path = tiny_model_dirs["llama"]
    prompts = random_prompts(77)
    common = dict(dtype="float32", max_model_len=512, kv_cache_memory="64MiB", max_num_seqs=4)
    sync = LLM(path, async_scheduling=False, **common)
    overlap = LLM(path, async_scheduling=True, **common)
    # An EOS-like stop on a frequent token ends requests while their next step is in flight.
    stop = [int(t) for t in range(3, VOCAB_SIZE, 3)]
    cases = [
        dict(temperature=0.9, top_p=0.9, seed=11, logprobs=2, stop_token_ids=stop),
        dict(temperature=0, logprobs=1, prompt_logprobs=2, ignore_eos=True),
        dict(temperature=0.7, seed=5, presence_penalty=0.5, repetition_penalty=1.2),
    ]
    for params in cases:
        _assert_same(_outputs(overlap, prompts, **params), _outputs(sync, prompts, **params))
    stopped = [reason for _, reason, _, _ in _outputs(overlap, prompts, **cases[0])]
    assert "stop" in stopped and "length" in stopped
    core = overlap.llm_engine.engine_core
    assert not core.has_unfinished_requests()
    assert core.scheduler.kv_cache_manager.pool.num_free_blocks == core.num_blocks
