"""Hermes 2 Pro / Qwen2.5 / Qwen3 tool calls: one JSON object per `<tool_call>` block.

    I'll look both up.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
    <tool_call>
    {"name": "get_time", "arguments": {"tz": "Europe/Paris"}}
    </tool_call>

The text outside the blocks is content ("I'll look both up.\\n" here). A block whose body is not
a `{"name": str, "arguments": object}` (a JSON string of an object is accepted for the arguments)
is content, as written.
"""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import MarkedToolParser


class HermesToolParser(MarkedToolParser):
    start_marker = "<tool_call>"
    end_marker = "</tool_call>"
