"""Output processing: engine-core outputs → `RequestOutput`s (detokenized, with logprob sums)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.scheduler import EngineCoreOutput
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import SamplingParams


class RequestOutputKind(enum.Enum):
    CUMULATIVE = enum.auto()  # every step: everything so far
    DELTA = enum.auto()  # every step: only what is new
    FINAL_ONLY = enum.auto()  # once, when finished


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    output_kind: RequestOutputKind
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    num_sent_tokens: int = 0
    text: str = ""
    num_cached_tokens: int = 0


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add_request(self, state: RequestState) -> None:
        self.states[state.request_id] = state

    def abort_requests(self, request_ids: list[str]) -> None:
        for req_id in request_ids:
            self.states.pop(req_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.states)

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> list[RequestOutput]:
        results = []
        for out in outputs:
            state = self.states.get(out.request_id)
            if state is None:
                continue
            state.token_ids.extend(out.new_token_ids)
            state.num_cached_tokens = out.num_cached_tokens
            if out.new_logprobs:
                state.cumulative_logprob += sum(out.new_logprobs)
            if out.finished:
                del self.states[out.request_id]
            elif state.output_kind == RequestOutputKind.FINAL_ONLY:
                continue
            results.append(self._make_output(state, out))
        return results

    def _decode(self, token_ids: list[int], params: SamplingParams) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)

    def _make_output(self, state: RequestState, out: EngineCoreOutput) -> RequestOutput:
        delta = state.output_kind == RequestOutputKind.DELTA
        token_ids = state.token_ids[state.num_sent_tokens :] if delta else list(state.token_ids)
        state.num_sent_tokens = len(state.token_ids)
        text = self._decode(state.token_ids, state.params)
        new_text = text[len(state.text) :] if delta else text
        state.text = text
        completion = CompletionOutput(
            index=0,
            text=new_text,
            token_ids=token_ids,
            cumulative_logprob=state.cumulative_logprob,
            finish_reason=str(out.finish_reason) if out.finish_reason is not None else None,
            stop_reason=out.stop_reason,
        )
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=[completion],
            finished=out.finished,
            num_cached_tokens=state.num_cached_tokens,
        )
