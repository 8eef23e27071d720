"""Qwen3-Coder tool calls (registered as `qwen3_xml` and `qwen3_coder`): XML-like blocks.

    Let me check.
    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

One function per `<tool_call>` block; the text outside the blocks is content. A parameter's value
is the text between its tags, less one newline at each end. Values are strings, unless the
request's tools (the `tools=` argument: OpenAI tool dicts) give that parameter a JSON type other
than "string" (integer, number, boolean, null, object, array, as `type`, a list of types, or the
`type`s of an `anyOf`/`oneOf`): then the value is JSON-decoded (`True`/`False`/`None` are
accepted for booleans and null), and stays a string if it does not decode. A missing
`</parameter>` ends at the next `<parameter=` or `</function>`. A block without a complete
`<function=NAME>...</function>` (an output cut short, say) is content, as written.
"""

from __future__ import annotations

import re
from typing import Any

from pagedllm.entrypoints.openai.tool_parsers.base import (
    FunctionCall,
    MarkedToolParser,
    arguments_json,
    load_json,
)

_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL)


class Qwen3XMLToolParser(MarkedToolParser):
    start_marker = "<tool_call>"
    end_marker = "</tool_call>"

    def __init__(self, tokenizer: Any = None, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tokenizer, tools)
        self._types = _parameter_types(self.tools)

    def _parse_block(self, body: str) -> FunctionCall | None:
        function = _FUNCTION.search(body)
        if function is None or not function.group(1).strip():
            return None
        name = function.group(1).strip()
        types = self._types.get(name, {})
        arguments: dict[str, Any] = {}
        for parameter in _PARAMETER.finditer(function.group(2)):
            key = parameter.group(1).strip()
            value = _trim_newline(parameter.group(2))
            arguments[key] = _convert(value, types.get(key, set()))
        return FunctionCall(name, arguments_json(arguments))


def _trim_newline(value: str) -> str:
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def _convert(value: str, types: set[str]) -> Any:
    if not types or "string" in types:
        return value
    decoded = load_json(value)
    if decoded is not None or value.strip() == "null":
        return decoded
    word = value.strip()
    if "boolean" in types and word in ("True", "False"):
        return word == "True"
    if "null" in types and word == "None":
        return None
    return value


def _parameter_types(tools: list[dict[str, Any]]) -> dict[str, dict[str, set[str]]]:
    """{function name: {parameter: its JSON types}} from OpenAI tool dicts; odd shapes skipped."""
    found: dict[str, dict[str, set[str]]] = {}
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        if not isinstance(properties, dict):
            continue
        found[function["name"]] = {key: _schema_types(schema) for key, schema in properties.items()}
    return found


def _schema_types(schema: Any) -> set[str]:
    if not isinstance(schema, dict):
        return set()
    kind = schema.get("type")
    types = {kind} if isinstance(kind, str) else set()
    if isinstance(kind, list):
        types = {t for t in kind if isinstance(t, str)}
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        for option in options if isinstance(options, list) else []:
            types |= _schema_types(option)
    return types
