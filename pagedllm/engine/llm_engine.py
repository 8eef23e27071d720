"""LLMEngine: the synchronous engine behind `LLM`: input processing, EngineCore, output processing."""

from __future__ import annotations

import logging
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.engine.core import EngineCore, Executor
from pagedllm.engine.output_processor import OutputProcessor, RequestOutputKind, RequestState
from pagedllm.engine.processor import Processor, PromptType
from pagedllm.engine.stats import PrefixCacheStats, SchedulerStats
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def load_tokenizer(config: EngineConfig) -> Any | None:
    """The HF tokenizer of the model, or None (with a warning) when the model has none."""
    mc = config.model_config
    path = mc.tokenizer
    if path is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        logger.warning("no tokenizer at %s (%s): only token-id prompts will work", path, e)
        return None


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config)
        self.processor = Processor(config, self.tokenizer)
        if executor is None:
            from pagedllm.executor.uniproc import UniProcExecutor

            executor = UniProcExecutor(config)
        self.engine_core = EngineCore(config, executor)
        self.output_processor = OutputProcessor(self.tokenizer)

    @classmethod
    def from_engine_args(cls, engine_args: Any) -> LLMEngine:
        return cls(engine_args.create_engine_config())

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY,
    ) -> None:
        """Validates and queues one request; bad input raises ValueError and changes nothing."""
        text, request = self.processor.process(request_id, prompt, params)
        if request_id in self.output_processor.states:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        self.engine_core.add_request(request)
        self.output_processor.add_request(
            RequestState(
                request_id=request_id,
                prompt=text,
                prompt_token_ids=request.prompt_token_ids,
                params=params,
                output_kind=output_kind,
            )
        )

    def abort_request(self, request_ids: list[str]) -> None:
        self.engine_core.abort_requests(request_ids)
        self.output_processor.abort_requests(request_ids)

    def step(self) -> list[RequestOutput]:
        outputs = self.engine_core.step()
        return self.output_processor.process_outputs(outputs)

    def has_unfinished_requests(self) -> bool:
        return self.engine_core.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.engine_core.scheduler.get_num_unfinished_requests()

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.engine_core.scheduler.kv_cache_manager.prefix_cache_stats

    def get_stats(self) -> SchedulerStats:
        return self.engine_core.scheduler.make_stats()

    def reset_prefix_cache(self) -> bool:
        return self.engine_core.scheduler.kv_cache_manager.reset_prefix_cache()
