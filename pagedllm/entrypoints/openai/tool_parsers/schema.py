"""`tools` / `tool_choice` checks, and the JSON schemas that force a tool call.

With `tool_choice="required"` the server constrains the output to `tool_choice_schema(...)`:

    [{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": ..., "parameters": ...}]

(at least one call; each item one of the tools, its parameters valid for that tool's schema). With
a named choice, `{"type": "function", "function": {"name": "get_weather"}}`, the output is that
tool's arguments object alone. `parse_required_output` turns either back into `FunctionCall`s.
All inputs are plain dicts (the request's JSON), not protocol models.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from pagedllm.entrypoints.openai.tool_parsers.base import FunctionCall, arguments_json

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def validate_tools(tools: Any, tool_choice: Any) -> None:
    """Raise `ValueError` naming the field (`tools` or `tool_choice`) if the pair is invalid."""
    names = _tool_names(tools)
    if tool_choice is None or tool_choice in ("none", "auto"):
        return
    if tool_choice == "required":
        if not names:
            raise ValueError('tool_choice: "required" needs at least one tool in tools')
        return
    if isinstance(tool_choice, str):
        raise ValueError(
            f"tool_choice: unknown value {tool_choice!r}; expected 'none', 'auto', 'required' "
            'or {"type": "function", "function": {"name": ...}}'
        )
    name = _choice_name(tool_choice)
    if not names:
        raise ValueError(f"tool_choice: names the function {name!r} but there are no tools")
    if name not in names:
        raise ValueError(f"tool_choice: the function {name!r} is not among tools")


def tool_choice_schema(
    tools: list[dict[str, Any]] | None, tool_choice: Any, parallel_tool_calls: bool = True
) -> dict[str, Any] | None:
    """The JSON schema the output must follow for `tool_choice`, or None ("none", "auto", None).
    With `parallel_tool_calls=False`, "required" allows one call only. Expects valid input (see
    `validate_tools`)."""
    if tool_choice is None or tool_choice in ("none", "auto"):
        return None
    functions = [tool["function"] for tool in tools or []]
    if tool_choice != "required":
        name = _choice_name(tool_choice)
        for function in functions:
            if function["name"] == name:
                return copy.deepcopy(function.get("parameters") or _ANY_OBJECT)
        raise ValueError(f"tool_choice: the function {name!r} is not among tools")
    defs: dict[str, Any] = {}
    options = []
    for i, function in enumerate(functions):
        parameters = _hoist_defs(function.get("parameters") or _ANY_OBJECT, f"tool{i}.", defs)
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "parameters": parameters},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def parse_required_output(text: str, name: str | None = None) -> list[FunctionCall]:
    """The calls in an output generated under `tool_choice_schema`: pass the function's `name`
    for a named choice (the output is then its arguments). Raises `ValueError` if the text does
    not have that shape (an output cut short by `max_tokens`, say)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"the tool call output is not valid JSON: {e}") from None
    if name is not None:
        if not isinstance(data, dict):
            raise ValueError("the tool call output is not a JSON object")
        return [FunctionCall(name, arguments_json(data))]
    if not isinstance(data, list) or not data:
        raise ValueError("the tool call output is not a non-empty JSON array")
    calls = []
    for item in data:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("name"), str)
            or not isinstance(item.get("parameters"), dict)
        ):
            raise ValueError('each tool call must be {"name": string, "parameters": object}')
        calls.append(FunctionCall(item["name"], arguments_json(item["parameters"])))
    return calls


def _tool_names(tools: Any) -> set[str]:
    if tools is None:
        return set()
    if not isinstance(tools, list):
        raise ValueError("tools: must be an array of tools")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ValueError(f'{where}: must be {{"type": "function", "function": {{...}}}}')
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ValueError(f"{where}.function: must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.function.name: must be a non-empty string")
        if function.get("description") is not None and not isinstance(function["description"], str):
            raise ValueError(f"{where}.function.description: must be a string")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise ValueError(f"{where}.function.parameters: must be a JSON schema object")
        if name in names:
            raise ValueError(f"{where}.function.name: {name!r} is defined twice")
        names.add(name)
    return names


def _choice_name(tool_choice: Any) -> str:
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if (
        not isinstance(tool_choice, dict)
        or tool_choice.get("type") != "function"
        or not isinstance(function, dict)
        or not isinstance(function.get("name"), str)
    ):
        raise ValueError(
            'tool_choice: must be "none", "auto", "required" or '
            '{"type": "function", "function": {"name": string}}'
        )
    return function["name"]


def _hoist_defs(schema: dict[str, Any], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    """A copy of a tool's parameters schema fit to sit inside a bigger one: its `$defs` (or
    `definitions`) move to `defs` under `prefix`-ed names, and its local `$ref`s follow them."""
    schema = copy.deepcopy(schema)
    local: dict[str, Any] = {}
    for key in ("definitions", "$defs"):
        if isinstance(schema.get(key), dict):
            local.update(schema.pop(key))
    renames = {}
    for key in local:
        for old in (f"#/$defs/{key}", f"#/definitions/{key}"):
            renames[old] = f"#/$defs/{prefix}{key}"

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: renames.get(v, v) if k == "$ref" and isinstance(v, str) else rewrite(v)
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [rewrite(item) for item in node]
        return node

    for key, value in local.items():
        defs[prefix + key] = rewrite(value)
    return rewrite(schema)
