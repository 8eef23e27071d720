"""What the reasoning parsers share: split `<think>...</think>` reasoning from the answer.

Like the tool-call parsers, each parser writes only a scanner (`_scan(text, final)`: the pieces
of `("reasoning" | "content", text)` it has decided at the start of the unconsumed text, and how
many characters they cover); the whole-output path runs it once with `final=True`, the streaming
path chunk by chunk and then once more in `finish_streaming`, so both give the same split.

Whitespace: the reasoning and the content each lose the newlines they start with (the ones right
after `<think>` and `</think>`, which the chat templates of DeepSeek-R1 and Qwen3 write); what is
left is verbatim. An empty part is None. (vLLM keeps those newlines; clients then show a blank
first line.)
"""

from __future__ import annotations

import copy
from typing import Any

from pagedllm.entrypoints.openai.tool_parsers.base import DeltaMessage, partial_marker_len

Piece = tuple[str, str]  # ("reasoning" | "content", text)


class ReasoningParser:
    """Base: one instance per response (per choice); streaming keeps state on it."""

    start_token = "<think>"
    end_token = "</think>"

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self._reset()

    # -- to override --

    def _start(self, text: str, final: bool) -> tuple[str, int] | None:
        """At the start of the output: None while undecided, else the first part ("reasoning"
        or "content") and how many characters to drop (an opening `<think>`)."""
        raise NotImplementedError

    # -- public API --

    def extract_reasoning(self, model_output: str) -> tuple[str | None, str | None]:
        """(reasoning_content, content) of a complete output."""
        parser = copy.copy(self)
        parser._reset()
        reasoning, content = parser._advance(model_output, final=True)
        return reasoning or None, content or None

    def extract_reasoning_streaming(
        self, previous_text: str, current_text: str, delta_text: str
    ) -> DeltaMessage | None:
        """Feed the output so far (`current_text`, which must extend the previous call's)."""
        return self._delta(*self._advance(current_text, final=False))

    def finish_streaming(self) -> DeltaMessage | None:
        """The output is complete: what was held back (a partial `</think>`), or None."""
        return self._delta(*self._advance(self._text, final=True))

    def is_reasoning_end(self, text: str) -> bool:
        """Whether the output so far (`text`, the generated text only) has left the reasoning:
        from then on the server may constrain the output (structured output, tool calls)."""
        return self.end_token in text

    # -- machinery --

    def _reset(self) -> None:
        self._text = ""
        self._pos = 0
        self._part: str | None = None  # None (start), "reasoning" or "content"
        self._started = {"reasoning": False, "content": False}

    def _scan(self, text: str, final: bool) -> tuple[list[Piece], int]:
        pos = 0
        if self._part is None:
            start = self._start(text, final)
            if start is None:
                return [], 0
            self._part, pos = start
        if self._part == "content":
            return [("content", text[pos:])], len(text)
        end = text.find(self.end_token, pos)
        if end < 0:
            stop = len(text) - (0 if final else partial_marker_len(text[pos:], self.end_token))
            return [("reasoning", text[pos:stop])], stop
        self._part = "content"
        after = end + len(self.end_token)
        return [("reasoning", text[pos:end]), ("content", text[after:])], len(text)

    def _advance(self, text: str, final: bool) -> tuple[str, str]:
        self._text = text
        pieces, used = self._scan(text[self._pos :], final)
        self._pos += used
        parts = {"reasoning": "", "content": ""}
        for kind, piece in pieces:
            if not self._started[kind]:
                piece = piece.lstrip("\r\n")
                self._started[kind] = bool(piece)
            parts[kind] += piece
        return parts["reasoning"], parts["content"]

    def _delta(self, reasoning: str, content: str) -> DeltaMessage | None:
        if not reasoning and not content:
            return None
        return DeltaMessage(content=content or None, reasoning_content=reasoning or None)


def opening_think(text: str, token: str, final: bool) -> int | None:
    """Where the text after an opening `token` (after leading whitespace) starts; -1 if the
    output does not open with it; None if it cannot tell yet."""
    p = len(text) - len(text.lstrip())
    if text.startswith(token, p):
        return p + len(token)
    if not final and token.startswith(text[p:]):
        return None
    return -1
