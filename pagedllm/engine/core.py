"""EngineCore: the busy loop's body. schedule → execute → update, over a scheduler and an executor.

It runs in the caller's process under `LLMEngine`, or in its own process under
`EngineCoreProc` (core_proc.py) for `AsyncLLM`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Protocol

from pagedllm.config import EngineConfig
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.scheduler import EngineCoreOutput, Scheduler
from pagedllm.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.engine.stats import SchedulerStats


class Executor(Protocol):
    def determine_num_blocks(self) -> int: ...

    def initialize_cache(self, num_blocks: int) -> None: ...

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

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
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        self._record_queue_times(scheduler_output)
        if scheduler_output.is_empty:
            if scheduler_output.finished_req_ids:
                # Let the worker drop ended requests even when nothing runs.
                self.executor.execute_model(scheduler_output)
            return []
        runner_output = self.executor.execute_model(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

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
        self.executor.shutdown()
