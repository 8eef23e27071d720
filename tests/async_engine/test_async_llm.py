"""AsyncLLM against a tiny random Llama on the CPU (fp32): the engine core runs in its own
process, and whatever goes through it matches the in-process `LLM` token for token.

One engine serves the module (its core process takes a few seconds to start); every test
leaves it idle. The tests that kill or break an engine build their own.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import os
import random
import signal
import time

import pytest
from prometheus_client import CollectorRegistry

from pagedllm import LLM, EngineArgs, SamplingParams
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.exceptions import EngineDeadError
from pagedllm.sampling_params import RequestOutputKind
from tests.tiny_models import VOCAB_SIZE

ENGINE_KW = dict(dtype="float32", max_model_len=256, kv_cache_memory="8MiB")
DELTA, FINAL = RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY
MODEL_NAME = "tiny-llama"


@pytest.fixture(scope="module")
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture(scope="module")
def engine(tiny_model_dirs, registry, loop):
    engine = AsyncLLM.from_engine_args(
        EngineArgs(model=tiny_model_dirs["llama"], **ENGINE_KW),
        stat_registry=registry,
        model_name=MODEL_NAME,
    )
    yield engine
    engine.shutdown()
    loop.run_until_complete(asyncio.sleep(0))  # let the output handler see its cancellation


@pytest.fixture(scope="module")
def llm(tiny_model_dirs) -> LLM:
    return LLM(tiny_model_dirs["llama"], **ENGINE_KW)


def ids_prompt(rng: random.Random, n: int) -> dict:
    return {"prompt_token_ids": [rng.randrange(3, VOCAB_SIZE) for _ in range(n)]}


async def collect(engine: AsyncLLM, prompt, params: SamplingParams, request_id: str) -> list:
    return [out async for out in engine.generate(prompt, params, request_id)]


def wait_idle(engine: AsyncLLM, loop, timeout: float = 20.0):
    """Waits until the core reports no request and no KV block in use; returns its stats."""

    async def poll():
        deadline = time.monotonic() + timeout
        while True:
            stats = await engine.get_scheduler_stats()
            idle = stats.num_running_reqs == 0 and stats.num_waiting_reqs == 0
            if idle and stats.kv_cache_usage == 0.0:
                return stats
            assert time.monotonic() < deadline, f"engine not idle: {stats}"
            await asyncio.sleep(0.02)

    return loop.run_until_complete(poll())


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(f"pagedllm:{name}", {"model_name": MODEL_NAME, **labels})
    return 0.0 if value is None else value


def test_concurrent_requests_match_llm_generate(engine, llm, loop) -> None:
    rng = random.Random(1234)
    prompts: list = [ids_prompt(rng, rng.randint(1, 70)) for _ in range(5)]
    prompts.append("The quick brown fox jumps over")
    params = [
        SamplingParams(
            temperature=0,
            max_tokens=rng.randint(1, 24),
            ignore_eos=True,
            output_kind=rng.choice([DELTA, FINAL, RequestOutputKind.CUMULATIVE]),
        )
        for _ in prompts
    ]
    want = llm.generate(prompts, params, use_tqdm=False)

    async def main():
        return await asyncio.gather(
            *(
                collect(engine, p, sp, f"match-{i}")
                for i, (p, sp) in enumerate(zip(prompts, params))
            )
        )

    results = loop.run_until_complete(main())
    for i, (outs, sp, ref) in enumerate(zip(results, params, want)):
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        assert {o.request_id for o in outs} == {f"match-{i}"}
        if sp.output_kind == FINAL:
            assert len(outs) == 1
        if sp.output_kind == DELTA:
            token_ids = [t for o in outs for t in o.outputs[0].token_ids]
            text = "".join(o.outputs[0].text for o in outs)
        else:
            token_ids, text = outs[-1].outputs[0].token_ids, outs[-1].outputs[0].text
        assert token_ids == ref.outputs[0].token_ids, i
        assert text == ref.outputs[0].text, i
        assert outs[-1].prompt_token_ids == ref.prompt_token_ids
        assert outs[-1].outputs[0].finish_reason == "length"
    wait_idle(engine, loop)


def test_delta_stream_adds_up_to_final_only(engine, loop) -> None:
    """Seeded sampling with a stop string: the streamed deltas (merged or not, depending on how
    fast the consumer reads) add up to the one final output, text, tokens and logprobs; and the
    stop string, found in this process, ends the request in the core too."""
    rng = random.Random(77)
    prompt = ids_prompt(rng, 12)
    base = dict(temperature=1.0, seed=5, max_tokens=60, ignore_eos=True, logprobs=2)

    async def main():
        stats = await engine.get_scheduler_stats()
        generated = stats.num_generation_tokens
        final = await collect(engine, prompt, SamplingParams(**base, output_kind=FINAL), "f0")
        full = final[-1].outputs[0]
        # A stop string: the text of a later token (or its first appearance, if earlier).
        k = next(
            k
            for k in range(4, len(full.token_ids))
            if _clean(engine.tokenizer.decode([full.token_ids[k]]))
        )
        stop = engine.tokenizer.decode([full.token_ids[k]])
        stopped = dict(base, stop=[stop])
        final_stop = await collect(
            engine, prompt, SamplingParams(**stopped, output_kind=FINAL), "f1"
        )
        deltas = []
        async for out in engine.generate(
            prompt, SamplingParams(**stopped, output_kind=DELTA), "d1"
        ):
            deltas.append(out)
            await asyncio.sleep(rng.choice([0, 0, 0.01]))  # a consumer slow at times
        generated = (await engine.get_scheduler_stats()).num_generation_tokens - generated
        return full, stop, k, final_stop[-1].outputs[0], deltas, generated

    full, stop, k, want, deltas, generated = loop.run_until_complete(main())
    assert want.finish_reason == "stop" and want.stop_reason == stop
    assert want.text == full.text[: full.text.index(stop)]
    assert len(want.token_ids) <= k + 1
    assert want.token_ids == full.token_ids[: len(want.token_ids)]
    assert "".join(d.outputs[0].text for d in deltas) == want.text
    assert [t for d in deltas for t in d.outputs[0].token_ids] == want.token_ids
    assert [lp for d in deltas for lp in d.outputs[0].logprobs] == want.logprobs
    assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "stop"
    # The core stopped soon after the stop string (a few steps run before FINISH reaches it),
    # far before max_tokens.
    assert 60 + 2 * len(want.token_ids) <= generated < 60 + 2 * (len(want.token_ids) + 20)
    wait_idle(engine, loop)


def _clean(piece: str) -> bool:
    return len(piece.strip()) >= 2 and piece.isascii() and piece.isprintable()


def test_n2_matches_llm(engine, llm, loop) -> None:
    rng = random.Random(99)
    prompt = ids_prompt(rng, 37)
    params = SamplingParams(n=2, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True)
    ref = llm.generate(prompt, params, use_tqdm=False)[0]

    async def main():
        final = await collect(engine, prompt, params.clone(), "n2-final")
        delta_params = params.clone()
        delta_params.output_kind = DELTA
        deltas = await collect(engine, prompt, delta_params, "n2-delta")
        return final, deltas

    final, deltas = loop.run_until_complete(main())
    assert len(final[-1].outputs) == 2
    assert [c.token_ids for c in final[-1].outputs] == [c.token_ids for c in ref.outputs]
    assert [c.text for c in final[-1].outputs] == [c.text for c in ref.outputs]
    assert final[-1].outputs[0].token_ids != final[-1].outputs[1].token_ids
    for index, want in enumerate(ref.outputs):
        parts = [c for d in deltas for c in d.outputs if c.index == index]
        assert [t for c in parts for t in c.token_ids] == want.token_ids
        assert "".join(c.text for c in parts) == want.text
    assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])
    wait_idle(engine, loop)


def test_bad_input_is_a_value_error_and_the_engine_keeps_serving(engine, loop) -> None:
    good = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def main():
        with pytest.raises(ValueError, match="max_model_len"):
            await collect(engine, list(range(3, 300)), good, "too-long")
        with pytest.raises(ValueError, match="max_logprobs"):
            await collect(engine, [5, 6], SamplingParams(logprobs=100), "bad-logprobs")
        with pytest.raises(ValueError, match="vocabulary"):
            await collect(engine, [5, VOCAB_SIZE + 1], good, "bad-ids")
        # A duplicate of a live request id is refused; the live one is untouched.
        live = engine.generate([5, 6, 7], good, "dup")
        first = await live.__anext__()
        with pytest.raises(ValueError, match="already"):
            await collect(engine, [8, 9], good, "dup")
        rest = [out async for out in live]
        return rest[-1] if rest else first

    last = loop.run_until_complete(main())
    assert last.finished and len(last.outputs[0].token_ids) == 4
    assert not engine.errored
    wait_idle(engine, loop)


def test_closing_a_stream_aborts_the_request(engine, registry, loop) -> None:
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, output_kind=DELTA)

    async def main():
        generated = (await engine.get_scheduler_stats()).num_generation_tokens
        gen = engine.generate(list(range(10, 50)), long, "closed")
        got = [await gen.__anext__() for _ in range(2)]
        running = (await engine.get_scheduler_stats()).num_running_reqs
        await gen.aclose()

        # A cancelled consumer task (a client disconnect) aborts too.
        first = asyncio.Event()

        async def consume():
            async for _ in engine.generate(list(range(60, 90)), long, "cancelled"):
                first.set()

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        # abort() ends a stream whose consumer is still reading: a last output, "abort".
        outs = []

        async def read():
            async for out in engine.generate(list(range(100, 120)), long, "aborted"):
                outs.append(out)

        reader = asyncio.create_task(read())
        while not outs:
            await asyncio.sleep(0.005)
        await engine.abort("aborted")
        await asyncio.wait_for(reader, 10)
        return got, running, outs, generated

    got, running, outs, generated = loop.run_until_complete(main())
    assert running >= 1 and not got[-1].finished
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert sum(len(o.outputs[0].token_ids) for o in outs) < 200
    stats = wait_idle(engine, loop)
    # Each ran a few steps past its abort at most, far from its 200 tokens.
    assert stats.num_generation_tokens - generated < 150
    assert metric(registry, "num_requests_running") == 0
    assert metric(registry, "kv_cache_usage_perc") == 0


def test_metrics_count_what_was_generated(engine, registry, loop) -> None:
    rng = random.Random(4242)
    names = (
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds_count",
        "e2e_request_latency_seconds_count",
        "request_queue_time_seconds_count",
        "inter_token_latency_seconds_count",
        "prefix_cache_queries_total",
        "prefix_cache_hits_total",
    )
    before = {n: metric(registry, n) for n in names}
    length_before = metric(registry, "request_success_total", finished_reason="length")
    stop_before = metric(registry, "request_success_total", finished_reason="stop")
    prompts = [ids_prompt(rng, rng.randint(5, 40)) for _ in range(4)]
    # A request that shares the first's first block (16 tokens), once that one has finished.
    shared = {"prompt_token_ids": prompts[0]["prompt_token_ids"][:16] + [7, 8, 9]}
    maxes = [rng.randint(2, 12) for _ in prompts]
    stop_id = 42

    async def main():
        outs = await asyncio.gather(
            *(
                collect(
                    engine, p, SamplingParams(temperature=0, max_tokens=m, ignore_eos=True), f"m{i}"
                )
                for i, (p, m) in enumerate(zip(prompts, maxes))
            )
        )
        # Sampling that must end on a stop token (every token but one is banned).
        stop_params = SamplingParams(
            temperature=0, max_tokens=5, logit_bias={stop_id: 100.0}, stop_token_ids=[stop_id]
        )
        outs.append(await collect(engine, shared, stop_params, "m-stop"))
        return outs

    outs = loop.run_until_complete(main())
    wait_idle(engine, loop)
    finals = [o[-1] for o in outs]
    assert finals[-1].outputs[0].finish_reason == "stop" and finals[-1].outputs[0].token_ids == [
        stop_id
    ]
    delta = {n: metric(registry, n) - before[n] for n in names}
    all_prompts = [*prompts, shared]
    assert delta["prompt_tokens_total"] == sum(len(p["prompt_token_ids"]) for p in all_prompts)
    assert delta["generation_tokens_total"] == sum(len(f.outputs[0].token_ids) for f in finals)
    assert delta["generation_tokens_total"] == sum(maxes) + 1
    for name in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert delta[f"{name}_seconds_count"] == 5, name
    # One inter-token gap per token after the first.
    assert delta["inter_token_latency_seconds_count"] == sum(m - 1 for m in maxes)
    assert metric(registry, "request_success_total", finished_reason="length") - length_before == 4
    assert metric(registry, "request_success_total", finished_reason="stop") - stop_before == 1
    assert delta["prefix_cache_queries_total"] == sum(
        len(p["prompt_token_ids"]) for p in all_prompts
    )
    assert delta["prefix_cache_hits_total"] == 16
    stats = loop.run_until_complete(engine.get_scheduler_stats())
    assert stats.prefix_cache_stats.hits >= 16
    assert metric(registry, "num_requests_waiting") == 0


def test_startup_failure_reaches_the_caller(tiny_model_dirs, tmp_path) -> None:
    with pytest.raises(ValueError, match="not a local folder"):
        AsyncLLM.from_engine_args(EngineArgs(model=str(tmp_path / "nope")))
    # This one fails in the core process (the KV cache is sized there).
    with pytest.raises(ValueError, match="kv_cache_memory"):
        AsyncLLM.from_engine_args(
            EngineArgs(model=tiny_model_dirs["llama"], dtype="float32", kv_cache_memory=10_000),
            stat_registry=CollectorRegistry(),
        )


def test_killed_core_fails_pending_and_new_requests(tiny_model_dirs) -> None:
    async def main():
        # Built inside a running loop, as a server's start-up would.
        engine = AsyncLLM.from_engine_args(
            EngineArgs(model=tiny_model_dirs["llama"], **ENGINE_KW),
            stat_registry=CollectorRegistry(),
        )
        try:
            await engine.check_health()
            long = SamplingParams(temperature=0, max_tokens=250, ignore_eos=True, output_kind=DELTA)
            got = []

            async def consume(request_id: str):
                async for out in engine.generate([5, 6], long, request_id):
                    got.append(out)

            tasks = [asyncio.create_task(consume(f"k{i}")) for i in range(3)]
            while not got:
                await asyncio.sleep(0.005)
            os.kill(engine.engine_core.proc.pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
            assert all(isinstance(r, EngineDeadError) for r in results), results
            assert engine.errored
            with pytest.raises(EngineDeadError):
                await engine.check_health()
            with pytest.raises(EngineDeadError):
                await collect(engine, [5, 6], long, "after")
        finally:
            engine.shutdown()
            engine.shutdown()  # idempotent

    asyncio.run(main())


def test_async_scheduling_in_the_core_process(tiny_model_dirs, llm, loop) -> None:
    """The engine-core process with async scheduling (the default on CUDA): concurrent streams
    give `LLM.generate`'s tokens (one step at a time), an abort mid-stream ends only that
    request, and the core ends idle with no KV block held."""
    engine = AsyncLLM.from_engine_args(
        EngineArgs(model=tiny_model_dirs["llama"], async_scheduling=True, **ENGINE_KW),
        stat_registry=CollectorRegistry(),
        model_name=MODEL_NAME,
    )
    try:
        rng = random.Random(77)
        prompts: list = [ids_prompt(rng, rng.randint(1, 70)) for _ in range(6)]
        params = [
            SamplingParams(temperature=0, max_tokens=rng.randint(1, 30), ignore_eos=True)
            for _ in prompts
        ]
        params[2] = SamplingParams(temperature=0.8, seed=3, max_tokens=25, logprobs=1)
        want = llm.generate(prompts, params, use_tqdm=False)
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, output_kind=DELTA)

        async def main():
            outs: list = []

            async def read_long():
                async for out in engine.generate(list(range(10, 40)), long, "long"):
                    outs.append(out)

            reader = asyncio.create_task(read_long())
            results = await asyncio.gather(
                *(
                    collect(engine, p, sp, f"a-{i}")
                    for i, (p, sp) in enumerate(zip(prompts, params))
                )
            )
            while len(outs) < 3:
                await asyncio.sleep(0.005)
            await engine.abort("long")
            await asyncio.wait_for(reader, 10)
            return results, outs

        results, long_outs = loop.run_until_complete(main())
        for outs, ref in zip(results, want):
            assert outs[-1].outputs[0].token_ids == ref.outputs[0].token_ids
            assert outs[-1].outputs[0].finish_reason == ref.outputs[0].finish_reason
        assert long_outs[-1].outputs[0].finish_reason == "abort"
        wait_idle(engine, loop)
    finally:
        engine.shutdown()
        loop.run_until_complete(asyncio.sleep(0))


@pytest.mark.parametrize("n", [1, 2])
def test_the_callers_sampling_params_are_left_unchanged(engine, llm, loop, n) -> None:
    """The engine keeps its own copy of each request's params (the bad words' token ids, the
    n children's seeds, the output kind go there): the object the caller passed is never
    written to, by `LLM.generate`, `LLMEngine.add_request` or `AsyncLLM.generate`."""
    params = SamplingParams(
        temperature=0.8, seed=3, n=n, max_tokens=4, bad_words=["ab"], stop=["zz"], logprobs=1
    )
    params.prompt_logprobs = 1
    before = copy.deepcopy(params)
    llm.generate([[5, 6, 7], "hello"], params, use_tqdm=False)
    llm.llm_engine.add_request(f"keep-{n}", [5, 6], params)
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
    outs = loop.run_until_complete(collect(engine, "hello", params, f"keep-async-{n}"))
    assert len(outs[-1].outputs) == n
    assert dataclasses.asdict(params) == dataclasses.asdict(before)
    assert params.bad_words_token_ids == []
    wait_idle(engine, loop)
