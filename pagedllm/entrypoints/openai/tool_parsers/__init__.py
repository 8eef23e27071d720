"""Tool-call parsers: turn a model's raw output into OpenAI `tool_calls` and `content`.

`get_tool_parser(name)` gives the class for `--tool-call-parser NAME`; make one instance per
response (per choice): `parser = cls(tokenizer, tools=request_tools)`. Then either
`parser.extract_tool_calls(output)` for a whole output, or `parser.extract_tool_calls_streaming(
previous_text, current_text, delta_text)` for each new chunk and `parser.finish_streaming()` once
the output is complete. See `base` for the shared rules; `schema` has the JSON schemas that
enforce `tool_choice="required"` or a named function.
"""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.base import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ExtractedToolCalls,
    FunctionCall,
    ToolCall,
    ToolParser,
    make_tool_call_id,
)
from pagedllm.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from pagedllm.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from pagedllm.entrypoints.openai.tool_parsers.mistral import MistralToolParser
from pagedllm.entrypoints.openai.tool_parsers.pythonic import PythonicToolParser
from pagedllm.entrypoints.openai.tool_parsers.qwen3_xml import Qwen3XMLToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "mistral": MistralToolParser,
    "pythonic": PythonicToolParser,
    "qwen3_coder": Qwen3XMLToolParser,
    "qwen3_xml": Qwen3XMLToolParser,
}


def get_tool_parser(name: str) -> type[ToolParser]:
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        known = ", ".join(sorted(TOOL_PARSERS))
        raise ValueError(f"unknown tool call parser {name!r}; known: {known}") from None


__all__ = [
    "TOOL_PARSERS",
    "DeltaFunctionCall",
    "DeltaMessage",
    "DeltaToolCall",
    "ExtractedToolCalls",
    "FunctionCall",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "MistralToolParser",
    "PythonicToolParser",
    "Qwen3XMLToolParser",
    "ToolCall",
    "ToolParser",
    "get_tool_parser",
    "make_tool_call_id",
]
