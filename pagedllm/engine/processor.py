"""Input processing: a prompt (text, token ids, or a dict of either) → a validated `Request`."""

from __future__ import annotations

from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.engine.request import Request
from pagedllm.sampling_params import SamplingParams, is_valid_text

PromptType = str | list[int] | dict[str, Any]


class Processor:
    def __init__(self, config: EngineConfig, tokenizer: Any | None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = config.model_config.vocab_size
        self.max_model_len = config.model_config.max_model_len
        self.limits = config.request_limits

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """The prompt's text (if it had one) and its token ids."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._check_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "text prompts need a tokenizer; this engine has none: pass token ids"
                )
            if not is_valid_text(prompt):
                raise ValueError("prompt is not valid Unicode (it holds a lone surrogate)")
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, (list, tuple)):
            return None, self._check_ids(prompt)
        raise ValueError(
            f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}"
        )

    def _check_ids(self, ids: Any) -> list[int]:
        # NOTE: the set of types and min/max run in C: a per-id Python check cost ~0.5 ms for a
        # 1k-token prompt (256 of them delayed T1's first step by ~0.1 s).
        if not isinstance(ids, (list, tuple)) or not (
            set(map(type, ids)) <= {int}
            or all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
        ):
            raise ValueError("prompt_token_ids must be a list of integers")
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            raise ValueError(
                f"prompt_token_ids hold ids outside the vocabulary (size {self.vocab_size}): {bad[:5]}"
            )
        return list(ids)

    def process(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival_order: int | None = None,
    ) -> tuple[str | None, Request]:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        params.verify_for_engine(self.limits)
        if (params.stop or params.bad_words) and self.tokenizer is None:
            raise ValueError("stop strings and bad_words need a tokenizer; this engine has none")
        if params.bad_words:
            params.bad_words_token_ids = self._bad_words_token_ids(params.bad_words)
        text, ids = self.tokenize(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len}: "
                f"it must be shorter, to leave room for at least one generated token"
            )
        request = Request(
            request_id=request_id,
            prompt_token_ids=ids,
            sampling_params=params,
            eos_token_ids=self.config.model_config.eos_token_ids,
            max_model_len=self.max_model_len,
        )
        return text, request

    def _bad_words_token_ids(self, bad_words: list[str]) -> list[list[int]]:
        """Each bad word's token ids, alone and after a space (vLLM's rule: the spaced form
        counts when it tokenizes to as many tokens and starts differently)."""
        assert self.tokenizer is not None
        result: list[list[int]] = []
        for word in bad_words:
            plain = list(self.tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = list(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            result.append(plain)
            if spaced[0] != plain[0] and len(spaced) == len(plain):
                result.append(spaced)
        for ids in result:
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise ValueError(f"bad_words tokenize to ids outside the vocabulary: {ids}")
        return result
