"""SamplingParams: vLLM's fields, defaults and validation (plain Python, no torch), and
RequestOutputKind (how often and how much of a request's output the engine reports)."""

from __future__ import annotations

import copy
import enum
import json as _json
import math
from dataclasses import dataclass, field
from typing import Any

_EPS = 1e-5
_MAX_LOGIT_BIAS = 100.0
# Seeds are 64-bit: torch generators take [-2**63, 2**64), as does the wire format (msgpack).
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1
_INT64_MAX = 2**63 - 1


class RequestOutputKind(enum.Enum):
    CUMULATIVE = enum.auto()  # every step: everything so far
    DELTA = enum.auto()  # every step: only what is new
    FINAL_ONLY = enum.auto()  # once, when finished


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_count(x: Any) -> bool:
    """A non-negative integer that fits the engine's int64 arrays."""
    return _is_int(x) and 0 <= x <= _INT64_MAX


def _is_number(x: Any) -> bool:
    """A finite int or float (NaN and inf are refused: they poison every logit)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def is_valid_text(text: Any) -> bool:
    """A str that is valid Unicode: no lone UTF-16 surrogate (JSON's "\\ud800" decodes to one),
    so it can be encoded to UTF-8 for the tokenizer and the wire."""
    if not isinstance(text, str):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_list(value: Any, name: str) -> list[Any]:
    """A list field given as a list or tuple (None: empty); anything else is a ValueError."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list, got {type(value).__name__}")
    return list(value)


def child_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of an n > 1 request: seed + index, wrapped into the 64-bit
    range (so a seed near 2**64 still gives valid, distinct seeds)."""
    value = seed + index
    return value - 2**64 if value > SEED_MAX else value


@dataclass
class StructuredOutputsParams:
    """A constraint on a request's output (vLLM's names): exactly one of
    - `json`: a JSON schema (a dict, or its JSON text);
    - `regex`: a regular expression the whole output matches;
    - `choice`: the output is one of these strings;
    - `grammar`: an EBNF grammar (GBNF, llama.cpp's notation; the start rule is `root`);
    - `json_object`: any JSON object;
    - `structural_tag`: xgrammar's structural tag (a JSON text).
    The engine masks every token the constraint forbids, so the output is valid by
    construction (unless max_tokens cuts it), and the request ends once the constraint is
    complete. `disable_any_whitespace`: JSON without free whitespace between tokens (compact;
    the default lets the model place whitespace where JSON allows it).

    Here the fields are checked for their types; whether the schema, regex or grammar is valid
    is checked when the engine takes the request (`ValueError` naming the field)."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        where = "structured_outputs"
        kinds = [name for name in _STRUCTURED_KINDS if getattr(self, name) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError(
                f"{where} must set exactly one of {', '.join(_STRUCTURED_KINDS)}; "
                f"got {', '.join(kinds) or 'none'}"
            )
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = _json.loads(self.json)
                except ValueError as e:
                    raise ValueError(f"{where}.json is not valid JSON: {e}") from e
            else:
                schema = self.json
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"{where}.json must be a JSON schema (an object), got {schema!r}")
            if not isinstance(self.json, str):
                try:
                    self.json = _json.dumps(schema, ensure_ascii=False)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{where}.json must be JSON-serializable: {e}") from e
        for name in ("regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and (not is_valid_text(value) or not value.strip()):
                raise ValueError(f"{where}.{name} must be a non-empty, valid Unicode string")
        if self.choice is not None:
            self.choice = _as_list(self.choice, f"{where}.choice")
            if not self.choice or any(not is_valid_text(c) or c == "" for c in self.choice):
                raise ValueError(
                    f"{where}.choice must be a non-empty list of non-empty strings, "
                    f"got {self.choice!r}"
                )
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError(f"{where}.json_object must be a bool")
        if not isinstance(self.disable_any_whitespace, bool):
            raise ValueError(f"{where}.disable_any_whitespace must be a bool")

    @property
    def kind(self) -> str:
        """Which constraint: "json", "regex", "choice", "grammar", "json_object" or
        "structural_tag"."""
        return next(n for n in _STRUCTURED_KINDS if getattr(self, n) not in (None, False))

    @property
    def key(self) -> tuple[str, str, bool]:
        """(kind, spec text, compact): what identifies its compiled grammar."""
        kind = self.kind
        value = getattr(self, kind)
        spec = _json.dumps(value) if kind == "choice" else "" if kind == "json_object" else value
        return kind, spec, self.disable_any_whitespace


_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(frozen=True)
class RequestLimits:
    """What the engine accepts of one request beyond SamplingParams' own ranges."""

    vocab_size: int
    max_logprobs: int = 20
    max_n: int = 128  # OpenAI's limit
    max_stop_strings: int = 64  # stop strings, and bad words, each


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
    # Constrained decoding (JSON schema, regex, choice, grammar): see StructuredOutputsParams.
    structured_outputs: StructuredOutputsParams | None = None
    # Filled here and by the engine: tokens that end the request (stop_token_ids; the processor
    # adds EOS unless ignore_eos), and the token ids of each bad word (the processor fills them).
    all_stop_token_ids: set[int] = field(default_factory=set, init=False, repr=False)
    bad_words_token_ids: list[list[int]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _as_list(self.stop, "stop")
        self.stop_token_ids = _as_list(self.stop_token_ids, "stop_token_ids")
        self.bad_words = _as_list(self.bad_words, "bad_words")
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _as_list(self.allowed_token_ids, "allowed_token_ids")
        if self.logit_bias is not None and not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must be a dict, got {type(self.logit_bias).__name__}")
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, AttributeError, OverflowError) as e:
                raise ValueError(f"logit_bias must map token ids to floats: {e}") from e
        if self.top_k == -1:
            self.top_k = 0
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            if not isinstance(self.structured_outputs, dict):
                raise ValueError("structured_outputs must be a StructuredOutputsParams (or a dict)")
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:  # an unknown key
                raise ValueError(f"structured_outputs: {e}") from e
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
        for name in _FLOAT_FIELDS:
            if not _is_number(getattr(self, name)):
                raise self._bad(name, "must be a finite number")
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
        if self.seed is not None and (
            not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX
        ):
            raise self._bad("seed", "must be a 64-bit integer, in [-2**63, 2**64 - 1]")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise self._bad("output_kind", "must be a RequestOutputKind")

    def _verify_lengths(self) -> None:
        if not _is_count(self.n) or self.n < 1:
            raise self._bad("n", "must be an integer of at least 1")
        if self.max_tokens is not None and (not _is_count(self.max_tokens) or self.max_tokens < 1):
            raise self._bad("max_tokens", "must be an integer of at least 1")
        if not _is_count(self.min_tokens):
            raise self._bad("min_tokens", "must be a non-negative integer")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not _is_count(value):
                raise self._bad(name, "must be a non-negative integer")

    def _verify_tokens(self) -> None:
        assert isinstance(self.stop, list) and isinstance(self.stop_token_ids, list)
        if any(not is_valid_text(s) or s == "" for s in self.stop):
            raise self._bad("stop", "must hold non-empty, valid Unicode strings")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise self._bad("stop_token_ids", "must hold non-negative token ids")
        if any(not is_valid_text(w) or w.strip() == "" for w in self.bad_words or []):
            raise self._bad("bad_words", "must hold non-blank, valid Unicode strings")
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

    def verify_for_engine(self, limits: RequestLimits) -> None:
        """Checks that need the engine: token ids and top_k inside the vocabulary, logprob
        counts, n and list sizes within the engine's limits."""
        if self.n > limits.max_n:
            raise ValueError(f"n must be at most max_n ({limits.max_n}), got {self.n}")
        vocab_size = limits.vocab_size
        if self.top_k > vocab_size:
            raise ValueError(
                f"top_k must be at most the vocabulary size ({vocab_size}), got {self.top_k}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value > limits.max_logprobs:
                raise ValueError(
                    f"{name} must be at most max_logprobs ({limits.max_logprobs}), got {value}"
                )
        for name in ("stop", "bad_words"):
            count = len(getattr(self, name) or [])
            if count > limits.max_stop_strings:
                raise ValueError(
                    f"{name} holds {count} strings; at most max_stop_strings "
                    f"({limits.max_stop_strings})"
                )
        fields = {
            "stop_token_ids": self.stop_token_ids or [],
            "allowed_token_ids": self.allowed_token_ids or [],
            "logit_bias": list((self.logit_bias or {}).keys()),
        }
        for name, ids in fields.items():
            if len(ids) > vocab_size:
                raise ValueError(
                    f"{name} holds {len(ids)} entries, more than the vocabulary's {vocab_size}"
                )
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


_FLOAT_FIELDS = (
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "temperature",
    "top_p",
    "min_p",
)

_CONTAINER_FIELDS = (
    "stop",
    "stop_token_ids",
    "bad_words",
    "logit_bias",
    "allowed_token_ids",
    "all_stop_token_ids",
    "bad_words_token_ids",
)
