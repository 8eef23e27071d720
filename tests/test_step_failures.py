"""A step that raises fails its culprit alone (CPU, fp32, the tiny Llama, faults injected into
the worker): the others give exactly the tokens HF's greedy decoding gives (they are recomputed
from their tokens so far), with async scheduling too; no KV block is left behind; only failures
step after step end the engine."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.worker.input_batch import InputBatch
from pagedllm.worker.model_runner import ModelRunner
from tests.test_llm_vs_hf import MAX_TOKENS, random_prompts
from tests.tiny_models import hf_greedy, load_hf

COMMON = dict(dtype="float32", max_model_len=512, kv_cache_memory="64MiB")


@pytest.fixture(scope="module")
def reference(tiny_model_dirs):
    prompts = random_prompts(4321)
    return prompts, hf_greedy(load_hf(tiny_model_dirs["llama"]), prompts, MAX_TOKENS)


def run(llm: LLM, prompts: list[list[int]], victim: int | None = None) -> dict[str, object]:
    """Adds every prompt (request ids "r0", "r1", ...; the victim's is "victim"), steps the
    engine to the end and returns each request's final output."""
    engine = llm.llm_engine
    ids = []
    for i, (prompt, n) in enumerate(zip(prompts, MAX_TOKENS)):
        req_id = "victim" if i == victim else f"r{i}"
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        engine.add_request(req_id, {"prompt_token_ids": prompt}, params)
        ids.append(req_id)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert sorted(finals) == sorted(ids)
    return finals


def assert_clean(llm: LLM) -> None:
    core = llm.llm_engine.engine_core
    assert not core.has_unfinished_requests() and not llm.llm_engine.output_processor.states
    pool = core.scheduler.kv_cache_manager.pool
    assert pool.num_free_blocks == pool.num_blocks


def check_others(finals: dict, prompts, expected, victim: int | None) -> None:
    for i in range(len(prompts)):
        if i != victim:
            assert finals[f"r{i}"].outputs[0].token_ids == expected[i], f"request {i}"


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_request_the_worker_cannot_take_fails_alone(
    tiny_model_dirs, reference, monkeypatch, async_scheduling
) -> None:
    prompts, expected = reference
    llm = LLM(tiny_model_dirs["llama"], async_scheduling=async_scheduling, **COMMON)
    original = InputBatch.add_request

    def add_request(self, req_id, *args, **kwargs):
        row = original(self, req_id, *args, **kwargs)
        if req_id == "victim":
            raise OverflowError("a value the batch cannot hold")
        return row

    monkeypatch.setattr(InputBatch, "add_request", add_request)
    finals = run(llm, prompts, victim=3)
    failed = finals["victim"].outputs[0]
    assert failed.finish_reason == "error" and "OverflowError" in str(failed.stop_reason)
    assert failed.token_ids == []
    check_others(finals, prompts, expected, victim=3)
    assert_clean(llm)
    assert llm.llm_engine.engine_core.scheduler.stats.num_preemptions > 0  # the others redid
    monkeypatch.undo()
    check_others(run(llm, prompts), prompts, expected, victim=None)  # and it goes on serving
    assert_clean(llm)


@pytest.mark.parametrize("where", ["launch", "collect"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_failed_step_mid_decode_fails_its_new_requests_only(
    tiny_model_dirs, reference, monkeypatch, where, async_scheduling
) -> None:
    """The step that admits the late request raises (in its launch, or when its results are
    collected): that request fails; the running ones, whose tokens so far were kept, are
    recomputed and end exactly as without the fault."""
    prompts, expected = reference
    llm = LLM(
        tiny_model_dirs["llama"], async_scheduling=async_scheduling, max_num_seqs=16, **COMMON
    )
    engine = llm.llm_engine
    for i, (prompt, n) in enumerate(zip(prompts[:-1], MAX_TOKENS[:-1])):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
    finals = {}
    for _ in range(6):  # the others are decoding
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    real = getattr(ModelRunner, where)
    fired = []

    def faulty(self, arg):
        scheduled = arg.num_scheduled_tokens if where == "launch" else arg.inputs.req_ids
        if not fired and "victim" in scheduled:
            fired.append(True)
            if where == "collect":
                real(self, arg)  # the device work happened; its results are lost
            raise RuntimeError("injected fault")
        return real(self, arg)

    monkeypatch.setattr(ModelRunner, where, faulty)
    last = len(prompts) - 1
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS[last], ignore_eos=True)
    engine.add_request("victim", {"prompt_token_ids": prompts[last]}, params)
    while engine.has_unfinished_requests():
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    assert fired
    assert finals["victim"].outputs[0].finish_reason == "error"
    assert "injected fault" in str(finals["victim"].outputs[0].stop_reason)
    check_others(finals, prompts[:-1], expected, victim=None)
    assert_clean(llm)


def test_failing_step_after_step_ends_the_engine(tiny_model_dirs, monkeypatch) -> None:
    llm = LLM(tiny_model_dirs["llama"], **COMMON)

    def broken(self, out):
        raise RuntimeError("the device is gone")

    monkeypatch.setattr(ModelRunner, "launch", broken)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outcomes = []
    with pytest.raises(RuntimeError, match="the device is gone"):
        for i in range(10):
            engine.add_request(f"q{i}", [5, 6, 7], params)
            outcomes += [o.outputs[0].finish_reason for o in engine.step() if o.finished]
    assert outcomes == ["error", "error"]  # two requests failed alone, then the engine gave up


def test_an_output_that_cannot_be_processed_fails_its_request_alone(
    tiny_model_dirs, reference, monkeypatch
) -> None:
    """The output side (detokenizing, stop strings) raising for one request: it ends with an
    error, in the engine core too, and the others are untouched."""
    prompts, expected = reference
    llm = LLM(tiny_model_dirs["llama"], **COMMON)
    processor = llm.llm_engine.output_processor
    original = processor._update

    def update(state, out):
        if state.request_id == "victim" and state.token_ids:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return original(state, out)

    monkeypatch.setattr(processor, "_update", update)
    finals = run(llm, prompts, victim=1)
    assert finals["victim"].outputs[0].finish_reason == "error"
    assert "UnicodeDecodeError" in str(finals["victim"].outputs[0].stop_reason)
    check_others(finals, prompts, expected, victim=1)
    assert_clean(llm)
