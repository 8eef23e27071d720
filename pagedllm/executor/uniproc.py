"""The single-process executor: one worker in the engine's own process."""

from __future__ import annotations

from typing import Any, cast

from pagedllm.config import EngineConfig
from pagedllm.engine.core import StepHandle
from pagedllm.engine.kv_cache_spec import KVCacheSpec
from pagedllm.engine.outputs import GrammarOutput, ModelRunnerOutput, SchedulerOutput
from pagedllm.worker.model_runner import InFlightStep
from pagedllm.worker.worker import Worker


class UniProcExecutor:
    def __init__(self, config: EngineConfig) -> None:
        self.worker = Worker(config)

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def kv_cache_specs(self) -> dict[str, KVCacheSpec]:
        return self.worker.kv_cache_specs

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)

    def warm_up(self) -> None:
        self.worker.warm_up()

    def launch_model(self, scheduler_output: SchedulerOutput) -> StepHandle:
        return self.worker.launch_model(scheduler_output)

    def sample_tokens(self, handle: StepHandle, grammar: GrammarOutput) -> None:
        self.worker.sample_tokens(cast(InFlightStep | None, handle), grammar)

    def bitmask_buffer(self, rows: int, words: int) -> Any:
        return self.worker.model_runner.bitmask_buffer(rows, words)

    def collect_output(self, handle: StepHandle) -> ModelRunnerOutput:
        # NOTE: the handle is what `launch_model` returned: the worker's in-flight step.
        return self.worker.collect_output(cast(InFlightStep | None, handle))

    def abandon_steps(self) -> None:
        self.worker.abandon_steps()

    def shutdown(self) -> None:
        pass
