"""EngineCore: the busy loop's body. schedule → execute → update, over a scheduler and an executor.

It runs in the caller's process under `LLMEngine`, or in its own process under
`EngineCoreProc` (core_proc.py) for `AsyncLLM`.

With `async_scheduling` (the default on CUDA) one step stays in flight: each `step()` schedules
and launches step N+1, then waits for step N's sampled ids and updates the scheduler with them.
The host's work between two steps (scheduling, input preparation, output processing) then runs
while the GPU computes, instead of between GPU steps. Steps fall back to one at a time while a
live request samples with penalties or bad words (its sampler reads the ids just sampled).
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections import deque
from typing import Any, Protocol

from pagedllm.config import EngineConfig
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.scheduler import EngineCoreOutput, Scheduler
from pagedllm.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.engine.stats import SchedulerStats


class Executor(Protocol):
    def determine_num_blocks(self) -> int: ...

    def initialize_cache(self, num_blocks: int) -> None: ...

    def launch_model(self, scheduler_output: SchedulerOutput) -> Any:
        """Starts a step without waiting for its results; `collect_output` returns them."""
        ...

    def collect_output(self, handle: Any) -> ModelRunnerOutput: ...

    def shutdown(self) -> None: ...


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor) -> None:
        self.config = config
        self.executor = executor
        self.num_blocks = executor.determine_num_blocks()
        executor.initialize_cache(self.num_blocks)
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config, self.num_blocks)
        # When each request not scheduled yet arrived (time.monotonic()).
        self._arrival_times: dict[str, float] = {}
        # Seconds each request first scheduled by the last step() had waited in the queue.
        self.step_queue_times: dict[str, float] = {}
        self.async_scheduling = config.async_scheduling
        # Launched steps whose results are not collected yet (at most two, oldest first).
        self._in_flight: deque[tuple[SchedulerOutput, Any]] = deque()
        # NOTE: start-up's objects (the model, its modules and tensors, graphs, tokenizer) never
        # die: frozen, the collector stops scanning them in every full collection while serving.
        gc.collect()
        gc.freeze()

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)
        self._arrival_times[request.request_id] = time.monotonic()

    def abort_requests(self, request_ids: list[str]) -> None:
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """Ends requests from outside the step (an abort, or a stop string seen by the output
        processor): no further tokens are computed for them."""
        self.scheduler.finish_requests(request_ids, status)
        for req_id in request_ids:
            self._arrival_times.pop(req_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._in_flight)

    def step(self) -> list[EngineCoreOutput]:
        overlap = self.async_scheduling and not self.scheduler.num_history_reqs
        outputs = [] if overlap else self._collect_all()
        launched = False
        if self.scheduler.has_unfinished_requests():
            scheduler_output = self.scheduler.schedule()
            self._record_queue_times(scheduler_output)
            if not scheduler_output.is_empty:
                handle = self.executor.launch_model(scheduler_output)
                self._in_flight.append((scheduler_output, handle))
                launched = True
            elif scheduler_output.finished_req_ids or scheduler_output.preempted_req_ids:
                # Let the worker drop ended and preempted requests even when nothing runs (a
                # preemption can schedule nothing when the others' tokens in flight end them).
                self.executor.launch_model(scheduler_output)
        if self._in_flight and (not overlap or not launched or len(self._in_flight) > 1):
            outputs += self._collect_oldest()
        return outputs

    def _collect_oldest(self) -> list[EngineCoreOutput]:
        scheduler_output, handle = self._in_flight.popleft()
        runner_output = self.executor.collect_output(handle)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def _collect_all(self) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        while self._in_flight:
            outputs += self._collect_oldest()
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

    def shutdown(self) -> None:
        self._in_flight.clear()
        self.executor.shutdown()
        gc.unfreeze()  # NOTE: what start-up froze may be collected again (and at exit)
