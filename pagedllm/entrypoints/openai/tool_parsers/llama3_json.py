"""Llama 3.1 / 3.2 JSON tool calls: the whole output is the call(s), no markers around them.

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": ...}

The optional `<|python_tag|>` and leading whitespace are dropped; then come one or more JSON
objects separated by `;`, each exactly `{"name": str, "parameters" | "arguments": object}` (a
`"type": "function"` key is allowed). An output that does not start that way (after the tag) is
all content, unchanged. If a later piece is not such a call, the calls before it stand and the
rest of the output, from that piece on, is content. Since a JSON answer and a call look alike
until the object is complete, an output starting with `{` is held back until its first object
closes.
"""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import (
    Event,
    ToolParser,
    call_from_json,
    load_json,
    skip_ws,
)

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    def _reset_scan(self) -> None:
        self._mode = "start"  # then "calls" (after the first call) or "content"
        self._expect_call = True

    def _scan(self, text: str, final: bool) -> tuple[list[Event], int]:
        if self._mode == "start":
            p = skip_ws(text, 0)
            if text.startswith(PYTHON_TAG, p):
                p = skip_ws(text, p + len(PYTHON_TAG))
            elif PYTHON_TAG.startswith(text[p:]) and not final:
                return [], 0  # only whitespace, or part of the tag, so far
            if p == len(text) and not final:
                return [], 0
            end = self._find_closing(text, p) if text.startswith("{", p) else None
            if end is None and text.startswith("{", p) and not final:
                return [], 0  # wait for the first object to close
            call = None if end is None else call_from_json(load_json(text[p:end]), strict=True)
            if end is None or call is None:
                self._mode = "content"  # all of it, the tag included
                return [text], len(text)
            self._mode, self._expect_call = "calls", False
            events, used = self._scan_calls(text, end, final)
            return [call, *events], used
        if self._mode == "content":
            return [text], len(text)
        return self._scan_calls(text, 0, final)

    def _scan_calls(self, text: str, pos: int, final: bool) -> tuple[list[Event], int]:
        """After the first call, from `pos`: `; {call}` pieces, until something else."""
        events: list[Event] = []
        while True:
            p = skip_ws(text, pos)
            if p == len(text):
                return events, len(text) if final else pos
            if not self._expect_call:
                if text[p] != ";":
                    break
                pos, self._expect_call = p + 1, True
                continue
            end = self._find_closing(text, p) if text[p] == "{" else len(text)
            if end is None:
                if final:
                    break
                return events, pos
            call = call_from_json(load_json(text[p:end]), strict=True)
            if call is None:
                break
            events.append(call)
            pos, self._expect_call = end, False
        self._mode = "content"
        events.append(text[pos:])
        return events, len(text)
