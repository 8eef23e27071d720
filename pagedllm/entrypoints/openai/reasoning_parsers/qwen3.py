"""Qwen3 reasoning: `<think>` reasoning `</think>` answer, the `<think>` written by the model.

    <think>
    Okay, the user says hello.
    </think>

    Hello! How can I help?

An output that does not open with `<think>` (after whitespace) is all content: Qwen3 with
thinking disabled (`enable_thinking=False`, where the template puts an empty think block in the
prompt). An output that opens with `<think>` but has no `</think>` is all reasoning (cut short
while thinking), as in streaming, where it was already sent as reasoning. For the Qwen3 models
whose template puts `<think>` in the prompt (Qwen3-*-Thinking-2507), use `deepseek_r1`.
"""

from __future__ import annotations

from pagedllm.entrypoints.openai.reasoning_parsers.base import ReasoningParser, opening_think


class Qwen3ReasoningParser(ReasoningParser):
    def _start(self, text: str, final: bool) -> tuple[str, int] | None:
        after = opening_think(text, self.start_token, final)
        if after is None:
            return None
        return ("reasoning", after) if after >= 0 else ("content", 0)

    def is_reasoning_end(self, text: str) -> bool:
        """Also true once the output has begun with something other than `<think>`."""
        return self.end_token in text or opening_think(text, self.start_token, False) == -1
