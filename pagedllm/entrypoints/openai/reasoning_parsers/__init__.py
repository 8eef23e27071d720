"""Reasoning parsers: split a model's thinking (`reasoning_content`) from its answer (`content`).

`get_reasoning_parser(name)` gives the class for `--reasoning-parser NAME`; make one instance per
response (per choice). `extract_reasoning(output)` for a whole output; for streaming,
`extract_reasoning_streaming(previous_text, current_text, delta_text)` per chunk, then
`finish_streaming()`. `is_reasoning_end(text)` says when the answer has begun. When a tool-call
parser runs too, feed it the accumulated `content` only.
"""

from __future__ import annotations

from pagedllm.entrypoints.openai.reasoning_parsers.base import ReasoningParser
from pagedllm.entrypoints.openai.reasoning_parsers.deepseek_r1 import DeepSeekR1ReasoningParser
from pagedllm.entrypoints.openai.reasoning_parsers.qwen3 import Qwen3ReasoningParser

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "qwen3": Qwen3ReasoningParser,
}


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        known = ", ".join(sorted(REASONING_PARSERS))
        raise ValueError(f"unknown reasoning parser {name!r}; known: {known}") from None


__all__ = [
    "REASONING_PARSERS",
    "DeepSeekR1ReasoningParser",
    "Qwen3ReasoningParser",
    "ReasoningParser",
    "get_reasoning_parser",
]
