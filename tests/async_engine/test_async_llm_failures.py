"""AsyncLLM at the process boundary, when things go wrong: a request that cannot be sent or that
the core refuses fails alone and leaves nothing registered; nothing blocks on a dead core's
socket; a dead core is reaped. One engine serves the module; the tests that kill it build
their own."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from pagedllm import EngineArgs, SamplingParams
from pagedllm.engine import serial
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.engine.core_client import EngineCoreClient
from pagedllm.engine.exceptions import RequestFailedError
from pagedllm.sampling_params import SEED_MAX
from tests.async_engine.test_async_llm import ENGINE_KW, collect, wait_idle

GOOD = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model_dirs, loop):
    engine = AsyncLLM.from_engine_args(
        EngineArgs(model=tiny_model_dirs["llama"], **ENGINE_KW), stat_registry=CollectorRegistry()
    )
    yield engine
    engine.shutdown()
    loop.run_until_complete(asyncio.sleep(0))


def assert_nothing_registered(engine: AsyncLLM) -> None:
    assert not engine._collectors and not engine._times
    assert not engine.output_processor.states and not engine.output_processor.parents


def unencodable(**fields) -> SamplingParams:
    """Params that passed validation, then changed (as a bug or a new field might do): the
    wire format cannot carry them."""
    params = SamplingParams(temperature=0, max_tokens=3, n=fields.pop("n", 1))
    for name, value in fields.items():
        setattr(params, name, value)
    return params


@pytest.mark.parametrize(
    "fields",
    [{"seed": 2**64}, {"seed": -(2**63) - 1}, {"stop": ["\udfff"]}, {"seed": 2**70, "n": 3}],
    ids=["seed-2**64", "seed-below-int64", "lone-surrogate-stop", "n3"],
)
def test_a_request_that_cannot_be_sent_fails_alone_and_leaves_nothing(engine, loop, fields):
    async def main():
        for _ in range(3):  # the same id again: nothing of the first attempt stayed
            with pytest.raises(ValueError, match="cannot be sent"):
                await collect(engine, [5, 6, 7], unencodable(**fields), "bad")
            assert_nothing_registered(engine)
        return await collect(engine, [5, 6, 7], GOOD, "bad")

    outs = loop.run_until_complete(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
    assert_nothing_registered(engine)
    wait_idle(engine, loop)


def test_seeds_near_the_top_of_the_range_wrap_for_n_samples(engine, loop) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=4, n=3, seed=SEED_MAX, ignore_eos=True)
    outs = loop.run_until_complete(collect(engine, [5, 6, 7], params, "top-seed"))
    assert len(outs[-1].outputs) == 3
    again = loop.run_until_complete(collect(engine, [5, 6, 7], params, "top-seed-2"))
    assert [c.token_ids for c in outs[-1].outputs] == [c.token_ids for c in again[-1].outputs]
    wait_idle(engine, loop)


def test_a_request_the_core_refuses_fails_alone(engine, loop) -> None:
    """The core refuses a request it cannot add (here a duplicate of a live id sent behind the
    client's back): that user request fails with RequestFailedError, the others run on."""

    async def main():
        other = asyncio.ensure_future(collect(engine, [8, 9], GOOD, "bystander"))
        gen = engine.generate([5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True), "victim")
        await gen.__anext__()
        checked = engine.input_processor.check([5, 6, 7], GOOD)
        duplicate = engine.input_processor.make_request(
            "victim", checked.prompt_token_ids, checked.sampling_params
        )
        engine.engine_core.add_requests([duplicate])
        with pytest.raises(RequestFailedError, match="refused"):
            async for _ in gen:
                pass
        # A malformed frame (no request the client knows) is refused without a word.
        engine.engine_core._send_frame(serial.pack(serial.InputKind.ADD, ["ghost", "junk"]))
        return await other

    outs = loop.run_until_complete(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
    assert not engine.errored
    assert_nothing_registered(engine)
    wait_idle(engine, loop)
    assert loop.run_until_complete(collect(engine, [5], GOOD, "after"))[-1].finished


def _state(pid: int) -> str | None:
    """The process's state letter (Z: a zombie), or None once it is gone (reaped)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    return next(line.split()[1] for line in status.splitlines() if line.startswith("State:"))


def test_nothing_blocks_on_a_dead_core_and_it_is_reaped(tiny_model_dirs, monkeypatch) -> None:
    async def main():
        engine = AsyncLLM.from_engine_args(
            EngineArgs(model=tiny_model_dirs["llama"], **ENGINE_KW),
            stat_registry=CollectorRegistry(),
        )
        try:
            long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
            gen = engine.generate([5, 6], long, "in-flight")
            task = asyncio.ensure_future(gen.__anext__())
            await asyncio.sleep(0.2)
            pid = engine.engine_core.proc.pid
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _state(pid) is not None:  # the monitor reaps it: no zombie stays behind
                assert time.monotonic() < deadline, f"core process state {_state(pid)}"
                await asyncio.sleep(0.05)
            await asyncio.gather(task, return_exceptions=True)
            await gen.aclose()
            # Even when the client has not noticed the death yet, a send must not block (a
            # PUSH socket without a peer would, forever): pretend it has not.
            monkeypatch.setattr(EngineCoreClient, "is_dead", property(lambda self: False))
            done = threading.Event()

            def send() -> None:
                for i in range(100):
                    engine.engine_core.abort_requests([f"r{i}"])
                done.set()

            threading.Thread(target=send, daemon=True).start()
            assert done.wait(5), "an input send blocked on the dead core's socket"
        finally:
            monkeypatch.undo()
            engine.shutdown()

    asyncio.run(main())
