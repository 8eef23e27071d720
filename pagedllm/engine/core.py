"""EngineCore: the busy loop's body. schedule → execute → update, over a scheduler and an executor."""

from __future__ import annotations

from typing import Protocol

from pagedllm.config import EngineConfig
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.scheduler import EngineCoreOutput, Scheduler
from pagedllm.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput


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

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.abort_requests(request_ids)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """Ends requests from outside the step (a stop string seen by the output processor):
        no further tokens are computed for them."""
        self.scheduler.finish_requests(request_ids, status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            if scheduler_output.finished_req_ids:
                # Let the worker drop ended requests even when nothing runs.
                self.executor.execute_model(scheduler_output)
            return []
        runner_output = self.executor.execute_model(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def shutdown(self) -> None:
        self.executor.shutdown()
