"""Input processing: a prompt (text, token ids, a dict of either, or a chat) and its
SamplingParams → checked engine-core `Request`s, n > 1 fanned out into n children.

Every check of a request lives here, once: the sampling params against the engine's limits
(`check_params`), the prompt's token ids (`check_prompt_ids`) and its length (`check_prompt_len`).
`LLMEngine` and `AsyncLLM` run them all through `check`; the OpenAI server calls each itself
before its stream starts (so that each error is an HTTP 400 naming its field) and hands the
engine a `CheckedInput`, which is not checked again.

NOTE: the caller's SamplingParams are never written to: `check_params` returns the engine's own
copy, with the data derived from it (bad words' token ids) filled in.

A request with n > 1 is fanned out into n child requests ("{i}_{request_id}", as vLLM V1), each
sampling one continuation; the output processor gathers them back into one `RequestOutput`. With
prefix caching on, the children share the prompt's full KV blocks: the first child publishes them
when they are allocated, so the others (even those admitted in the same step) hit them and compute
only the prompt's last partial block. With prefix caching off, each child computes the whole prompt
(vLLM does the same). Seeded children get seeds seed, seed + 1, ... (wrapped at 2**64), so
their samples differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from pagedllm.config import EngineConfig
from pagedllm.engine.output_processor import OutputProcessor, ParentRequest, RequestState
from pagedllm.engine.request import Request
from pagedllm.sampling_params import RequestOutputKind, SamplingParams, child_seed, is_valid_text

PromptType = str | list[int] | dict[str, Any]


class PromptTooLongError(ValueError):
    """The prompt leaves no room for a generated token (the server's 400
    `context_length_exceeded`)."""

    def __init__(self, num_tokens: int, max_model_len: int) -> None:
        self.num_tokens = num_tokens
        self.max_model_len = max_model_len
        super().__init__(
            f"the prompt has {num_tokens} tokens, but max_model_len is {max_model_len}: "
            f"it must be shorter, to leave room for at least one generated token"
        )


@dataclass(frozen=True)
class CheckedInput:
    """A prompt and its sampling params that passed every check of the input processor.

    Made by `InputProcessor.check`, or by a caller that ran each check itself (the server):
    `check_prompt_ids` and `check_prompt_len` on the ids, `check_params` giving the params.
    """

    prompt: str | None  # the text, if the prompt had one
    prompt_token_ids: list[int]
    sampling_params: SamplingParams  # the engine's own copy (see `check_params`)


class InputProcessor:
    def __init__(self, config: EngineConfig, tokenizer: Any | None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size = config.model_config.vocab_size
        self.max_model_len = config.model_config.max_model_len
        self.eos_token_ids = config.model_config.eos_token_ids
        self.limits = config.request_limits

    # ----- the checks -----

    def check_params(
        self, params: SamplingParams, output_kind: RequestOutputKind | None = None
    ) -> SamplingParams:
        """The engine's own copy of valid `params` (with `output_kind`, if given, and the bad
        words' token ids); `params` itself is left unchanged. ValueError names the field."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        params.verify_for_engine(self.limits)
        if (params.stop or params.bad_words) and self.tokenizer is None:
            raise ValueError("stop strings and bad_words need a tokenizer; this engine has none")
        if params.structured_outputs is not None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs needs a tokenizer; this engine has none")
            from pagedllm.engine.structured_output.backends.xgrammar import check

            check(params.structured_outputs)  # NOTE: the spec alone; the core compiles it
        own = params.clone()
        if output_kind is not None:
            own.output_kind = output_kind
        if own.bad_words:
            own.bad_words_token_ids = self._bad_words_token_ids(own.bad_words)
        return own

    def check_prompt_ids(self, ids: Any, name: str = "prompt_token_ids") -> list[int]:
        """`ids` as a list, if it is a non-empty list of ints inside the vocabulary; else a
        ValueError starting with `name`."""
        # NOTE: the set of types and min/max run in C: a per-id Python check cost ~0.5 ms for a
        # 1k-token prompt (256 of them delayed T1's first step by ~0.1 s).
        if not isinstance(ids, (list, tuple)) or not (
            set(map(type, ids)) <= {int}
            or all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
        ):
            raise ValueError(f"{name} must be a list of integers")
        if not ids:
            raise ValueError(f"{name} is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            raise ValueError(
                f"{name} holds token ids outside the vocabulary (size {self.vocab_size}): {bad[:5]}"
            )
        return list(ids)

    def check_prompt_len(self, num_tokens: int) -> int:
        """The room a prompt of `num_tokens` leaves for generated tokens (at least 1, else
        PromptTooLongError)."""
        room = self.max_model_len - num_tokens
        if room < 1:
            raise PromptTooLongError(num_tokens, self.max_model_len)
        return room

    # ----- prompts -----

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """The prompt's text (if it had one) and its checked token ids."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self.check_prompt_ids(prompt["prompt_token_ids"])
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
            return prompt, self.check_prompt_ids(list(self.tokenizer.encode(prompt)), "prompt")
        if isinstance(prompt, (list, tuple)):
            return None, self.check_prompt_ids(prompt)
        raise ValueError(
            f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}"
        )

    def check(
        self,
        prompt: PromptType,
        params: SamplingParams,
        output_kind: RequestOutputKind | None = None,
    ) -> CheckedInput:
        """Every check of one request's input (see `CheckedInput`); ValueError if one fails."""
        own = self.check_params(params, output_kind)
        text, ids = self.tokenize(prompt)
        self.check_prompt_len(len(ids))
        return CheckedInput(text, ids, own)

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

    # ----- requests -----

    def make_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Request:
        """The engine-core request of checked input (no check here)."""
        return Request(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            sampling_params=params,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
        )


def prepare_request(
    processor: InputProcessor,
    output_processor: OutputProcessor,
    request_id: str,
    prompt: PromptType | CheckedInput,
    params: SamplingParams | None,
    output_kind: RequestOutputKind | None = None,
) -> list[Request]:
    """Checks one user request, registers its output state(s) and returns the engine-core
    requests to queue: the request itself, or its n children if n > 1.

    Shared by `LLMEngine` and `AsyncLLM`. Bad input raises ValueError before anything is
    registered. A `CheckedInput` is not checked again (`params` must then be None or its own).
    `output_kind`, if given, overrides the params' (the caller's params are left unchanged).
    """
    if not isinstance(request_id, str):
        raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
    if request_id in output_processor.states or request_id in output_processor.parents:
        raise ValueError(f"request id {request_id!r} is already in the engine")
    if isinstance(prompt, CheckedInput):
        if params is not None and params is not prompt.sampling_params:
            raise ValueError("a CheckedInput carries its own sampling_params: pass None")
        checked = prompt
        own = checked.sampling_params
        if output_kind is not None and output_kind != own.output_kind:
            own = own.clone()
            own.output_kind = output_kind
    else:
        # NOTE: `check_params` refuses anything but SamplingParams (None included).
        checked = processor.check(prompt, cast(SamplingParams, params), output_kind)
        own = checked.sampling_params
    text, ids = checked.prompt, checked.prompt_token_ids
    if own.n == 1:
        request = processor.make_request(request_id, ids, own)
        output_processor.add_request(RequestState(request_id, text, ids, own))
        return [request]
    children: list[Request] = []
    for index in range(own.n):
        child_params = own.clone()
        child_params.n = 1
        if own.seed is not None:
            child_params.seed = child_seed(own.seed, index)
        if index > 0:
            # NOTE: only the first child computes prompt logprobs (and so skips the cache).
            child_params.prompt_logprobs = None
        children.append(processor.make_request(f"{index}_{request_id}", list(ids), child_params))
    parent = ParentRequest(request_id, text, ids, own.output_kind, [r.request_id for r in children])
    for index, request in enumerate(children):
        output_processor.add_request(
            RequestState(
                request.request_id,
                text,
                request.prompt_token_ids,
                request.sampling_params,
                parent=parent,
                index=index,
            )
        )
    return children


def render_chat(
    tokenizer: Any,
    conversation: list[dict[str, Any]],
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One conversation → `{"prompt": text, "prompt_token_ids": ids}` through `tokenizer`'s chat
    template (or `chat_template`), which sees `tools` (OpenAI's tool dicts) if given; shared by
    `LLM.chat` and the OpenAI server.

    NOTE: the template writes any BOS itself, so the text is tokenized without special tokens.
    """
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer; this engine has none")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model has no chat template: pass chat_template=")
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message exclude each other")
    text = tokenizer.apply_chat_template(
        conversation,
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        tokenize=False,
        tools=tools,
        **(chat_template_kwargs or {}),
    )
    if not is_valid_text(text):
        raise ValueError("messages are not valid Unicode (they hold a lone UTF-16 surrogate)")
    return {
        "prompt": text,
        "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False),
    }
