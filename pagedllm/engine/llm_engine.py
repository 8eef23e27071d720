"""LLMEngine: the synchronous engine behind `LLM`: input processing, EngineCore, output processing.

A request with n > 1 is fanned out into n child requests ("{i}_{request_id}", as vLLM V1), each
sampling one continuation; the output processor gathers them back into one `RequestOutput`. With
prefix caching on, the children share the prompt's full KV blocks: the first child publishes them
when they are allocated, so the others (even those admitted in the same step) hit them and compute
only the prompt's last partial block. With prefix caching off, each child computes the whole prompt
(vLLM does the same). Seeded children get seeds seed, seed + 1, ... (wrapped at 2**64), so
their samples differ.
"""

from __future__ import annotations

import logging
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.engine.core import EngineCore, Executor
from pagedllm.engine.output_processor import OutputProcessor, ParentRequest, RequestState
from pagedllm.engine.processor import Processor, PromptType
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.stats import PrefixCacheStats, SchedulerStats
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams, child_seed
from pagedllm.transformers_utils.tokenizer import get_tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        self.config = config
        self.tokenizer = get_tokenizer(config.model_config.tokenizer)
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
        output_kind: RequestOutputKind | None = None,
    ) -> None:
        """Validates and queues one request; bad input raises ValueError and changes nothing.
        Which outputs `step` reports for it: `output_kind` if given (the caller's params are left
        unchanged), else `params.output_kind`."""
        for request in prepare_request(
            self.processor, self.output_processor, request_id, prompt, params, output_kind
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
        return self.engine_core.scheduler.get_num_unfinished_requests()

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.engine_core.scheduler.kv_cache_manager.prefix_cache_stats

    def get_stats(self) -> SchedulerStats:
        return self.engine_core.make_stats()

    def reset_prefix_cache(self) -> bool:
        return self.engine_core.scheduler.kv_cache_manager.reset_prefix_cache()


def prepare_request(
    processor: Processor,
    output_processor: OutputProcessor,
    request_id: str,
    prompt: PromptType,
    params: SamplingParams,
    output_kind: RequestOutputKind | None = None,
) -> list[Request]:
    """Validates one user request, registers its output state(s) and returns the engine-core
    requests to queue: the request itself, or its n children if n > 1.

    Shared by `LLMEngine` and `AsyncLLM`. Bad input raises ValueError before anything is
    registered. `output_kind`, if given, overrides `params.output_kind` (params left unchanged).
    """
    if not isinstance(request_id, str):
        raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
    if request_id in output_processor.states or request_id in output_processor.parents:
        raise ValueError(f"request id {request_id!r} is already in the engine")
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
    if output_kind is not None and output_kind != params.output_kind:
        params = params.clone()
        params.output_kind = output_kind
    if params.n == 1:
        text, request = processor.process(request_id, prompt, params)
        output_processor.add_request(
            RequestState(request_id, text, request.prompt_token_ids, request.sampling_params)
        )
        return [request]
    children: list[tuple[str | None, Request]] = []
    for index in range(params.n):
        child_params = params.clone()
        child_params.n = 1
        if params.seed is not None:
            child_params.seed = child_seed(params.seed, index)
        if index > 0:
            # NOTE: only the first child computes prompt logprobs (and so skips the cache).
            child_params.prompt_logprobs = None
        if children:  # the prompt is tokenized once
            text, first = children[0]
            prompt = {"prompt": text, "prompt_token_ids": first.prompt_token_ids}
        children.append(processor.process(f"{index}_{request_id}", prompt, child_params))
    text, first = children[0]
    parent = ParentRequest(
        request_id,
        text,
        first.prompt_token_ids,
        params.output_kind,
        [r.request_id for _, r in children],
    )
    for index, (_, request) in enumerate(children):
        output_processor.add_request(
            RequestState(
                request.request_id,
                text,
                request.prompt_token_ids,
                request.sampling_params,
                parent=parent,
                index=index,
            )
        )
    return [request for _, request in children]
