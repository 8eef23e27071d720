"""AsyncLLM: the engine for asyncio applications (the OpenAI server, or any other).

Input processing (tokenizer, checks, the n > 1 fan-out: input_processor.py) and output processing
(detokenization, stop strings, output kinds) run here, in the caller's process; the EngineCore
runs in its own process (core_proc.py), so neither HTTP nor detokenization stalls the step loop.

One background task per event loop, the output handler, reads the core's messages: it turns
each step's outputs into `RequestOutput`s, routes them to per-request collectors that
`generate` awaits, sends stop-string finishes back to the core, and records metrics. When the
core process dies, the monitor thread of the client (core_client.py) wakes the handler, which
fails every pending request with `EngineDeadError`; later calls raise it at once. A request
the core could not run (finish reason ERROR) fails alone, with `RequestFailedError`.

A request whose consumer goes away (the generator is closed, or its task cancelled: a client
disconnect) is aborted in the core, so its KV blocks are freed.

NOTE: request ids must be unique among live requests, and should not be reused right after an
abort: outputs the core produced before it saw the abort are dropped by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from pagedllm.config import EngineConfig, ModelConfig
from pagedllm.engine import serial
from pagedllm.engine.core_client import EngineCoreClient
from pagedllm.engine.dp_client import DPEngineCoreClient
from pagedllm.engine.exceptions import EngineDeadError, RequestFailedError
from pagedllm.engine.input_processor import (
    CheckedInput,
    InputProcessor,
    PromptType,
    prepare_request,
)
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.outputs import EngineCoreOutput, EngineCoreOutputs
from pagedllm.engine.request import FinishReason
from pagedllm.engine.stats import SchedulerStats
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.transformers_utils.tokenizer import get_tokenizer

logger = logging.getLogger(__name__)

# Outputs processed between two yields to the event loop (so HTTP keeps flowing in big batches).
_OUTPUT_CHUNK = 256

# How long a reservation (`AsyncLLM.reserve`) counts when its requests are never sent.
_RESERVATION_S = 2.0

T = TypeVar("T")


class RequestOutputCollector:
    """The outputs of one request not yet taken by its consumer.

    A slow consumer does not build a backlog: DELTA outputs are merged into one, and of
    CUMULATIVE or FINAL_ONLY outputs only the latest is kept (it holds everything before it).
    """

    def __init__(self, output_kind: RequestOutputKind) -> None:
        self.merge_deltas = output_kind == RequestOutputKind.DELTA
        self.output: RequestOutput | BaseException | None = None
        self.ready = asyncio.Event()

    def put(self, output: RequestOutput | BaseException) -> None:
        if isinstance(self.output, RequestOutput) and isinstance(output, RequestOutput):
            if self.merge_deltas:
                _merge_delta(self.output, output)
            else:
                self.output = output
        elif not isinstance(self.output, BaseException):
            self.output = output
        self.ready.set()

    async def get(self) -> RequestOutput:
        while self.output is None:
            await self.ready.wait()
        output, self.output = self.output, None
        self.ready.clear()
        if isinstance(output, BaseException):
            raise output
        return output


def _merge_delta(acc: RequestOutput, new: RequestOutput) -> None:
    """Appends the DELTA output `new` to the DELTA output `acc` (per sample index)."""
    by_index = {c.index: c for c in acc.outputs}
    for comp in new.outputs:
        old = by_index.get(comp.index)
        if old is None:
            acc.outputs.append(comp)
            by_index[comp.index] = comp
            continue
        old.text += comp.text
        old.token_ids = old.token_ids + comp.token_ids
        if comp.logprobs is not None:
            old.logprobs = (old.logprobs or []) + comp.logprobs
        old.cumulative_logprob = comp.cumulative_logprob
        old.finish_reason, old.stop_reason = comp.finish_reason, comp.stop_reason
    acc.outputs.sort(key=lambda c: c.index)
    if acc.prompt_logprobs is None:
        acc.prompt_logprobs = new.prompt_logprobs
    acc.finished = new.finished
    acc.num_cached_tokens = new.num_cached_tokens


@dataclass
class _RequestTimes:
    """One user request's timeline (time.monotonic()), for the latency metrics."""

    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    queued: bool = False  # its queue time was recorded


@dataclass
class _Reservation:
    """Engine-core requests admitted and not sent yet (see `AsyncLLM.reserve`)."""

    expiry: float  # time.monotonic()
    count: int


class AsyncLLM:
    """An engine-core process and its asyncio client. Build it with `from_engine_args`."""

    def __init__(
        self,
        config: EngineConfig,
        stat_registry: Any | None = None,
        model_name: str | None = None,
    ) -> None:
        """`stat_registry`: the prometheus_client registry for the metrics (default: the
        global one); `model_name`: their `model_name` label (default: the model path)."""
        self.config = config
        self.model_config: ModelConfig = config.model_config
        self.tokenizer = get_tokenizer(config.model_config.tokenizer)
        self.input_processor = InputProcessor(config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.engine_core: EngineCoreClient | DPEngineCoreClient
        if config.parallel_config.data_parallel_size > 1:
            self.engine_core = DPEngineCoreClient(config)
        else:
            self.engine_core = EngineCoreClient(config)
        from pagedllm.metrics.prometheus import PrometheusStatLogger

        self.stat_logger = PrometheusStatLogger(
            model_name or config.model_config.model, stat_registry
        )
        self._collectors: dict[str, RequestOutputCollector] = {}
        self._times: dict[str, _RequestTimes] = {}
        self._stats = SchedulerStats()
        self._dead_error: EngineDeadError | None = None
        self._output_handler: asyncio.Task[None] | None = None
        # NOTE: one thread for tokenizing (and the server's chat templates): off the event
        # loop, where a huge prompt would stall every stream; one, so the tokenizer is never
        # used by two threads at once.
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="pagedllm-tokenizer")
        self._reservations: deque[_Reservation] = deque()  # admitted, not sent yet

    @classmethod
    def from_engine_args(cls, engine_args: Any, **kwargs: Any) -> AsyncLLM:
        """Starts the engine-core process and waits until the model is loaded. A start-up
        failure raises its error (ValueError for bad options, RuntimeError otherwise)."""
        return cls(engine_args.create_engine_config(), **kwargs)

    # ----- requests -----

    async def generate(
        self,
        prompt: PromptType | CheckedInput,
        sampling_params: SamplingParams | None,
        request_id: str,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Streams one request's outputs as `sampling_params.output_kind` says.

        Bad input raises ValueError before the first output; a `CheckedInput` (the server's:
        `sampling_params` is then None) is not checked again. If the consumer stops iterating
        before the request finished, the request is aborted in the engine. If the engine
        process died, raises EngineDeadError.
        """
        self._check_alive()
        self._ensure_output_handler()
        if request_id in self._collectors:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        checked = await self._checked(prompt, sampling_params)
        collector = self._add_request(request_id, checked)
        finished = False
        try:
            while not finished:
                output = await collector.get()
                finished = output.finished
                yield output
        finally:
            self._collectors.pop(request_id, None)
            if not finished:  # closed, cancelled, or the engine died
                self._abort_now(request_id)

    async def run_off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the tokenizer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, fn, *args)

    async def _checked(
        self, prompt: PromptType | CheckedInput, params: SamplingParams | None
    ) -> CheckedInput:
        """The checked input: a text prompt is tokenized (and checked) in the tokenizer thread;
        token ids are checked here, so they never queue behind a huge text."""
        if isinstance(prompt, CheckedInput):
            if params is not None and params is not prompt.sampling_params:
                raise ValueError("a CheckedInput carries its own sampling_params: pass None")
            return prompt
        check = self.input_processor.check
        is_text = isinstance(prompt, str) or (
            isinstance(prompt, dict) and "prompt_token_ids" not in prompt and "prompt" in prompt
        )
        # NOTE: check_params refuses anything but SamplingParams (None included).
        params = cast(SamplingParams, params)
        return await self.run_off_loop(check, prompt, params) if is_text else check(prompt, params)

    def num_waiting_requests(self) -> int:
        """Engine-core requests sent and not running yet (as of the core's last message), plus
        those reserved and not sent yet (see `reserve`)."""
        now = time.monotonic()
        while self._reservations and self._reservations[0].expiry < now:
            self._reservations.popleft()
        reserved = sum(r.count for r in self._reservations)
        return max(0, len(self.output_processor.states) - self._stats.num_running_reqs) + reserved

    def reserve(self, num_requests: int) -> None:
        """Counts `num_requests` engine-core requests as waiting before they are sent: a caller
        that admits requests by `num_waiting_requests` and sends them a few loop turns later
        does not admit a burst past its bound. A reservation is used up as requests are sent,
        and lapses after `_RESERVATION_S` (a request that was never sent)."""
        self._reservations.append(_Reservation(time.monotonic() + _RESERVATION_S, num_requests))

    def _use_reservation(self, num_requests: int) -> None:
        while num_requests and self._reservations:
            first = self._reservations[0]
            taken = min(num_requests, first.count)
            first.count -= taken
            num_requests -= taken
            if not first.count:
                self._reservations.popleft()

    def _add_request(self, request_id: str, checked: CheckedInput) -> RequestOutputCollector:
        """Registers and sends one request; on any failure nothing stays behind."""
        if request_id in self._collectors:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        requests = prepare_request(
            self.input_processor, self.output_processor, request_id, checked, None
        )
        try:
            self.engine_core.add_requests(requests)
        except BaseException:
            self.output_processor.abort_requests([request_id])
            raise
        self._use_reservation(len(requests))
        collector = RequestOutputCollector(checked.sampling_params.output_kind)
        self._collectors[request_id] = collector
        self._times[request_id] = _RequestTimes(arrival=time.monotonic())
        return collector

    async def abort(self, request_id: str) -> None:
        """Aborts a request; its consumer (if any) gets a last output, finish reason "abort"."""
        child_ids = self._live_core_ids(request_id)
        if request_id in self._collectors and child_ids:
            aborted = [
                EngineCoreOutput(request_id=c, new_token_ids=[], finish_reason=FinishReason.ABORT)
                for c in child_ids
            ]
            for output in self.output_processor.process_outputs(aborted).request_outputs:
                self._deliver(output, time.monotonic())
        self._abort_now(request_id, child_ids)

    def _abort_now(self, request_id: str, child_ids: list[str] | None = None) -> None:
        """Forgets the request here and ends it in the core (synchronous: usable in `finally`).
        `child_ids`: its engine-core ids still running, if the caller already took them."""
        if child_ids is None:
            child_ids = self._live_core_ids(request_id)
        self._times.pop(request_id, None)
        self._collectors.pop(request_id, None)
        self.output_processor.abort_requests([request_id])
        if not self.engine_core.is_dead:
            self.engine_core.abort_requests(child_ids)

    def _live_core_ids(self, request_id: str) -> list[str]:
        states = self.output_processor.states
        return [c for c in self.output_processor.child_ids(request_id) if c in states]

    # ----- health and stats -----

    @property
    def errored(self) -> bool:
        return self._dead_error is not None or self.engine_core.is_dead

    @property
    def dead_error(self) -> EngineDeadError:
        if self._dead_error is not None:
            return self._dead_error
        return EngineDeadError(self.engine_core.dead_reason or "the engine was shut down")

    def _check_alive(self) -> None:
        if self.errored:
            raise self.dead_error

    async def check_health(self) -> None:
        """Raises EngineDeadError when the engine-core process is gone."""
        self._check_alive()
        if not self.engine_core.proc.is_alive():
            raise EngineDeadError(
                f"the engine-core process died (exit code {self.engine_core.proc.exitcode})"
            )

    async def get_scheduler_stats(self) -> SchedulerStats:
        """The latest stats the core sent (after its last step, or its last idle input)."""
        return self._stats

    async def get_tokenizer(self) -> Any:
        return self.tokenizer

    def shutdown(self) -> None:
        """Stops the core process and closes the sockets; pending requests fail with
        EngineDeadError. Idempotent."""
        if self._dead_error is None:
            self._dead_error = EngineDeadError("the engine was shut down")
        self._fail_all(self._dead_error)
        handler, self._output_handler = self._output_handler, None
        if handler is not None and not handler.done():
            with contextlib.suppress(RuntimeError):  # its loop is closed
                handler.cancel()
        self.engine_core.shutdown()
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    # ----- the output handler -----

    def _ensure_output_handler(self) -> None:
        loop = asyncio.get_running_loop()
        handler = self._output_handler
        if handler is not None and not handler.done() and handler.get_loop() is loop:
            return
        if handler is not None and not handler.done():
            raise RuntimeError("AsyncLLM is already in use by another running event loop")
        self.engine_core.reset_async()
        self._output_handler = loop.create_task(self._run_output_handler())

    async def _run_output_handler(self) -> None:
        try:
            while True:
                kind, payload = await self.engine_core.get_output()
                if kind == serial.OutputKind.OUTPUTS:
                    # NOTE: the data-parallel client hands batches on decoded (stats merged).
                    if not isinstance(payload, EngineCoreOutputs):
                        payload = serial.decode_outputs(payload)
                    await self._process(payload)
                else:  # FAILED (the core's error) or DEAD (the monitor saw it exit)
                    self._on_dead(EngineDeadError(f"the engine core died: {payload}"))
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("the output handler failed")
            self._on_dead(EngineDeadError(f"the output handler failed: {e!r}"))
            self.engine_core.shutdown()

    def _on_dead(self, error: EngineDeadError) -> None:
        if self._dead_error is None:
            self._dead_error = error
        self._fail_all(self._dead_error)

    def _fail_all(self, error: EngineDeadError) -> None:
        for collector in self._collectors.values():
            collector.put(error)

    async def _process(self, batch: EngineCoreOutputs) -> None:
        self._stats = batch.stats
        self.stat_logger.record_scheduler_stats(batch.stats)
        if batch.queue_times:
            self._record_queue_times(batch.queue_times)
        outputs = batch.outputs
        for start in range(0, len(outputs), _OUTPUT_CHUNK):
            if start:
                await asyncio.sleep(0)
            chunk = outputs[start : start + _OUTPUT_CHUNK]
            if any(o.finish_reason == FinishReason.ERROR for o in chunk):
                chunk = self._fail_requests(chunk)
            now = time.monotonic()
            self._record_tokens(chunk, now)
            processed = self.output_processor.process_outputs(chunk)
            if processed.failed:
                self._fail_requests(
                    [
                        EngineCoreOutput(
                            request_id=c,
                            new_token_ids=[],
                            finish_reason=FinishReason.ERROR,
                            stop_reason=why,
                        )
                        for c, why in processed.failed
                    ]
                )
            self.engine_core.finish_requests(processed.reqs_to_stop)
            for output in processed.request_outputs:
                self._deliver(output, now)

    def _fail_requests(self, outputs: list[EngineCoreOutput]) -> list[EngineCoreOutput]:
        """Fails the user requests of outputs the core ended with an error (their consumers get
        RequestFailedError; n > 1 siblings are aborted); returns the other outputs."""
        rest = []
        for out in outputs:
            if out.finish_reason != FinishReason.ERROR:
                rest.append(out)
                continue
            user_id = self._user_id(out.request_id)
            if user_id is None:
                continue
            collector = self._collectors.get(user_id)
            if collector is not None:
                collector.put(RequestFailedError(str(out.stop_reason)))
            self._abort_now(user_id)
        return rest

    def _deliver(self, output: RequestOutput, now: float) -> None:
        collector = self._collectors.get(output.request_id)
        if collector is not None:
            collector.put(output)
        if output.finished:
            self._collectors.pop(output.request_id, None)
            times = self._times.pop(output.request_id, None)
            if times is not None:
                self.stat_logger.e2e_request_latency.observe(now - times.arrival)
                # NOTE: with n > 1, the reason of the sample that finished last.
                reason = next((c.finish_reason for c in reversed(output.outputs)), None)
                self.stat_logger.record_finished(reason)

    def _user_id(self, core_id: str) -> str | None:
        state = self.output_processor.states.get(core_id)
        if state is None:
            return None
        return state.parent.request_id if state.parent is not None else core_id

    def _record_queue_times(self, queue_times: dict[str, float]) -> None:
        for core_id, seconds in queue_times.items():
            user_id = self._user_id(core_id)
            times = self._times.get(user_id) if user_id is not None else None
            if times is not None and not times.queued:
                times.queued = True
                self.stat_logger.request_queue_time.observe(seconds)

    def _record_tokens(self, outputs: list[EngineCoreOutput], now: float) -> None:
        """Token counters, time to first token and inter-token latency, per user request."""
        num_generated = 0
        for out in outputs:
            if not out.new_token_ids:
                continue
            user_id = self._user_id(out.request_id)
            times = self._times.get(user_id) if user_id is not None else None
            if times is None:
                continue  # aborted here already
            num_generated += len(out.new_token_ids)
            if times.first_token is None:
                times.first_token = now
                self.stat_logger.time_to_first_token.observe(now - times.arrival)
                state = self.output_processor.states[out.request_id]
                self.stat_logger.prompt_tokens.inc(len(state.prompt_token_ids))
            elif times.last_token != now:  # once per step, for all n samples
                assert times.last_token is not None
                self.stat_logger.inter_token_latency.observe(now - times.last_token)
            times.last_token = now
        if num_generated:
            self.stat_logger.generation_tokens.inc(num_generated)
