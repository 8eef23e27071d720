"""Tool calls and reasoning in chat completions: from the request's `tools` / `tool_choice` to a
mode, and from each choice's text to `reasoning_content`, `content` and `tool_calls`.

Modes (`resolve_tools`):
- "none": no tools, or `tool_choice="none"` (the template still sees the tools, as vLLM's);
- "auto": the model may call tools in its own syntax, which `--tool-call-parser` reads (needs
  `--enable-auto-tool-choice`; an implicit choice falls back to "none" without it);
- "required" / "named": a grammar from the tools' parameter schemas (`tool_parsers.schema`)
  makes the output a valid call, whatever the model: a JSON array of `{"name", "parameters"}`
  for "required", the named function's arguments object for "named".

`ChoiceParser` turns one choice's text into the message parts, whole (`whole`) or as stream
deltas (`stream`, then `finish`): the reasoning parser (`--reasoning-parser`) first splits off
the `<think>` part, then the tool mode reads the content. Streamed "named" calls send the
function's name first, then the arguments as they are generated; "required" calls are sent
when the output is complete (each one's name, then its arguments), as the auto parsers do.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.reasoning_parsers import ReasoningParser
from pagedllm.entrypoints.openai.tool_parsers import ToolParser
from pagedllm.entrypoints.openai.tool_parsers.base import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    make_tool_call_id,
)
from pagedllm.entrypoints.openai.tool_parsers.schema import (
    parse_required_output,
    tool_choice_schema,
    validate_tools,
)

# Parsers whose markers are special tokens: their outputs keep special tokens in the text.
KEEP_SPECIAL_TOKENS = frozenset({"mistral", "llama3_json"})


@dataclass
class ToolSetup:
    mode: str  # "none", "auto", "required" or "named"
    name: str | None = None  # the named function
    schema: dict[str, Any] | None = None  # the grammar's JSON schema (required, named)
    parser_cls: type[ToolParser] | None = None  # auto
    tools: list[dict[str, Any]] | None = None


def resolve_tools(
    tools: list[dict[str, Any]] | None,
    tool_choice: Any,
    parallel_tool_calls: bool | None,
    auto_parser: type[ToolParser] | None,
) -> ToolSetup:
    """The request's tool mode; OpenAIError (400, naming the field) for an invalid one.
    `auto_parser`: the server's `--tool-call-parser` class when `--enable-auto-tool-choice`."""
    try:
        validate_tools(tools, tool_choice)
    except ValueError as e:
        message = str(e)
        raise OpenAIError(message, param=message.split(":", 1)[0].split("[", 1)[0]) from e
    if not tools or tool_choice == "none":
        return ToolSetup("none", tools=tools or None)
    if tool_choice is None or tool_choice == "auto":
        if auto_parser is None:
            if tool_choice == "auto":
                raise OpenAIError(
                    'tool_choice "auto" needs the server started with --enable-auto-tool-choice '
                    "and --tool-call-parser",
                    param="tool_choice",
                )
            return ToolSetup("none", tools=tools)  # NOTE: no parser: the model answers in text
        return ToolSetup("auto", parser_cls=auto_parser, tools=tools)
    schema = tool_choice_schema(tools, tool_choice, parallel_tool_calls is not False)
    if tool_choice == "required":
        return ToolSetup("required", schema=schema, tools=tools)
    return ToolSetup("named", name=tool_choice["function"]["name"], schema=schema, tools=tools)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant `tool_calls` with their arguments as objects, as chat templates expect
    (transformers' convention; the API carries them as JSON strings). A 400 naming `messages`
    for a call not in OpenAI's shape."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls:
            message = dict(message)
            message["tool_calls"] = [_template_call(c) for c in calls]
        out.append(message)
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise OpenAIError(
            'an assistant\'s tool_calls must be {"id", "type": "function", '
            '"function": {"name": string, "arguments": JSON text}}',
            param="messages",
        )
    function = dict(function)
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        # NOTE: text that is not JSON stays as it is: a template may print it so.
        with contextlib.suppress(ValueError):
            function["arguments"] = json.loads(arguments)
    return {**call, "function": function}


@dataclass
class ParsedMessage:
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


class ChoiceParser:
    """One choice's output → message parts (see the module's docstring); one per choice."""

    def __init__(self, setup: ToolSetup, reasoning_cls: type[ReasoningParser] | None) -> None:
        self.setup = setup
        self.reasoner = reasoning_cls() if reasoning_cls is not None else None
        self.tool_parser = (
            setup.parser_cls(tools=setup.tools) if setup.parser_cls is not None else None
        )
        self.text = ""
        self.content = ""  # the content part streamed so far (the reasoning split off)
        self.num_calls = 0  # tool calls sent
        self._named_id: str | None = None

    @property
    def tools_called(self) -> bool:
        return self.num_calls > 0

    # ----- whole outputs -----

    def whole(self, text: str, complete: bool) -> ParsedMessage:
        """The message of a finished output; `complete`: it ended by itself (not cut by
        max_tokens), so a required or named call must parse."""
        reasoning: str | None = None
        content: str | None = text
        if self.reasoner is not None:
            reasoning, content = self.reasoner.extract_reasoning(text)
        mode = self.setup.mode
        if mode == "auto" and content:
            assert self.tool_parser is not None
            found = self.tool_parser.extract_tool_calls(content)
            if found.tools_called:
                self.num_calls = len(found.tool_calls)
                return ParsedMessage(found.content, reasoning, found.tool_calls)
        if mode in ("required", "named") and content is not None:
            calls = self._forced_calls(content, complete)
            if calls is not None:
                self.num_calls = len(calls)
                tool_calls = [ToolCall(make_tool_call_id(), c) for c in calls]
                return ParsedMessage(None, reasoning, tool_calls)
        return ParsedMessage(content, reasoning)

    def _forced_calls(self, content: str, complete: bool) -> list[FunctionCall] | None:
        """The calls of a required / named output (None: it does not parse, e.g. cut short)."""
        if self.setup.mode == "named":
            assert self.setup.name is not None
            if complete:
                return [FunctionCall(self.setup.name, content.strip())]
            try:
                parse_required_output(content, self.setup.name)
            except ValueError:
                return None
            return [FunctionCall(self.setup.name, content.strip())]
        try:
            return parse_required_output(content)
        except ValueError:
            return None

    # ----- streams -----

    def stream(self, delta_text: str) -> DeltaMessage | None:
        """What to send for the next chunk of text (None: nothing yet)."""
        previous = self.text
        self.text += delta_text
        if self.reasoner is None:
            return self._content(delta_text)
        split = self.reasoner.extract_reasoning_streaming(previous, self.text, delta_text)
        if split is None:
            return None
        out = self._content(split.content) if split.content else None
        if split.reasoning_content:
            out = out or DeltaMessage()
            out.reasoning_content = split.reasoning_content
        return out

    def finish(self, complete: bool) -> DeltaMessage | None:
        """What the parsers held back, once the output has ended."""
        out = DeltaMessage()
        if self.reasoner is not None:
            rest = self.reasoner.finish_streaming()
            if rest is not None:
                out.reasoning_content = rest.reasoning_content
                if rest.content:
                    _merge(out, self._content(rest.content))
        mode = self.setup.mode
        if mode == "auto" and self.tool_parser is not None:
            _merge(out, self._counted(self.tool_parser.finish_streaming()))
        elif mode == "required":
            calls = self._forced_calls(self.content, complete)
            if calls is None:
                out.content = (out.content or "") + self.content or None
            else:
                for call in calls:
                    out.tool_calls += _call_deltas(self.num_calls, make_tool_call_id(), call)
                    self.num_calls += 1
        empty = out.content is None and out.reasoning_content is None and not out.tool_calls
        return None if empty else out

    def _content(self, delta: str) -> DeltaMessage | None:
        """The content part's chunk, through the tool mode."""
        previous = self.content
        self.content += delta
        mode = self.setup.mode
        if mode == "auto":
            assert self.tool_parser is not None
            return self._counted(
                self.tool_parser.extract_tool_calls_streaming(previous, self.content, delta)
            )
        if mode == "required":
            return None  # NOTE: sent whole by `finish`
        if mode == "named":
            if not delta:
                return None
            function = DeltaFunctionCall(arguments=delta)
            call = DeltaToolCall(index=0, function=function)
            if self._named_id is None:
                self._named_id = make_tool_call_id()
                self.num_calls = 1
                call.id, call.type = self._named_id, "function"
                function.name = self.setup.name
            return DeltaMessage(tool_calls=[call])
        return DeltaMessage(content=delta) if delta else None

    def _counted(self, delta: DeltaMessage | None) -> DeltaMessage | None:
        if delta is not None:
            self.num_calls = max(self.num_calls, *(c.index + 1 for c in delta.tool_calls), 0)
        return delta


def _call_deltas(index: int, call_id: str, call: FunctionCall) -> list[DeltaToolCall]:
    """A whole call as OpenAI's deltas: the id and name first, then the arguments."""
    return [
        DeltaToolCall(index, call_id, "function", DeltaFunctionCall(call.name, "")),
        DeltaToolCall(index, function=DeltaFunctionCall(arguments=call.arguments)),
    ]


def _merge(into: DeltaMessage, other: DeltaMessage | None) -> None:
    if other is None:
        return
    if other.content:
        into.content = (into.content or "") + other.content
    if other.reasoning_content:
        into.reasoning_content = (into.reasoning_content or "") + other.reasoning_content
    into.tool_calls += other.tool_calls


def join_deltas(a: DeltaMessage | None, b: DeltaMessage | None) -> DeltaMessage | None:
    """`a` then `b` as one delta (either may be None)."""
    if a is None or b is None:
        return a or b
    _merge(a, b)
    return a
