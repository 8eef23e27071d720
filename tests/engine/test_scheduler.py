"""Scheduler scenarios: chunked prefill, mixed steps, preemption by recompute, max_num_seqs, abort."""

from __future__ import annotations

from pagedllm.config import CacheConfig, EngineConfig, SchedulerConfig
from pagedllm.engine.core import EngineCore
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.sampling_params import SamplingParams
from tests.engine.fake_executor import FakeExecutor
from tests.engine.test_scheduler_invariants import expected_tokens


def make_core(
    num_blocks=64,
    block_size=4,
    max_num_seqs=8,
    budget=32,
    max_model_len=128,
    caching=True,
    async_scheduling=False,
):
    config = EngineConfig(
        model_config=None,  # type: ignore[arg-type]
        cache_config=CacheConfig(block_size=block_size, enable_prefix_caching=caching),
        scheduler_config=SchedulerConfig(max_num_seqs, budget, max_model_len),
        parallel_config=None,  # type: ignore[arg-type]
        device_config=None,  # type: ignore[arg-type]
        async_scheduling=async_scheduling,
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


# ----- async scheduling -----


def _mixed_requests() -> list[Request]:
    """Chunked prompts, a shared prefix, EOS and stop-token stops, a min_tokens and a capped one."""
    prompt = [1, 2, 3]
    first = expected_tokens(prompt, 4)
    reqs = [req(f"r{i}", [i * 10 + j for j in range(8 + 9 * i)], 6 + 5 * i) for i in range(6)]
    reqs += [
        Request("eos", prompt, SamplingParams(max_tokens=9), (first[1],), max_model_len=128),
        Request("stop", prompt, SamplingParams(max_tokens=9, stop_token_ids=[first[2]]), max_model_len=128),
        Request("min", prompt, SamplingParams(max_tokens=9, min_tokens=3), (first[0],), max_model_len=128),
        Request("cap", list(range(120)), SamplingParams(max_tokens=50, ignore_eos=True), max_model_len=128),
    ]  # fmt: skip
    return reqs


def _run_mixed(async_scheduling: bool, num_blocks: int) -> tuple[dict, EngineCore]:
    core, _ = make_core(num_blocks=num_blocks, budget=24, async_scheduling=async_scheduling)
    reqs = _mixed_requests()
    for r in reqs:
        core.add_request(r)
    run_all(core)
    return {r.request_id: (r.output_token_ids, r.status, r.stop_reason) for r in reqs}, core


def test_async_scheduling_gives_the_same_outputs() -> None:
    for num_blocks in (64, 34):  # 34 blocks of 4: preemptions
        want, _ = _run_mixed(False, num_blocks)
        got, core = _run_mixed(True, num_blocks)
        assert got == want
        pool = core.scheduler.kv_cache_manager.pool
        assert pool.num_free_blocks == num_blocks
        if num_blocks == 34:
            assert core.scheduler.make_stats().num_preemptions > 0


def test_async_scheduling_launches_before_collecting() -> None:
    core, ex = make_core(async_scheduling=True)
    a = req("a", [5, 6, 7], 4)
    core.add_request(a)
    assert core.step() == [], "the first step stays in flight"
    assert len(ex.steps) == 1 and core.has_unfinished_requests()
    outputs = core.step()
    assert len(ex.steps) == 2, "step 2 was launched before step 1's results were used"
    assert [o.new_token_ids for o in outputs] == [expected_tokens(a.prompt_token_ids, 1)]
    assert ex.steps[1].num_scheduled_tokens == {"a": 1}, "it computes the token in flight"
    run_all(core)
    assert a.output_token_ids == expected_tokens(a.prompt_token_ids, 4)
    # No step past max_tokens: the prompt step and three decodes sample the four tokens.
    assert sum("a" in s.num_scheduled_tokens for s in ex.steps) == 4


def test_async_stop_wastes_one_step_and_drops_it() -> None:
    core, ex = make_core(async_scheduling=True)
    prompt = [1, 2, 3]
    first = expected_tokens(prompt, 3)
    r = Request("s", prompt, SamplingParams(max_tokens=10, stop_token_ids=[first[1]]), max_model_len=128)  # fmt: skip
    core.add_request(r)
    outputs = []
    while core.has_unfinished_requests():
        outputs += core.step()
    assert r.output_token_ids == first[:2] and r.stop_reason == first[1]
    assert [o.new_token_ids for o in outputs] == [[first[0]], [first[1]]]
    assert sum("s" in s.num_scheduled_tokens for s in ex.steps) == 3, "one step computed in vain"
    assert core.scheduler.kv_cache_manager.pool.num_free_blocks == 64


def test_async_scheduling_waits_for_penalties() -> None:
    core, ex = make_core(async_scheduling=True)
    plain = req("p", [4, 5, 6], 6)
    penalized = req("q", [7, 8, 9], 3, presence_penalty=0.5)
    core.add_request(plain)
    core.add_request(penalized)
    assert core.step() != [], "with a penalty in the batch each step is collected at once"
    run_all(core)
    assert plain.output_token_ids == expected_tokens(plain.prompt_token_ids, 6)
    assert core.scheduler.num_history_reqs == 0
    n = len(ex.steps)
    core.add_request(req("x", [1, 2], 3))
    assert core.step() == [] and len(ex.steps) == n + 1, "alone again, steps overlap"
    run_all(core)


def test_async_abort_with_a_step_in_flight() -> None:
    core, _ = make_core(async_scheduling=True)
    a, b = req("a", list(range(20)), 30), req("b", list(range(50, 70)), 5)
    core.add_request(a)
    core.add_request(b)
    core.step()
    core.step()
    core.abort_requests(["a"])
    run_all(core)
    assert a.status == RequestStatus.FINISHED_ABORTED
    assert b.output_token_ids == expected_tokens(b.prompt_token_ids, 5)
    assert core.scheduler.kv_cache_manager.pool.num_free_blocks == 64


def test_async_preemption_that_schedules_nothing_reaches_the_worker() -> None:
    """B, admitted at A's side, needs a block while A's token in flight is A's last: A is not
    scheduled again, B preempts itself, and the step schedules nothing; the worker must still
    drop B, or B's resumption finds it there (found by the invariants machine)."""
    core, _ = make_core(
        num_blocks=64, block_size=1, max_num_seqs=2, budget=13, max_model_len=64,
        caching=False, async_scheduling=True,
    )  # fmt: skip
    a = req("a", list(range(30)), 12, max_model_len=64)
    core.add_request(a)
    for _ in range(10):
        core.step()
    b = req("b", list(range(100, 125)), 1, max_model_len=64)
    core.add_request(b)
    run_all(core)
    assert a.output_token_ids == expected_tokens(a.prompt_token_ids, 12)
    assert b.output_token_ids == expected_tokens(b.prompt_token_ids, 1)
    assert core.scheduler.make_stats().num_preemptions > 0
    assert core.scheduler.kv_cache_manager.pool.num_free_blocks == 64
