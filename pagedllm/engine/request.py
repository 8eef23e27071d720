"""Request: one sequence's token state and lifecycle, as the scheduler sees it."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from pagedllm.engine.structured_output.request import StructuredOutputRequest
from pagedllm.sampling_params import SamplingParams

_arrival_counter = itertools.count()


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"
    ERROR = "error"  # the engine could not run it (its stop_reason says why)

    def __str__(self) -> str:
        return self.value


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASON.get(self)


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH_CAPPED,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
}
_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH_CAPPED: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


# NOTE: the field metadata serial.py reads: a field marked so stays on its side of the socket.
_CORE_STATE = {"wire": False}


@dataclass(eq=False)
class Request:
    """A sequence: `num_tokens` known tokens, of which `num_computed_tokens` are in the KV cache.

    NOTE: `num_computed_tokens <= num_tokens + num_output_placeholders`; the scheduler hands out
    the difference. A placeholder is a token a step in flight will sample: the next step may
    already compute its K/V (the worker feeds it the id straight from the device).
    """

    # What the client sends the core (serial.py carries every field not marked _CORE_STATE).
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_model_len: int | None = None
    cache_salt: str | None = None
    # The core's own state of it: not sent, the core's constructor starts each one afresh
    # (`arrival_order` is the order requests reach the core).
    arrival_order: int = field(default_factory=lambda: next(_arrival_counter), metadata=_CORE_STATE)
    status: RequestStatus = field(default=RequestStatus.WAITING, metadata=_CORE_STATE)
    num_computed_tokens: int = field(default=0, metadata=_CORE_STATE)
    # Prompt tokens the prefix cache held when it was first scheduled (None until then).
    num_cached_tokens: int | None = field(default=None, metadata=_CORE_STATE)
    num_preemptions: int = field(default=0, metadata=_CORE_STATE)
    # Tokens sampled by steps still in flight (async scheduling): scheduled, ids not known yet.
    num_output_placeholders: int = field(default=0, metadata=_CORE_STATE)
    stop_reason: int | str | None = field(default=None, metadata=_CORE_STATE)
    output_token_ids: list[int] = field(default_factory=list, metadata=_CORE_STATE)
    all_token_ids: list[int] = field(default_factory=list, metadata=_CORE_STATE)
    block_hashes: list[bytes] = field(default_factory=list, metadata=_CORE_STATE)
    # Its grammar, when its output is constrained (set by the StructuredOutputManager).
    structured_output: StructuredOutputRequest | None = field(default=None, metadata=_CORE_STATE)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return len(self.all_token_ids) + self.num_output_placeholders

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_tokens(self) -> int:
        """Output tokens allowed: max_tokens, capped so the sequence fits max_model_len."""
        cap = self.sampling_params.max_tokens
        if self.max_model_len is not None:
            room = self.max_model_len - self.num_prompt_tokens
            cap = room if cap is None else min(cap, room)
        assert cap is not None, "a request needs max_tokens or max_model_len"
        return cap

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def check_stop(self) -> bool:
        """Sets a finished status if the last token ends the request; returns whether it did."""
        if self.num_output_tokens >= self.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        if self.num_output_tokens < self.sampling_params.min_tokens:
            return False
        last = self.output_token_ids[-1]
        if not self.sampling_params.ignore_eos and last in self.eos_token_ids:
            self.status = RequestStatus.FINISHED_STOPPED
            return True
        if last in self.sampling_params.all_stop_token_ids:
            self.status = RequestStatus.FINISHED_STOPPED
            self.stop_reason = last
            return True
        return False
