"""Reasoning models and structured output: the grammar applies after the reasoning.

A model configured with a reasoning parser (`--reasoning-parser`) writes its reasoning between
markers (`<think>` … `</think>`) before the answer. Its grammar (if any) is not applied while it
reasons: rows are unmasked and the matcher sees no token until the output holds the end marker's
tokens; from the next token on the grammar constrains the answer.

Whether a request starts inside its reasoning is read from its prompt: the last marker in the
prompt decides (a chat template that ends the prompt with `<think>`, as DeepSeek-R1's, starts
it; one that writes an empty `<think></think>`, as Qwen3's with thinking off, ends it). With no
marker in the prompt:
- deepseek_r1: the output is reasoning until `</think>` (R1 may omit the opening marker);
- qwen3: the output is reasoning only if it opens with `<think>`: the first token may be the
  grammar's or the start marker (when that is one token; else the grammar applies at once).
"""

from __future__ import annotations

from typing import Any

# The markers of each reasoning parser (the server's parsers split the text at the same ones).
REASONING_MARKERS: dict[str, tuple[str, str]] = {
    "deepseek_r1": ("<think>", "</think>"),
    "qwen3": ("<think>", "</think>"),
}


class ReasoningMarkers:
    """A reasoning parser's markers as the tokenizer's token ids."""

    def __init__(self, parser: str, tokenizer: Any) -> None:
        start, end = REASONING_MARKERS[parser]
        self.parser = parser
        self.start_ids = tuple(tokenizer.encode(start, add_special_tokens=False))
        self.end_ids = tuple(tokenizer.encode(end, add_special_tokens=False))

    def initial_state(self, prompt_ids: list[int]) -> str:
        """How output after `prompt_ids` begins: "reasoning", "answer", or "maybe" (its first
        token decides: the start marker, or the grammar's)."""
        last_start = _last_index(prompt_ids, self.start_ids)
        last_end = _last_index(prompt_ids, self.end_ids)
        if last_start > last_end:
            return "reasoning"
        if last_end >= 0:
            return "answer"
        if self.parser == "qwen3":
            return "maybe" if len(self.start_ids) == 1 else "answer"
        return "reasoning"

    def ends_with_end(self, token_ids: list[int]) -> bool:
        """Whether `token_ids` end with the end marker."""
        n = len(self.end_ids)
        return n > 0 and len(token_ids) >= n and tuple(token_ids[-n:]) == self.end_ids


def _last_index(ids: list[int], pattern: tuple[int, ...]) -> int:
    n = len(pattern)
    if n == 0:
        return -1
    first = pattern[0]
    for i in range(len(ids) - n, -1, -1):
        if ids[i] == first and tuple(ids[i : i + n]) == pattern:
            return i
    return -1
