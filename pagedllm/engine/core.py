"""EngineCore: the busy loop's body. schedule → execute → update, over a scheduler and an executor.

It runs in the caller's process under `LLMEngine`, or in its own process under
`EngineCoreProc` (core_proc.py) for `AsyncLLM`.

`step()` is one of two methods, chosen once from `config.async_scheduling`:
- `_step_sync`: schedule, launch, wait for the results, update the scheduler;
- `_step_async` (the default on CUDA): one step stays in flight: schedule and launch step N+1,
  then wait for step N's sampled ids and update the scheduler with them, so the host's work
  between two steps (scheduling, input preparation, output processing) runs while the GPU
  computes. It falls back to `_step_sync` while a live request samples with penalties or bad
  words (its sampler reads the ids just sampled).
Either way a step that raises fails its culprit alone (`_recover`). With speculative decoding
(`config.speculative_config`) the core always steps synchronously.

Structured output: a step with constrained rows is launched in two parts. `launch_model` queues
the forward; then, once the matchers have taken every token sampled before (in the async step,
after the previous step is collected), the core fills the rows' token bitmask on the host while
the device computes, and `sample_tokens` queues the sampling with it (`_sample_launched`). In
the async step the fill starts in a thread as soon as the previous step is collected
(`_start_fill`) and the call returns: the caller's work on the outputs (detokenizing, sending
them) overlaps it; the next call takes the mask, queues the sampling, launches the next step,
then collects this one.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, TypeAlias

from pagedllm.config import EngineConfig
from pagedllm.engine.exceptions import RequestPreparationError
from pagedllm.engine.kv_cache_spec import KVCacheSpec, uniform_sliding_window
from pagedllm.engine.outputs import (
    EngineCoreOutput,
    GrammarOutput,
    ModelRunnerOutput,
    SchedulerOutput,
)
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.scheduler import Scheduler
from pagedllm.engine.stats import PrefixCacheStats, SchedulerStats
from pagedllm.engine.structured_output import StructuredOutputManager
from pagedllm.engine.structured_output.manager import BitmaskFill

logger = logging.getLogger(__name__)

# Failed steps in a row after which the engine gives up (the device, not a request, is broken).
MAX_CONSECUTIVE_FAILURES = 3
# Longest wait of a step with nothing to run for a grammar being compiled (new requests and
# aborts reach the core between steps).
GRAMMAR_WAIT_S = 0.02


# A launched step, as `Executor.launch_model` returns it and `collect_output` takes it back.
# NOTE: opaque to the engine (the worker's own in-flight step): any executor's type fits.
StepHandle: TypeAlias = object


class Executor(Protocol):
    """What the engine core drives: one worker or many (`pagedllm.executor.executor_class`
    picks the class for the config)."""

    def __init__(self, config: EngineConfig) -> None: ...

    def determine_num_blocks(self) -> int: ...

    def kv_cache_specs(self) -> dict[str, KVCacheSpec]:
        """What each attention layer keeps per block, by layer name."""
        ...

    def initialize_cache(self, num_blocks: int) -> None: ...

    def warm_up(self) -> None:
        """Compiles kernels and captures CUDA graphs (after the cache is allocated)."""
        ...

    def launch_model(self, scheduler_output: SchedulerOutput) -> StepHandle:
        """Starts a step without waiting for its results; `collect_output` returns them. A
        step with constrained rows (`structured_output_request_ids`) only runs its forward
        until `sample_tokens` brings their bitmask."""
        ...

    def sample_tokens(self, handle: StepHandle, grammar: GrammarOutput) -> None:
        """Queues the sampling of a launched step that waits for its grammar bitmask."""
        ...

    def bitmask_buffer(self, rows: int, words: int) -> Any:
        """An int32 numpy [rows, words] array for the next step's grammar bitmask, which
        `sample_tokens` takes without copying it on the host (pinned memory on CUDA)."""
        ...

    def collect_output(self, handle: StepHandle) -> ModelRunnerOutput:
        """Waits for a launched step's results (steps are collected in launch order)."""
        ...

    def abandon_steps(self) -> None:
        """Forgets every launched step without collecting it (after one raised)."""
        ...

    def shutdown(self) -> None: ...


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor) -> None:
        self.config = config
        self.executor = executor
        self.num_blocks = executor.determine_num_blocks()
        executor.initialize_cache(self.num_blocks)
        executor.warm_up()
        self.scheduler = Scheduler(
            config.scheduler_config,
            config.cache_config,
            self.num_blocks,
            uniform_sliding_window(executor.kv_cache_specs()),
            config.speculative_config,
        )
        self.structured_output = StructuredOutputManager(
            config.model_config, reasoning_parser=config.reasoning_parser
        )
        # When each request not scheduled yet arrived (time.monotonic()).
        self._arrival_times: dict[str, float] = {}
        # Seconds each request first scheduled by the last step() had waited in the queue.
        self.step_queue_times: dict[str, float] = {}
        # NOTE: speculative decoding steps synchronously: a step's drafts come from the tokens
        # the step before it accepted (no step in flight while the next is scheduled).
        self.async_scheduling = config.async_scheduling and config.speculative_config is None
        self._step: Callable[[list[EngineCoreOutput]], None] = (
            self._step_async if self.async_scheduling else self._step_sync
        )
        # Launched steps whose results are not collected yet (at most two, oldest first).
        self._in_flight: deque[tuple[SchedulerOutput, StepHandle]] = deque()
        self._launching: SchedulerOutput | None = None  # the step being launched
        # The launched step whose sampling waits for its grammar bitmask.
        self._unsampled: tuple[SchedulerOutput, StepHandle] | None = None
        # Its bitmask, being filled in a thread since its predecessor was collected.
        self._filling: BitmaskFill | None = None
        self._consecutive_failures = 0
        # NOTE: start-up's objects (the model, its modules and tensors, graphs, tokenizer) never
        # die: frozen, the collector stops scanning them in every full collection while serving.
        gc.collect()
        gc.freeze()

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)
        self.structured_output.init_request(request)
        self._arrival_times[request.request_id] = time.monotonic()

    def abort_requests(self, request_ids: list[str]) -> None:
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """Ends requests from outside the step (an abort, or a stop string seen by the output
        processor): no further tokens are computed for them."""
        self.scheduler.finish_requests(request_ids, status)
        for req_id in request_ids:
            self._arrival_times.pop(req_id, None)

    def num_unfinished_requests(self) -> int:
        return self.scheduler.get_num_unfinished_requests()

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.kv_cache_manager.reset_prefix_cache()

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.scheduler.kv_cache_manager.prefix_cache_stats

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._in_flight)

    def step(self) -> list[EngineCoreOutput]:
        """One step (see the module's docstring); a step that raises fails its culprit alone."""
        # NOTE: filled as steps are collected, so a failure later in this call keeps them.
        outputs: list[EngineCoreOutput] = []
        try:
            self._step(outputs)
        except Exception as e:
            return outputs + self._recover(e)
        self._consecutive_failures = 0
        outputs += self.scheduler.take_failed_outputs()
        return outputs

    def _step_sync(self, outputs: list[EngineCoreOutput]) -> None:
        """Schedule, launch, collect: one step at a time."""
        while self._in_flight:  # launched while steps overlapped
            if self._unsampled is not None and len(self._in_flight) == 1:
                self._sample_launched()  # the last one launched may wait for its bitmask
            outputs += self._collect_oldest()
        self._schedule_and_launch()
        self._sample_launched()
        if self._in_flight:
            outputs += self._collect_oldest()

    def _step_async(self, outputs: list[EngineCoreOutput]) -> None:
        """Launch step N+1, then collect step N: one step stays in flight.

        A step with a grammar (N+1) is launched without its sampling. Once step N is collected
        (its tokens advance the grammars the mask reads), N+1's bitmask is filled in a thread
        while N's outputs go back; the next call queues N+1's sampling with the mask, launches
        N+2 behind it, then collects N+1: the fill overlaps the host's work on the outputs, and
        the device runs N+1's forward meanwhile."""
        if self.scheduler.num_history_reqs:
            # NOTE: a request's sampler reads the ids its last step sampled: no overlap.
            self._step_sync(outputs)
            return
        if self._unsampled is not None:
            if len(self._in_flight) > 1:
                outputs += self._collect_oldest()
            self._sample_launched()
            self._schedule_and_launch()
            if len(self._in_flight) > 1:
                outputs += self._collect_oldest()
            if self._unsampled is not None and len(self._in_flight) == 1:
                # Its predecessor's tokens advanced the grammars: start the fill.
                self._start_fill()
            return
        if len(self._in_flight) > 1:  # a grammar step's successor is in flight too
            outputs += self._collect_oldest()
        launched = self._schedule_and_launch()
        if self._in_flight and (not launched or len(self._in_flight) > 1):
            outputs += self._collect_oldest()
        if self._unsampled is not None and len(self._in_flight) == 1:
            # Nothing before it: its grammars are current. The next call samples it.
            self._start_fill()

    def _schedule_and_launch(self) -> bool:
        """Schedules a step and launches it; whether a step with work was launched."""
        if not self.scheduler.has_unfinished_requests():
            return False
        scheduler_output = self.scheduler.schedule()
        self._record_queue_times(scheduler_output)
        if not scheduler_output.is_empty:
            self._launching = scheduler_output
            handle = self.executor.launch_model(scheduler_output)
            self._launching = None
            self._in_flight.append((scheduler_output, handle))
            if scheduler_output.structured_output_request_ids:
                self._unsampled = (scheduler_output, handle)
            return True
        if scheduler_output.finished_req_ids or scheduler_output.preempted_req_ids:
            # Let the worker drop ended and preempted requests even when nothing runs (a
            # preemption can schedule nothing when the others' tokens in flight end them).
            self.executor.launch_model(scheduler_output)
        elif not self._in_flight:
            # Nothing runs: the waiting requests wait for their grammars (or for room).
            self.structured_output.wait_for_compiles(GRAMMAR_WAIT_S)
        return False

    def _start_fill(self) -> None:
        """Starts filling the bitmask of the step waiting for one, in a thread (its grammars
        are current: every step before it is collected)."""
        assert self._unsampled is not None and self._filling is None
        req_ids = self._unsampled[0].structured_output_request_ids
        self._filling = self.structured_output.fill_in_background(
            [self.scheduler.requests.get(r) for r in req_ids], self.executor.bitmask_buffer
        )

    def _sample_launched(self) -> None:
        """Queues the sampling of the step launched last, if it waits for its grammar bitmask
        (its forward is on the device meanwhile), with the mask filled now or in a thread."""
        if self._unsampled is None:
            return
        scheduler_output, handle = self._unsampled
        self._unsampled = None
        req_ids = scheduler_output.structured_output_request_ids
        self._launching = scheduler_output
        filling, self._filling = self._filling, None
        if filling is not None:
            mask = filling.result()
        else:
            mask = self.structured_output.grammar_bitmask(
                [self.scheduler.requests.get(r) for r in req_ids], self.executor.bitmask_buffer
            )
        self.executor.sample_tokens(handle, GrammarOutput(req_ids, mask))
        self._launching = None

    def _collect_oldest(self) -> list[EngineCoreOutput]:
        scheduler_output, handle = self._in_flight[0]
        runner_output = self.executor.collect_output(handle)
        self._in_flight.popleft()
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def _recover(self, error: Exception) -> list[EngineCoreOutput]:
        """Fails the culprit of a step that raised; recomputes the other requests of every step
        whose results are lost (the one launching, and those in flight)."""
        self._consecutive_failures += 1
        if self._consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            raise error
        failing = self._launching or (self._in_flight[0][0] if self._in_flight else None)
        lost = [out for out, _ in self._in_flight] + (
            [self._launching] if self._launching is not None else []
        )
        self._launching = None
        self._unsampled = None
        self._drop_fill()
        self._in_flight.clear()
        self.executor.abandon_steps()
        if isinstance(error, RequestPreparationError):
            culprits = {error.request_id}
        elif failing is not None and failing.scheduled_new_reqs:
            culprits = {new.req_id for new in failing.scheduled_new_reqs}
        else:
            culprits = set(failing.num_scheduled_tokens) if failing is not None else set()
        logger.error(
            "a step failed (%s: %s): failing %d request(s), recomputing the others",
            type(error).__name__,
            error,
            len(culprits),
            exc_info=error,
        )
        reason = f"the engine failed while running the request: {type(error).__name__}: {error}"
        outputs = self.scheduler.recover(lost, culprits, reason)
        for req_id in culprits:
            self._arrival_times.pop(req_id, None)
        return outputs

    def _record_queue_times(self, scheduler_output: SchedulerOutput) -> None:
        self.step_queue_times = {}
        if not self._arrival_times:
            return
        now = time.monotonic()
        for new in scheduler_output.scheduled_new_reqs:
            arrival = self._arrival_times.pop(new.req_id, None)
            if arrival is not None:  # None: resumed after a preemption
                self.step_queue_times[new.req_id] = now - arrival

    def make_stats(self) -> SchedulerStats:
        """A snapshot of the scheduler's counters, prefix-cache lookups included."""
        stats = dataclasses.replace(self.scheduler.make_stats())
        stats.prefix_cache_stats = dataclasses.replace(
            self.scheduler.kv_cache_manager.prefix_cache_stats
        )
        return stats

    def _drop_fill(self) -> None:
        """Waits out a fill in flight (its buffer may be reused) and forgets its mask."""
        filling, self._filling = self._filling, None
        if filling is not None:
            filling.wait()

    def shutdown(self) -> None:
        self._drop_fill()
        self._in_flight.clear()
        self.structured_output.shutdown()
        self.executor.shutdown()
        gc.unfreeze()  # NOTE: what start-up froze may be collected again (and at exit)
