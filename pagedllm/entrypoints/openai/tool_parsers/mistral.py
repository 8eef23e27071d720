"""Mistral tool calls, after the `[TOOL_CALLS]` token, in either of Mistral's two formats:

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": ...}]

(the older tokenizers: one JSON array of call objects), or

    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}

(tokenizer v11 and later: a name, `[ARGS]`, a JSON object; again for each call). The text before
and between them is content; a `[TOOL_CALLS]` followed by anything else is content as written.
Tool call ids are 9 letters and digits, as Mistral's chat templates require.

NOTE: `[TOOL_CALLS]` and `[ARGS]` are special tokens: the server must detokenize the output with
`skip_special_tokens=False` for this parser to see them.
"""

from __future__ import annotations

import re

from pagedllm.entrypoints.openai.tool_parsers.base import (
    Event,
    FunctionCall,
    ToolParser,
    arguments_json,
    call_from_json,
    load_json,
    partial_marker_len,
    random_alnum,
    skip_ws,
)

BOT = "[TOOL_CALLS]"
ARGS = "[ARGS]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


class MistralToolParser(ToolParser):
    def make_id(self) -> str:
        return random_alnum(9)

    def _scan(self, text: str, final: bool) -> tuple[list[Event], int]:
        events: list[Event] = []
        pos = 0
        while True:
            start = text.find(BOT, pos)
            if start < 0:
                end = len(text) - (0 if final else partial_marker_len(text[pos:], BOT))
                if end > pos:
                    events.append(text[pos:end])
                return events, end
            if start > pos:
                events.append(text[pos:start])
                pos = start
            parsed = self._parse_calls(text, start + len(BOT), final)
            if parsed is None:
                return events, pos
            calls, end = parsed
            if calls is None:
                events.append(text[pos:end])
            else:
                events.extend(calls)
            pos = end

    def _parse_calls(
        self, text: str, i: int, final: bool
    ) -> tuple[list[FunctionCall] | None, int] | None:
        """Parse what follows a `[TOOL_CALLS]` that ends at `i`: None while undecided (more text
        may change the answer), else the calls (None: not a call, so content) and where they end."""
        j = skip_ws(text, i)
        if j == len(text):
            return (None, j) if final else None
        if text[j] == "[":  # the JSON array format
            end = self._find_closing(text, j)
            if end is None:
                return (None, len(text)) if final else None
            items = load_json(text[j:end])
            calls = [call_from_json(item) for item in items] if isinstance(items, list) else []
            if not calls or None in calls:
                return None, end
            return [call for call in calls if call is not None], end
        name = _NAME.match(text, i)  # the name[ARGS]{...} format: no space before the name
        if name is None:
            return None, i
        k = name.end()
        if k == len(text) or (not text.startswith(ARGS, k) and ARGS.startswith(text[k:])):
            return (None, len(text)) if final else None
        if not text.startswith(ARGS, k):
            return None, k
        a = skip_ws(text, k + len(ARGS))
        if a == len(text):
            return (None, a) if final else None
        if text[a] != "{":
            return None, a
        end = self._find_closing(text, a)
        if end is None:
            return (None, len(text)) if final else None
        args = load_json(text[a:end])
        if not isinstance(args, dict):
            return None, end
        return [FunctionCall(name.group(), arguments_json(args))], end
