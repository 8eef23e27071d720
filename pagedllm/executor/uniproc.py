"""The single-process executor: one worker in the engine's own process."""

from __future__ import annotations

from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.worker.worker import Worker


class UniProcExecutor:
    def __init__(self, config: EngineConfig) -> None:
        self.worker = Worker(config)

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)

    def launch_model(self, scheduler_output: SchedulerOutput) -> Any:
        return self.worker.launch_model(scheduler_output)

    def collect_output(self, handle: Any) -> ModelRunnerOutput:
        return self.worker.collect_output(handle)

    def abandon_steps(self) -> None:
        self.worker.abandon_steps()

    def shutdown(self) -> None:
        pass
