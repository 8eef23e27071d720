"""LLMEngine: the synchronous engine behind `LLM`: input processing, EngineCore, output processing,
all in the caller's process (input_processor.py has the checks and the n > 1 fan-out)."""

from __future__ import annotations

import logging
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.engine.core import EngineCore, Executor
from pagedllm.engine.dp import DPEngineCores
from pagedllm.engine.input_processor import (
    CheckedInput,
    InputProcessor,
    PromptType,
    prepare_request,
)
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.request import RequestStatus
from pagedllm.engine.stats import PrefixCacheStats, SchedulerStats
from pagedllm.executor import executor_class
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.transformers_utils.tokenizer import get_tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        self.config = config
        self.tokenizer = get_tokenizer(config.model_config.tokenizer)
        self.input_processor = InputProcessor(config, self.tokenizer)
        self.engine_core: EngineCore | DPEngineCores
        if config.parallel_config.data_parallel_size > 1 and executor is None:
            self.engine_core = DPEngineCores(config)
        else:
            if executor is None:
                executor = executor_class(config)(config)
            self.engine_core = EngineCore(config, executor)
        self.output_processor = OutputProcessor(self.tokenizer)

    @classmethod
    def from_engine_args(cls, engine_args: Any) -> LLMEngine:
        return cls(engine_args.create_engine_config())

    def add_request(
        self,
        request_id: str,
        prompt: PromptType | CheckedInput,
        params: SamplingParams | None,
        output_kind: RequestOutputKind | None = None,
    ) -> None:
        """Checks and queues one request; bad input raises ValueError and changes nothing.
        Which outputs `step` reports for it: `output_kind` if given, else `params.output_kind`
        (the caller's params are never changed). A `CheckedInput` comes with its params (None)."""
        for request in prepare_request(
            self.input_processor, self.output_processor, request_id, prompt, params, output_kind
        ):
            self.engine_core.add_request(request)

    def abort_request(self, request_ids: list[str]) -> None:
        core_ids = [c for r in request_ids for c in self.output_processor.child_ids(r)]
        self.engine_core.abort_requests(core_ids)
        self.output_processor.abort_requests(request_ids)

    def step(self) -> list[RequestOutput]:
        """Runs one engine step; returns the outputs it produced (per each request's output_kind)."""
        processed = self.output_processor.process_outputs(self.engine_core.step())
        if processed.reqs_to_stop:
            self.engine_core.finish_requests(processed.reqs_to_stop, RequestStatus.FINISHED_STOPPED)
        outputs = processed.request_outputs
        for core_id, why in processed.failed:
            # NOTE: ended in the core, and reported as finished with finish reason "error".
            self.engine_core.abort_requests([core_id])
            failed = self.output_processor.fail(core_id, why)
            if failed is not None:
                outputs.append(failed)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.engine_core.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.engine_core.num_unfinished_requests()

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.engine_core.prefix_cache_stats

    def get_stats(self) -> SchedulerStats:
        return self.engine_core.make_stats()

    def reset_prefix_cache(self) -> bool:
        return self.engine_core.reset_prefix_cache()
