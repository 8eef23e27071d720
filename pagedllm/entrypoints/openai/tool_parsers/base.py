"""What the tool-call parsers share: the call and delta shapes, and the streaming machinery.

A parser turns a model's raw output into OpenAI `tool_calls` plus the remaining `content`, both
for a whole output (`extract_tool_calls`) and chunk by chunk (`extract_tool_calls_streaming`,
then `finish_streaming` once the output is complete).

Each parser only writes a *scanner*, `_scan(text, final) -> (events, consumed)`: it reads the
not-yet-consumed tail of the output and returns what it has decided about its beginning, as a
list of events (a `str` of content or a parsed `FunctionCall`) and how many characters those
events cover. With `final=False` it consumes only what no continuation could change (it stops
before a possible start marker or a call that is not complete yet); with `final=True` it consumes
everything (an unfinished or malformed call becomes content). The non-streaming path runs the
same scanner on the whole output with `final=True`, so streaming and non-streaming agree by
construction, whatever the chunking.

Shared rules, in both paths:
- a call is reported only once it is complete and valid; a malformed one is plain content;
- in streaming, a call comes as two deltas in one message: `{index, id, type, function.name,
  function.arguments: ""}` then `{index, function.arguments: <the whole arguments JSON>}`;
- arguments are a JSON object re-serialized with `json.dumps(obj, ensure_ascii=False)`;
- content is the text outside the calls, verbatim, except that the whitespace right after a call
  is dropped, and content that is only whitespace is no content (`None`; in streaming, leading
  whitespace waits until some other character arrives).
"""

from __future__ import annotations

import copy
import json
import logging
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

_ALNUM = string.ascii_letters + string.digits


def random_alnum(length: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def make_tool_call_id() -> str:
    """An OpenAI-style tool call id: `call_` and 24 random letters and digits."""
    return "call_" + random_alnum(24)


@dataclass
class FunctionCall:
    name: str
    arguments: str  # a JSON object, as a string


@dataclass
class ToolCall:
    id: str
    function: FunctionCall
    type: str = "function"


@dataclass
class ExtractedToolCalls:
    tools_called: bool
    tool_calls: list[ToolCall]
    content: str | None


@dataclass
class DeltaFunctionCall:
    name: str | None = None
    arguments: str | None = None


@dataclass
class DeltaToolCall:
    index: int
    id: str | None = None
    type: str | None = None
    function: DeltaFunctionCall | None = None


@dataclass
class DeltaMessage:
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)


Event = str | FunctionCall


# ---- helpers for scanners ----


def partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (0 if none)."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


class _BracketScan:
    """The progress of `find_closing` on one bracket, in absolute offsets: fed a longer text
    later, it goes on where it stopped."""

    def __init__(self, start: int, quotes: str) -> None:
        self.start = start
        self.quotes = quotes
        self.pos = start  # the next character to read
        self.end: int | None = None
        self.depth = 0
        self.quote = ""
        self.escaped = False

    def run(self, text: str, offset: int = 0) -> int | None:
        """Read `text` (whose first character is at `offset`) on from `pos`; the end relative to
        `text`, or None."""
        if self.end is not None:
            return self.end - offset
        for i in range(self.pos - offset, len(text)):
            ch = text[i]
            if self.quote:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == self.quote:
                    self.quote = ""
            elif ch in self.quotes:
                self.quote = ch
            elif ch in "([{":
                self.depth += 1
            elif ch in ")]}":
                self.depth -= 1
                if self.depth <= 0:
                    self.end = offset + i + 1
                    return i + 1
        self.pos = offset + len(text)
        return None


def find_closing(text: str, start: int, quotes: str = '"') -> int | None:
    """Index just past the bracket that closes the one at `text[start]`, or None if the text ends
    first. Brackets inside strings (delimited by any of `quotes`, backslash escapes) don't count.
    All of `([{` / `)]}` count alike: a mismatch is left to the real parser to reject."""
    return _BracketScan(start, quotes).run(text)


def arguments_json(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments, ensure_ascii=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def load_json(text: str) -> Any:
    """`json.loads`, or None for invalid JSON (`NaN` and `Infinity` included, which Python's
    `json` would accept and then write back as invalid JSON)."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None


def call_from_json(obj: Any, strict: bool = False) -> FunctionCall | None:
    """A `FunctionCall` from a decoded `{"name": ..., "arguments" | "parameters": {...}}`, or None
    if `obj` has not that shape. Arguments given as a JSON string of an object are accepted.
    Lenient (the default): arguments may be absent (`{}`) and other keys are ignored. Strict (for
    formats where a call is told from plain JSON content by its shape alone): arguments are
    required and the only other keys allowed are `name` and `type`."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = "arguments" if "arguments" in obj else "parameters"
    if strict and (key not in obj or not set(obj) <= {"name", "type", key}):
        return None
    args = obj.get(key, {})
    if isinstance(args, str):
        args = load_json(args)
    if not isinstance(args, dict):
        return None
    return FunctionCall(obj["name"], arguments_json(args))


# ---- the parsers' base ----


class ToolParser:
    """Base of the tool-call parsers (see the module docstring). One instance per response (per
    choice): streaming keeps state on it. `tools` is the request's list of OpenAI tool dicts,
    for parsers that read the parameters' types from it."""

    _bracket: _BracketScan | None

    def __init__(self, tokenizer: Any = None, tools: list[dict[str, Any]] | None = None) -> None:
        self.tokenizer = tokenizer
        self.tools: list[dict[str, Any]] = list(tools or [])
        self._reset()

    # -- to override --

    def _scan(self, text: str, final: bool) -> tuple[list[Event], int]:
        """Decide about a prefix of `text` (the unconsumed tail of the output); see the module
        docstring. May keep state on `self` (reset in `_reset_scan`)."""
        raise NotImplementedError

    def _reset_scan(self) -> None:
        """Reset the scanner's own state, if it keeps any."""

    def make_id(self) -> str:
        return make_tool_call_id()

    def _find_closing(self, text: str, start: int, quotes: str = '"') -> int | None:
        """`find_closing` for scanners: `text` must be the one `_scan` was given. Resumes the
        previous chunk's progress on the same bracket, so that a long call is read once, not
        once per chunk."""
        at = self._pos + start  # `_scan`'s text starts at `self._pos` of the output
        scan = self._bracket
        if scan is None or scan.start != at or scan.quotes != quotes:
            scan = self._bracket = _BracketScan(at, quotes)
        return scan.run(text, self._pos)

    # -- public API --

    def extract_tool_calls(self, model_output: str) -> ExtractedToolCalls:
        """Parse a complete output. Leaves this instance's streaming state alone."""
        parser = copy.copy(self)
        parser._reset()
        content, calls = parser._advance(model_output, final=True)
        tool_calls = [ToolCall(id=self.make_id(), function=call) for call in calls]
        return ExtractedToolCalls(bool(tool_calls), tool_calls, content or None)

    def extract_tool_calls_streaming(
        self, previous_text: str, current_text: str, delta_text: str
    ) -> DeltaMessage | None:
        """Feed the output so far (`current_text`, which must extend the previous call's); returns
        what to send for it, or None. Only `current_text` is read: when a reasoning parser runs
        first, pass the accumulated *content* text here."""
        return self._delta(*self._advance(current_text, final=False))

    def finish_streaming(self) -> DeltaMessage | None:
        """The output is complete: what was held back (a partial start marker, an unfinished
        call, which becomes content), or None."""
        return self._delta(*self._advance(self._text, final=True))

    # -- machinery --

    def _reset(self) -> None:
        self._text = ""  # the output fed so far
        self._pos = 0  # how much of it the scanner consumed
        self._index = 0  # calls sent so far (streaming)
        self._content_started = False  # some non-whitespace content was sent
        self._held_ws = ""  # leading whitespace of the content, not sent yet
        self._after_call = False  # the whitespace that follows a call is dropped
        self._broken = False  # the scanner raised: the rest is content
        self._bracket = None  # see _find_closing
        self._reset_scan()

    def _advance(self, text: str, final: bool) -> tuple[str, list[FunctionCall]]:
        self._text = text
        rest = text[self._pos :]
        events: list[Event]
        if self._broken:
            events, used = [rest], len(rest)
        else:
            try:
                events, used = self._scan(rest, final)
            except Exception:  # a parser bug must not break the response: the rest is content
                logger.exception("%s failed on the model's output", type(self).__name__)
                self._broken = True
                events, used = [rest], len(rest)
        if final and used < len(rest):
            events.append(rest[used:])
            used = len(rest)
        self._pos += used

        content: list[str] = []
        calls: list[FunctionCall] = []
        for event in events:
            if isinstance(event, FunctionCall):
                calls.append(event)
                self._after_call = True
                self._held_ws = ""
                continue
            if self._after_call:
                event = event.lstrip()
                self._after_call = not event
            if not event:
                continue
            if not self._content_started:
                self._held_ws += event
                if self._held_ws.isspace():
                    continue
                event, self._held_ws = self._held_ws, ""
                self._content_started = True
            content.append(event)
        return "".join(content), calls

    def _delta(self, content: str, calls: list[FunctionCall]) -> DeltaMessage | None:
        if not content and not calls:
            return None
        deltas: list[DeltaToolCall] = []
        for call in calls:
            header = DeltaFunctionCall(name=call.name, arguments="")
            deltas.append(DeltaToolCall(self._index, self.make_id(), "function", header))
            deltas.append(
                DeltaToolCall(self._index, function=DeltaFunctionCall(None, call.arguments))
            )
            self._index += 1
        return DeltaMessage(content=content or None, tool_calls=deltas)


class MarkedToolParser(ToolParser):
    """A parser whose calls sit between a start and an end marker, one call per block:
    `...content...<start>BODY<end>...<start>BODY<end>...`. The body is a JSON call object by
    default (`_parse_block` to change it). The text around the blocks is content; a block that
    does not parse is content too, markers included. A block left open when the output ends is
    parsed as it stands (a model may stop right before the end marker)."""

    start_marker: str = ""
    end_marker: str = ""

    def _parse_block(self, body: str) -> FunctionCall | None:
        return call_from_json(load_json(body))

    def _scan(self, text: str, final: bool) -> tuple[list[Event], int]:
        events: list[Event] = []
        pos = 0
        while True:
            start = text.find(self.start_marker, pos)
            if start < 0:
                keep = 0 if final else partial_marker_len(text[pos:], self.start_marker)
                end = len(text) - keep
                if end > pos:
                    events.append(text[pos:end])
                return events, end
            if start > pos:
                events.append(text[pos:start])
                pos = start
            body_start = start + len(self.start_marker)
            stop = text.find(self.end_marker, body_start)
            if stop < 0:
                if not final:
                    return events, pos
                body, block_end = text[body_start:], len(text)
            else:
                body, block_end = text[body_start:stop], stop + len(self.end_marker)
            call = self._parse_block(body)
            events.append(call if call is not None else text[pos:block_end])
            pos = block_end
