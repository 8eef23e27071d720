"""SamplingParams: vLLM's fields, defaults and validation (plain Python, no torch), and
RequestOutputKind (how often and how much of a request's output the engine reports)."""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field
from typing import Any

_EPS = 1e-5
_MAX_LOGIT_BIAS = 100.0


class RequestOutputKind(enum.Enum):
    CUMULATIVE = enum.auto()  # every step: everything so far
    DELTA = enum.auto()  # every step: only what is new
    FINAL_ONLY = enum.auto()  # once, when finished


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """How to sample one request. Invalid values raise `ValueError` naming the field."""

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Filled here and by the engine: tokens that end the request (stop_token_ids; the processor
    # adds EOS unless ignore_eos), and the token ids of each bad word (the processor fills them).
    all_stop_token_ids: set[int] = field(default_factory=set, init=False, repr=False)
    bad_words_token_ids: list[list[int]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.bad_words = list(self.bad_words or [])
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError) as e:
                raise ValueError(f"logit_bias must map token ids to floats: {e}") from e
        if self.top_k == -1:
            self.top_k = 0
        self._verify()
        if self.temperature < _EPS:
            # NOTE: greedy sampling ignores the filters; normalize so the sampler's fast path sees it.
            self.temperature = 0.0
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        self.all_stop_token_ids = set(self.stop_token_ids)

    def _verify(self) -> None:
        self._verify_numbers()
        self._verify_lengths()
        self._verify_tokens()

    def _bad(self, name: str, why: str) -> ValueError:
        return ValueError(f"{name} {why}, got {getattr(self, name)!r}")

    def _verify_numbers(self) -> None:
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not _is_number(getattr(self, name)):
                raise self._bad(name, "must be a number")
        for name in ("temperature", "top_p", "min_p"):
            if not _is_number(getattr(self, name)):
                raise self._bad(name, "must be a number")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise self._bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise self._bad("frequency_penalty", "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise self._bad("repetition_penalty", "must be in (0, 2]")
        if self.temperature < 0.0:
            raise self._bad("temperature", "must be non-negative")
        if not 0.0 < self.top_p <= 1.0:
            raise self._bad("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise self._bad("top_k", "must be -1 or 0 (off) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise self._bad("min_p", "must be in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            raise self._bad("seed", "must be an integer")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise self._bad("output_kind", "must be a RequestOutputKind")

    def _verify_lengths(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise self._bad("n", "must be at least 1")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise self._bad("max_tokens", "must be at least 1")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise self._bad("min_tokens", "must be a non-negative integer")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise self._bad(name, "must be a non-negative integer")

    def _verify_tokens(self) -> None:
        assert isinstance(self.stop, list) and isinstance(self.stop_token_ids, list)
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise self._bad("stop", "must hold non-empty strings")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise self._bad("stop_token_ids", "must hold non-negative token ids")
        if any(not isinstance(w, str) or w.strip() == "" for w in self.bad_words or []):
            raise self._bad("bad_words", "must hold non-blank strings")
        if self.allowed_token_ids is not None:
            if len(self.allowed_token_ids) == 0:
                raise self._bad("allowed_token_ids", "must not be empty")
            if any(not _is_int(t) or t < 0 for t in self.allowed_token_ids):
                raise self._bad("allowed_token_ids", "must hold non-negative token ids")
        for tok, bias in (self.logit_bias or {}).items():
            if tok < 0 or not -_MAX_LOGIT_BIAS <= bias <= _MAX_LOGIT_BIAS:
                raise self._bad(
                    "logit_bias", f"must map token ids >= 0 to values in [-100, 100] ({tok})"
                )

    def verify_for_engine(self, vocab_size: int, max_logprobs: int) -> None:
        """Checks that need the engine: token ids inside the vocabulary, logprob counts."""
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > max_logprobs:
                raise ValueError(
                    f"{name} must be at most max_logprobs ({max_logprobs}), got {value}"
                )
        fields = {
            "stop_token_ids": self.stop_token_ids or [],
            "allowed_token_ids": self.allowed_token_ids or [],
            "logit_bias": list((self.logit_bias or {}).keys()),
        }
        for name, ids in fields.items():
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(
                    f"{name} holds token ids outside the vocabulary (size {vocab_size}): {bad[:5]}"
                )

    @property
    def needs_token_history(self) -> bool:
        """Whether sampling reads the ids of the tokens sampled before (penalties, bad words):
        then a step cannot be prepared before the previous step's ids reach the host."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.bad_words_token_ids
        )

    def clone(self) -> SamplingParams:
        """A copy whose containers can be changed without touching this one's."""
        new = copy.copy(self)
        for name in _CONTAINER_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(new, name, copy.copy(value))
        return new


_CONTAINER_FIELDS = (
    "stop",
    "stop_token_ids",
    "bad_words",
    "logit_bias",
    "allowed_token_ids",
    "all_stop_token_ids",
    "bad_words_token_ids",
)
