"""Speculative decoding (n-gram): config, proposer, the scheduler's token model, the rejection
sampler, and the engine end to end (tiny random models, fp32 on the CPU).

- the scheduler against a fake model that reads its inputs back from a simulated KV cache:
  a rolled-back draft, a block published before its tokens were verified, or a stale slot
  after preemption changes its tokens; every block returns to the pool;
- the rejection sampler keeps the target distribution (chi-square over many draws);
- the engine: greedy output identical with and without speculation (k = 1, 3, 5), with chunked
  prefill, prefix-cache hits and preemption; seeded sampling reproducible; logprobs the target's.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from pagedllm.engine.outputs import ModelRunnerOutput, SchedulerOutput
from pagedllm.engine.request import Request
from pagedllm.engine.scheduler import Scheduler
from pagedllm.engine.spec_decode import NgramProposer
from pagedllm.engine_args import EngineArgs
from pagedllm.worker.sample.metadata import SamplingMetadata
from pagedllm.worker.sample.rejection import DraftLayout, rejection_sample, target_probs

# ----- config -----


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "prompt_lookup_min": 0}, "prompt_lookup_min"),
        ({"method": "ngram", "prompt_lookup_max": "4"}, "prompt_lookup_max"),
        ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2}, "prompt_lookup_min"),
        ({"method": "eagle"}, "needs model"),
        ({"method": "draft_model"}, "needs model"),
        ({"method": "ngram", "model": "x"}, "not used by method 'ngram'"),
        ({"method": "medusa2"}, "method"),
        ({"num_speculative_tokens": 2}, "method"),
        ({"method": "ngram", "num_lookahead": 2}, "num_lookahead"),
        ("{not json", "not JSON"),
    ],
)
def test_bad_configs_refused(value, message) -> None:
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_dict(value)


def test_cli_flag() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    ns = parser.parse_args(
        ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 5}']
    )
    config = SpeculativeConfig.from_dict(EngineArgs.from_cli_args(ns).speculative_config)
    assert config == SpeculativeConfig(method="ngram", num_speculative_tokens=5)


# ----- proposer -----


def test_ngram_proposer() -> None:
    p = NgramProposer(SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=3))
    assert p.propose([1, 2, 3, 4, 5, 1, 2, 3]) == [4, 5, 1]  # the longest suffix, 3 tokens
    assert p.propose([9, 2, 3, 7, 1, 2, 3, 4, 0, 2, 3]) == [4, 0, 2]  # the latest occurrence
    assert p.propose([1, 2, 3]) == []
    assert p.propose([7, 7]) == [7]
    assert p.propose([1, 2, 3, 4, 5, 1, 2, 3], max_tokens=1) == [4]
    # 256 = bytes 00 01 00 00: an unaligned byte match is no token match
    assert p.propose([256, 1, 0, 0, 0, 1]) == [0, 0, 0]
    p2 = NgramProposer(SpeculativeConfig(prompt_lookup_min=2, prompt_lookup_max=2))
    assert p2.propose([5, 1, 9, 1]) == []  # only a 1-gram repeats


# ----- scheduler: the token model against a fake model reading a simulated KV cache -----

VOCAB = 6


class KVFakeModel:
    """Writes each scheduled token into its KV slot, and computes each next token from the KV
    cache's content at the positions before it (so a stale slot changes the output). Verifies
    drafts exactly as greedy does."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.kv: dict[int, int] = {}

    @staticmethod
    def next_token(tokens: list[int]) -> int:
        return (2 * tokens[-1] + 3 * tokens[-2] + tokens[0] + 1) % VOCAB

    def run(self, out: SchedulerOutput) -> ModelRunnerOutput:
        sched, bs = self.scheduler, self.scheduler.block_size
        computed = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        computed.update((r.req_id, r.num_computed_tokens) for r in out.scheduled_cached_reqs)
        req_ids, sampled = [], []
        for req_id, n in out.num_scheduled_tokens.items():
            request = sched.requests[req_id]
            drafts = out.scheduled_spec_decode_tokens.get(req_id, [])
            seq = request.all_token_ids + drafts
            blocks = [b.block_id for b in sched.kv_cache_manager.req_to_blocks[req_id]]

            def slot(pos: int, blocks: list[int] = blocks) -> int:
                return blocks[pos // bs] * bs + pos % bs

            start = computed[req_id]
            assert start + n <= len(seq)
            for pos in range(start, start + n):
                self.kv[slot(pos)] = seq[pos]
            req_ids.append(req_id)
            if start + n < len(seq):
                sampled.append([])
                continue
            emitted = []
            for j in range(len(drafts) + 1):
                last = request.num_tokens - 1 + j
                tok = self.next_token([self.kv[slot(p)] for p in range(last + 1)])
                emitted.append(tok)
                if j == len(drafts) or drafts[j] != tok:
                    break
            sampled.append(emitted)
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled)


def _expected(prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    for _ in range(n):
        toks.append(KVFakeModel.next_token(toks))
    return toks[len(prompt) :]


@pytest.mark.parametrize("seed", range(6))
def test_scheduler_random_sequences(seed: int) -> None:
    rnd = random.Random(seed)
    block_size = rnd.choice([2, 4, 8])
    # NOTE: room for the longest request (96 tokens), or it could never run
    num_blocks = 96 // block_size + 1 + rnd.randrange(0, 12)
    budget = rnd.randrange(8, 40)
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=rnd.randrange(1, 6), max_num_batched_tokens=budget,
                        max_model_len=96),
        CacheConfig(block_size=block_size, enable_prefix_caching=rnd.random() < 0.7),
        num_blocks,
        speculative_config=SpeculativeConfig(
            num_speculative_tokens=rnd.randrange(1, 6), prompt_lookup_max=rnd.randrange(1, 5)
        ),
    )  # fmt: skip
    model = KVFakeModel(sched)
    want: dict[str, list[int]] = {}
    done: dict[str, list[int]] = {}
    aborted: set[str] = set()
    prefix = [rnd.randrange(VOCAB) for _ in range(12)]
    for i in range(24):
        if rnd.random() < 0.6:
            prompt = (prefix if rnd.random() < 0.5 else [])[: rnd.randrange(13)]
            prompt = prompt + [rnd.randrange(VOCAB) for _ in range(rnd.randrange(2, 20))]
            n = rnd.randrange(1, 40)
            req = Request(f"r{i}", prompt, SamplingParams(max_tokens=n, ignore_eos=True),
                          max_model_len=96)  # fmt: skip
            want[req.request_id] = _expected(prompt, n)
            sched.add_request(req)
        if rnd.random() < 0.1 and sched.requests:
            victim = rnd.choice(list(sched.requests))
            sched.abort_requests([victim])
            aborted.add(victim)
        for _ in range(rnd.randrange(1, 6)):
            _step(sched, model, done)
    while sched.has_unfinished_requests():
        _step(sched, model, done)
    for req_id, tokens in want.items():
        if req_id not in aborted:
            assert done[req_id] == tokens, req_id
    pool = sched.kv_cache_manager.pool
    assert pool.num_free_blocks == num_blocks, "every block returns to the pool"
    assert not sched.kv_cache_manager.req_to_blocks
    stats = sched.make_stats()
    assert stats.num_accepted_tokens <= stats.num_draft_tokens
    assert stats.num_draft_tokens >= stats.num_drafts


def _step(sched: Scheduler, model: KVFakeModel, done: dict[str, list[int]]) -> None:
    if not sched.has_unfinished_requests():
        return
    out = sched.schedule()
    for req_id, n in out.num_scheduled_tokens.items():
        drafts = out.scheduled_spec_decode_tokens.get(req_id, [])
        request = sched.requests[req_id]
        assert request.num_computed_tokens <= request.num_tokens + len(drafts)
        assert n >= 1 + len(drafts) or not drafts
    for req_id in out.num_scheduled_tokens:
        done[req_id] = sched.requests[req_id].output_token_ids  # the live list
    sched.update_from_output(out, model.run(out))


def test_scheduler_drafts_accepted() -> None:
    """The fake model loops with period <= 36: drafts are proposed and mostly accepted."""
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256),
        CacheConfig(block_size=4),
        64,
        speculative_config=SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=3),
    )
    model, done = KVFakeModel(sched), {}
    sched.add_request(Request("a", [1, 4, 2], SamplingParams(max_tokens=200, ignore_eos=True)))
    while sched.has_unfinished_requests():
        _step(sched, model, done)
    assert done["a"] == _expected([1, 4, 2], 200)
    stats = sched.make_stats()
    assert stats.spec_acceptance_rate > 0.5
    assert stats.num_steps < 120  # fewer steps than tokens


# ----- the rejection sampler -----


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# NOTE: chi-square critical values at p = 0.001 by degrees of freedom (a fixed seed: deterministic).
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_rejection_sampler_keeps_the_target_distribution(temperature: float) -> None:
    vocab, k, n = 5, 2, 40000
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(k + 1, vocab, generator=gen) * 1.5
    drafts = np.array([int(base[0].argsort()[2]), 3])  # a middling then some draft
    layout = DraftLayout.from_counts(np.full(n, k), np.tile(drafts, n))
    logits = base.repeat(n, 1)
    md = SamplingMetadata(
        all_greedy=False, all_random=True, temperature=torch.full((n * (k + 1),), temperature)
    )
    probs = target_probs(logits.clone(), md)
    p = (base / temperature).softmax(-1).numpy().astype(np.float64)
    noise = torch.empty_like(probs).exponential_(generator=gen)
    uniforms = torch.rand(n * k, generator=gen)
    _, tokens = rejection_sample(probs, layout, noise, uniforms, None)
    first = np.bincount([t[0] for t in tokens], minlength=vocab)
    assert _chi_square(first, p[0]) < CHI2_999[vocab - 1]
    # the second token, given the first was the (accepted) draft, is distributed as p[1]
    second = np.bincount([t[1] for t in tokens if len(t) > 1], minlength=vocab)
    assert second.sum() > 500
    assert _chi_square(second, p[1]) < CHI2_999[vocab - 1]
    # and the acceptance rate of the first draft is its target probability
    rate = np.mean([len(t) > 1 for t in tokens])
    assert abs(rate - p[0][drafts[0]]) < 4 * np.sqrt(p[0][drafts[0]] / n) + 1e-3


def test_rejection_sampler_with_top_k() -> None:
    vocab, n = 5, 20000
    base = torch.tensor([[2.0, 1.0, 0.5, 0.2, -1.0], [0.0, 1.0, 0.0, 1.0, 0.0]])
    layout = DraftLayout.from_counts(np.full(n, 1), np.full(n, 4))  # a draft top-k drops
    md = SamplingMetadata(
        all_greedy=False, all_random=True, temperature=torch.ones(2 * n),
        top_k=torch.full((2 * n,), 3), max_top_k=3, top_k_in_all_rows=True,
    )  # fmt: skip
    probs = target_probs(base.repeat(n, 1), md)
    gen = torch.Generator().manual_seed(1)
    noise = torch.empty_like(probs).exponential_(generator=gen)
    _, tokens = rejection_sample(probs, layout, noise, torch.rand(n, generator=gen), None)
    assert all(len(t) == 1 for t in tokens), "a draft of probability 0 is never accepted"
    p = np.zeros(vocab)
    p[:3] = base[0, :3].softmax(-1).numpy()
    assert _chi_square(np.bincount([t[0] for t in tokens], minlength=vocab), p) < CHI2_999[2]


def test_rejection_sampler_greedy() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]] * 3)
    # drafts: all accepted (1, 0: bonus 2); first rejected (2: emits 1); second rejected
    layout = DraftLayout.from_counts(np.array([2, 2, 2]), np.array([1, 0, 2, 0, 1, 2]))
    md = SamplingMetadata(all_greedy=True, all_random=False)
    probs = target_probs(logits, md)
    noise = torch.ones_like(probs)
    greedy = torch.ones(9, dtype=torch.bool)
    _, tokens = rejection_sample(probs, layout, noise, torch.rand(6), greedy)
    assert tokens == [[1, 0, 2], [1], [1, 0]]


# ----- the engine end to end -----


def _prompts(seed: int) -> list[list[int]]:
    """Prompts that repeat themselves (the n-gram proposer finds drafts), of several lengths."""
    rnd = random.Random(seed)
    prompts = []
    for _ in range(6):
        pattern = [rnd.randrange(3, 500) for _ in range(rnd.randrange(2, 8))]
        prompts.append((pattern * 12)[: rnd.randrange(6, 70)])
    return prompts


MAX_TOKENS = [48, 3, 30, 48, 1, 40]


def _generate(llm: LLM, prompts: list[list[int]], **params) -> list[list[int]]:
    sp = [
        SamplingParams(max_tokens=m, ignore_eos=True, **params) for m in MAX_TOKENS[: len(prompts)]
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


COMMON = dict(dtype="float32", max_model_len=256, seed=0)


@pytest.fixture(scope="module")
def greedy_reference(tiny_model_dirs) -> list[list[int]]:
    llm = LLM(tiny_model_dirs["llama"], kv_cache_memory="64MiB", **COMMON)
    return _generate(llm, _prompts(0), temperature=0)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_identical_with_speculation(k, tiny_model_dirs, greedy_reference) -> None:
    spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 3}
    prompts = _prompts(0)
    # chunked prefill, then all prefix-cache hits
    llm = LLM(tiny_model_dirs["llama"], speculative_config=spec, kv_cache_memory="64MiB",
              max_num_batched_tokens=16, max_num_seqs=4, **COMMON)  # fmt: skip
    assert not llm.llm_engine.engine_core.async_scheduling
    assert _generate(llm, prompts, temperature=0) == greedy_reference
    assert _generate(llm, prompts, temperature=0) == greedy_reference, "prefix-cache hits"
    stats = llm.llm_engine.get_stats()
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0
    # a KV cache small enough to preempt
    tight = LLM(tiny_model_dirs["llama"], speculative_config=spec, num_gpu_blocks_override=9,
                max_num_seqs=6, block_size=16, **{**COMMON, "max_model_len": 128})  # fmt: skip
    assert _generate(tight, prompts, temperature=0) == greedy_reference
    assert tight.llm_engine.get_stats().num_preemptions > 0


def test_seeded_sampling_reproducible_and_logprobs(tiny_model_dirs) -> None:
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    prompts = _prompts(1)
    llm = LLM(tiny_model_dirs["llama"], speculative_config=spec, kv_cache_memory="64MiB",
              **COMMON)  # fmt: skip
    first = _generate(llm, prompts, temperature=0.8, seed=7)
    assert _generate(llm, prompts, temperature=0.8, seed=7) == first
    alone = _generate(llm, prompts[:1], temperature=0.8, seed=7)
    assert alone[0] == first[0], "a seeded request's output does not depend on its batch"
    # greedy logprobs: the target's, as without speculation
    plain = LLM(tiny_model_dirs["llama"], kv_cache_memory="64MiB", **COMMON)
    sp = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0, logprobs=2)
    got = llm.generate([{"prompt_token_ids": prompts[0]}], sp, use_tqdm=False)[0].outputs[0]
    want = plain.generate([{"prompt_token_ids": prompts[0]}], sp, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == want.token_ids
    for g, w in zip(got.logprobs, want.logprobs, strict=True):
        assert sorted(g) == sorted(w)
        for t in g:
            assert g[t].rank == w[t].rank
            assert g[t].logprob == pytest.approx(w[t].logprob, abs=1e-4)
