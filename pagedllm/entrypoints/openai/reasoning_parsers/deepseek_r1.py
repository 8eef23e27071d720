"""DeepSeek-R1 style reasoning: `<think>` (optional) reasoning `</think>` answer.

    <think>
    The user wants 2+2. That is 4.
    </think>

    2 + 2 = 4.

The chat templates of R1 (and QwQ, Qwen3-Thinking-2507, ...) put `<think>` in the prompt, so the
output often starts right with the reasoning: everything before `</think>` is reasoning (an
opening `<think>`, if the model wrote one, is dropped), everything after is content. An output
without `</think>` is all reasoning (the model was cut short while thinking).
"""

from __future__ import annotations

from pagedllm.entrypoints.openai.reasoning_parsers.base import ReasoningParser, opening_think


class DeepSeekR1ReasoningParser(ReasoningParser):
    def _start(self, text: str, final: bool) -> tuple[str, int] | None:
        after = opening_think(text, self.start_token, final)
        if after is None:
            return None
        return "reasoning", max(after, 0)
