"""Scheduler scenarios: chunked prefill, mixed steps, preemption by recompute, max_num_seqs, abort."""

from __future__ import annotations

from pagedllm.config import CacheConfig, EngineConfig, SchedulerConfig
from pagedllm.engine.core import EngineCore
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.sampling_params import SamplingParams
from tests.engine.fake_executor import FakeExecutor
from tests.engine.test_scheduler_invariants import expected_tokens


def make_core(
    num_blocks=64, block_size=4, max_num_seqs=8, budget=32, max_model_len=128, caching=True
):
    config = EngineConfig(
        model_config=None,  # type: ignore[arg-type]
        cache_config=CacheConfig(block_size=block_size, enable_prefix_caching=caching),
        scheduler_config=SchedulerConfig(max_num_seqs, budget, max_model_len),
        parallel_config=None,  # type: ignore[arg-type]
        device_config=None,  # type: ignore[arg-type]
    )
    executor = FakeExecutor(num_blocks)
    return EngineCore(config, executor), executor


def req(req_id, prompt, max_tokens, max_model_len=128, **kw):
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)
    return Request(req_id, prompt, params, max_model_len=max_model_len, **{})


def run_all(core):
    for _ in range(10_000):
        if not core.has_unfinished_requests():
            return
        core.step()
    raise AssertionError("did not finish")


def test_long_prompt_is_chunked_and_mixed_with_decodes() -> None:
    core, ex = make_core(budget=16)
    a = req("a", list(range(5)), 10)
    core.add_request(a)
    core.step()  # a's whole prompt
    b = req("b", list(range(100, 150)), 3)  # 50 tokens > budget 16
    core.add_request(b)
    core.step()
    out = ex.steps[-1]
    assert out.num_scheduled_tokens == {"a": 1, "b": 15}, "decode first, then a prompt chunk"
    run_all(core)
    chunks = [s.num_scheduled_tokens.get("b") for s in ex.steps if "b" in s.num_scheduled_tokens]
    assert chunks[:4] == [15, 15, 15, 5], chunks
    assert b.output_token_ids == expected_tokens(b.prompt_token_ids, 3)
    assert a.output_token_ids == expected_tokens(a.prompt_token_ids, 10)


def test_preemption_recomputes_latest_arrival_and_output_is_unchanged() -> None:
    # 12 blocks of 4 tokens = 48 tokens for three requests that want 3 * 32.
    core, ex = make_core(num_blocks=12, block_size=4, max_model_len=40)
    reqs = [req(f"r{i}", [i * 10 + j for j in range(8)], 24, max_model_len=40) for i in range(3)]
    for r in reqs:
        core.add_request(r)
    run_all(core)
    stats = core.scheduler.make_stats()
    assert stats.num_preemptions > 0
    first_preempted = next(s for s in ex.steps if s.preempted_req_ids).preempted_req_ids
    assert first_preempted == {"r2"}, "the most recently arrived running request goes first"
    for r in reqs:
        assert r.status == RequestStatus.FINISHED_LENGTH_CAPPED
        assert r.output_token_ids == expected_tokens(r.prompt_token_ids, 24)
    assert core.scheduler.kv_cache_manager.pool.num_free_blocks == 12


def test_max_num_seqs_respected() -> None:
    core, ex = make_core(max_num_seqs=2, budget=64)
    for i in range(5):
        core.add_request(req(f"r{i}", [i, i + 1, i + 2], 4))
    run_all(core)
    assert max(len(s.num_scheduled_tokens) for s in ex.steps) == 2


def test_abort_frees_blocks_and_others_finish() -> None:
    core, ex = make_core()
    a, b = req("a", list(range(20)), 30), req("b", list(range(50, 70)), 5)
    core.add_request(a)
    core.add_request(b)
    core.step()
    core.abort_requests(["a"])
    assert a.status == RequestStatus.FINISHED_ABORTED
    run_all(core)
    assert b.output_token_ids == expected_tokens(b.prompt_token_ids, 5)
    assert "a" in ex.steps[1].finished_req_ids, "the worker hears of the abort on the next step"
    assert core.scheduler.kv_cache_manager.pool.num_free_blocks == 64


def test_stop_conditions() -> None:
    core, _ = make_core()
    prompt = [1, 2, 3]
    first = expected_tokens(prompt, 3)
    eos = Request(
        "e", prompt, SamplingParams(max_tokens=10), eos_token_ids=(first[1],), max_model_len=128
    )
    ignore = Request(
        "i",
        prompt,
        SamplingParams(max_tokens=3, ignore_eos=True),
        eos_token_ids=(first[0],),
        max_model_len=128,
    )
    stop_tok = Request(
        "s", prompt, SamplingParams(max_tokens=10, stop_token_ids=[first[2]]), max_model_len=128
    )
    min_tok = Request(
        "m",
        prompt,
        SamplingParams(max_tokens=10, min_tokens=2),
        eos_token_ids=(first[0],),
        max_model_len=128,
    )
    capped = Request(
        "c", list(range(120)), SamplingParams(max_tokens=50, ignore_eos=True), max_model_len=128
    )
    for r in (eos, ignore, stop_tok, min_tok, capped):
        core.add_request(r)
    run_all(core)
    assert eos.output_token_ids == first[:2] and eos.status == RequestStatus.FINISHED_STOPPED
    assert (
        ignore.output_token_ids == first and ignore.status == RequestStatus.FINISHED_LENGTH_CAPPED
    )
    assert stop_tok.output_token_ids == first and stop_tok.stop_reason == first[2]
    assert len(min_tok.output_token_ids) > 1, "EOS before min_tokens does not stop"
    assert capped.num_tokens == 128 and capped.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_prefix_cache_hits_are_counted() -> None:
    core, _ = make_core(block_size=4)
    shared = list(range(40))
    core.add_request(req("a", shared + [100, 101], 2))
    run_all(core)
    core.add_request(req("b", shared + [200, 201, 202], 2))
    run_all(core)
    stats = core.scheduler.kv_cache_manager.prefix_cache_stats
    assert stats.requests == 2
    assert stats.hits == 40, "all 10 full blocks of the shared prefix hit"
    assert stats.queries == 42 + 43
