"""Pythonic tool calls (Llama 3.2, Llama 4): a Python list of calls with keyword arguments.

    [get_weather(city="Paris", unit="c"), get_time(tz="Europe/Paris")]

The list must open the output (after whitespace and an optional `<|python_start|>` or
`<|python_tag|>`; a `<|python_end|>` after it is dropped). It is read with `ast`, never run:
each element is a call of a (dotted) name with keyword arguments only, whose values are literals:
strings, numbers, `True`/`False`/`None` (JSON's `true`/`false`/`null` too), and lists, tuples
and dicts of those (dict keys are strings). Anything else, or text that is not valid Python, is
plain content: the whole output. The text after the list is content.
"""

from __future__ import annotations

import ast
import math
import re
from typing import Any

from pagedllm.entrypoints.openai.tool_parsers.base import (
    Event,
    FunctionCall,
    ToolParser,
    arguments_json,
    partial_marker_len,
    skip_ws,
)

START_TAGS = ("<|python_start|>", "<|python_tag|>")
END_TAG = "<|python_end|>"
_CALLS_START = re.compile(r"\[\s*[A-Za-z_][\w.]*\s*\(")
_CALLS_START_PARTIAL = re.compile(r"(?:\[\s*(?:[A-Za-z_][\w.]*\s*)?)?")  # may become one
_JSON_NAMES = {"true": True, "false": False, "null": None}


class PythonicToolParser(ToolParser):
    def _reset_scan(self) -> None:
        self._mode = "start"  # then "after" (the list was read) or "content"

    def _scan(self, text: str, final: bool) -> tuple[list[Event], int]:
        if self._mode == "start":
            return self._scan_start(text, final)
        if self._mode == "after":
            return self._scan_after(text, 0, final)
        return [text], len(text)

    def _scan_after(self, text: str, pos: int, final: bool) -> tuple[list[Event], int]:
        """After the list, from `pos`: an optional end tag, then content."""
        p = skip_ws(text, pos)
        if not final and p + partial_marker_len(text[p:], END_TAG) == len(text):
            return [], pos
        if text.startswith(END_TAG, p):
            pos = p + len(END_TAG)
        self._mode = "content"
        return [text[pos:]], len(text)

    def _scan_start(self, text: str, final: bool) -> tuple[list[Event], int]:
        p = skip_ws(text, 0)
        for tag in START_TAGS:
            if text.startswith(tag, p):
                p = skip_ws(text, p + len(tag))
                break
        else:
            if not final and any(tag.startswith(text[p:]) for tag in START_TAGS):
                return [], 0
        if _CALLS_START.match(text, p) is None:
            if not final and _CALLS_START_PARTIAL.fullmatch(text, p):
                return [], 0
            self._mode = "content"
            return [text], len(text)
        end = self._find_closing(text, p, quotes="\"'")
        if end is None and not final:
            return [], 0
        calls = None if end is None else parse_calls(text[p:end])
        if end is None or calls is None:
            self._mode = "content"
            return [text], len(text)
        self._mode = "after"
        events, used = self._scan_after(text, end, final)
        return [*calls, *events], used


def parse_calls(source: str) -> list[FunctionCall] | None:
    """The calls of a pythonic call list, or None if `source` is not one."""
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = _dotted_name(node.func)
        if name is None:
            return None
        arguments: dict[str, Any] = {}
        for keyword in node.keywords:
            if keyword.arg is None:  # **kwargs
                return None
            value = _literal(keyword.value)
            if value is _INVALID:
                return None
            arguments[keyword.arg] = value
        calls.append(FunctionCall(name, arguments_json(arguments)))
    return calls


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


_INVALID = object()


def _literal(node: ast.expr) -> Any:
    """The JSON value of a literal expression, or `_INVALID`."""
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, (str, bool, int)):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        return _INVALID
    if isinstance(node, ast.Name):
        return _JSON_NAMES.get(node.id, _INVALID)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _literal(node.operand)
        if isinstance(operand, bool) or not isinstance(operand, (int, float)):
            return _INVALID
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(item) for item in node.elts]
        return _INVALID if any(item is _INVALID for item in items) else items
    if isinstance(node, ast.Dict):
        result: dict[str, Any] = {}
        for key, item in zip(node.keys, node.values):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                return _INVALID
            value = _literal(item)
            if value is _INVALID:
                return _INVALID
            result[key.value] = value
        return result
    return _INVALID
