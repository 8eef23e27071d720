"""Incremental detokenization and stop strings, one request at a time.

Each step decodes only a small window of tokens: the tokens already read at the previous step
(for context: SentencePiece drops a leading space at the start of a decode) plus the new ones,
and keeps the part of the text after the context. A window whose text ends in U+FFFD may hold a
character whose bytes are split across tokens: its tokens wait for the next step (or the end of
the request), so a partial character is never emitted.

NOTE: the window only starts where the text so far ends on a whole character, so the text built
step by step equals decoding all the tokens at once.
"""

from __future__ import annotations

from typing import Any

from pagedllm.sampling_params import RequestOutputKind, SamplingParams

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded ahead of the first output token, for its leading space.
_PROMPT_CONTEXT = 4


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, params: SamplingParams, prompt_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.spaces_between_special_tokens = params.spaces_between_special_tokens
        self.stop: list[str] = list(params.stop or [])
        self.include_stop_str_in_output = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        # A fast tokenizer's Rust decoder, called directly where HF's decode adds nothing to it
        # (no clean-up of spaces; fast tokenizers ignore spaces_between_special_tokens).
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        if getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._backend = None
        # NOTE: with nothing to report before the end and no stop string to watch, the text is
        # decoded once, at the end (the same text: decoding is the same window, just longer).
        self._deferred = params.output_kind == RequestOutputKind.FINAL_ONLY and not self.stop
        self.num_output_tokens = 0
        self.output_text = ""
        self._sent_offset = 0
        # The ids decoded so far: a prompt tail for context, then the output tokens.
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        if self._decode(self._ids).endswith(_REPLACEMENT):
            self._ids = []  # the prompt ends mid-character: no clean context to start from
        self._prefix_offset = 0  # window start: the text before it ends on a whole character
        self._read_offset = len(self._ids)  # tokens whose text is in output_text
        self._prefix_text = self._decode(self._ids)

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    def update(self, new_token_ids: list[int], stop_terminated: bool, finished: bool) -> str | None:
        """Adds the step's tokens to the text; returns the stop string they completed, if any
        (then the text is cut at it). `stop_terminated`: the last token is a stop token or EOS,
        whose text is left out unless include_stop_str_in_output."""
        if stop_terminated and not self.include_stop_str_in_output:
            new_token_ids = new_token_ids[:-1]
        self.num_output_tokens += len(new_token_ids)
        self._ids.extend(new_token_ids)
        if self._deferred and not finished:
            return None
        old_len = len(self.output_text)
        self._advance(flush=finished or stop_terminated)
        if not self.stop or self.num_output_tokens <= self.min_tokens:
            return None
        return self._check_stop_strings(len(self.output_text) - old_len)

    def _advance(self, flush: bool) -> None:
        if self._read_offset == len(self._ids):
            return
        text = self._decode(self._ids[self._prefix_offset :])
        if text.endswith(_REPLACEMENT) and not flush:
            return  # maybe a split character: wait for its other bytes
        self.output_text += text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])

    def _check_stop_strings(self, num_new_chars: int) -> str | None:
        """Finds a stop string that ends in the new text; cuts the text at it."""
        for stop in self.stop:
            start = max(len(self.output_text) - num_new_chars - len(stop) + 1, 0)
            index = self.output_text.find(stop, start)
            if index < 0:
                continue
            if self.include_stop_str_in_output:
                index += len(stop)
            self.output_text = self.output_text[:index]
            return stop
        return None

    def _held_back(self) -> int:
        """Characters at the end of the text that may begin a stop string."""
        if not self.stop or self.include_stop_str_in_output:
            return 0
        text = self.output_text
        held = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return held

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """The text to report: all of it, or (delta) what was not reported yet. While the
        request runs, text that may begin a stop string is held back until it is resolved."""
        end = len(self.output_text) - (0 if finished else self._held_back())
        if not delta:
            return self.output_text[:end]
        start = self._sent_offset
        if end <= start:
            return ""
        self._sent_offset = end
        return self.output_text[start:end]
