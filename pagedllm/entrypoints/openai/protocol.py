"""The OpenAI API's request and response bodies as pydantic models, plus vLLM's extra fields.

Requests turn into `SamplingParams` here (`to_sampling_params`); range checks stay in
SamplingParams, so the server and the offline API reject the same values with the same words.
Unknown request fields are kept (`extra="allow"`) and logged by the server rather than refused,
as vLLM does, so clients that send newer OpenAI fields still work.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from pagedllm.sampling_params import (
    RequestOutputKind,
    SamplingParams,
    StructuredOutputsParams,
    is_valid_text,
)


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


def _valid_text(value: str) -> str:
    if not is_valid_text(value):
        raise ValueError("must be valid Unicode (it holds a lone UTF-16 surrogate)")
    return value


# NOTE: every string a request carries is one of these: JSON may escape a lone surrogate
# ("\\ud800"), which no tokenizer, socket or response body can encode.
Text = Annotated[str, AfterValidator(_valid_text)]


# ----- errors -----


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ----- shared pieces -----


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


class _SamplingFields(OpenAIBaseModel):
    """Fields both generation endpoints share: OpenAI's, then vLLM's extras.

    NOTE: `None` means "not given"; defaults are applied in `_sampling_kwargs`, so a client that
    sends an explicit `null` gets the default rather than a type error (as with OpenAI).
    """

    model: Text | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = None
    n: int | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: Text | list[Text] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: Text | None = None
    # vLLM's extra sampling fields.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    bad_words: list[Text] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    echo: bool | None = False
    # Structured output: OpenAI's response_format; vLLM's extra body and its older names
    # (guided_decoding_backend and guided_whitespace_pattern are taken and ignored: xgrammar).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Text | dict[str, Any] | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None
    guided_decoding_backend: Text | None = None
    guided_whitespace_pattern: Text | None = None

    @property
    def structured_outputs_source(self) -> str | None:
        """The field that asks for structured output (the one its errors name), if any."""
        given = self._structured_sources()
        return given[0] if given else None

    def _structured_sources(self) -> list[str]:
        given = [
            name for name in ("structured_outputs", *_GUIDED) if getattr(self, name) is not None
        ]
        if (self.response_format or {}).get("type", "text") != "text":
            given.insert(0, "response_format")
        return given

    def structured_outputs_kwargs(self) -> dict[str, Any] | None:
        """The StructuredOutputsParams keywords the request asks for (None: none); ValueError
        (naming the field) for a malformed one or for two at once."""
        given = self._structured_sources()
        if not given:
            return None
        if len(given) > 1:
            raise ValueError(f"{given[1]}: give one of {' and '.join(given)}, not both")
        source = given[0]
        if source == "structured_outputs":
            assert self.structured_outputs is not None
            return dict(self.structured_outputs)
        if source in _GUIDED:
            return {_GUIDED[source]: getattr(self, source)}
        fmt = self.response_format or {}
        kind = fmt.get("type")
        if kind == "json_object":
            return {"json_object": True}
        if kind != "json_schema":
            raise ValueError(
                f"response_format: type must be 'text', 'json_object' or 'json_schema', got "
                f"{kind!r}"
            )
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise ValueError("response_format: json_schema must be an object")
        schema = spec.get("schema")
        if schema is None:
            raise ValueError("response_format: json_schema.schema is missing")
        if not isinstance(schema, dict):
            raise ValueError("response_format: json_schema.schema must be an object")
        return {"json": schema}

    def _sampling_kwargs(self, defaults: dict[str, Any]) -> dict[str, Any]:
        """The SamplingParams keywords: the fields given, else `defaults` (the generation
        config's; max_tokens is decided by the caller)."""
        given: dict[str, Any] = {
            "n": self.n,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "seed": self.seed,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "bad_words": self.bad_words,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "prompt_logprobs": self.prompt_logprobs,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
            "logit_bias": self.logit_bias,
            "allowed_token_ids": self.allowed_token_ids,
        }
        kwargs = {k: v for k, v in defaults.items() if k != "max_tokens"}
        kwargs.update((k, v) for k, v in given.items() if v is not None)
        kwargs["output_kind"] = (
            RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY
        )
        spec = self.structured_outputs_kwargs()
        if spec is not None:
            source = self.structured_outputs_source
            try:
                kwargs["structured_outputs"] = StructuredOutputsParams(**spec)
            except TypeError as e:  # an unknown key of `structured_outputs`
                raise ValueError(f"{source}: {e}") from e
            except ValueError as e:
                raise ValueError(f"{source}: {e}") from e
        return kwargs

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


# The older names of vLLM's structured output, and the StructuredOutputsParams field of each.
_GUIDED = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


# ----- /v1/completions -----

PromptInput = Text | list[Text] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    best_of: int | None = None
    logprobs: int | None = None
    suffix: Text | None = None
    max_tokens: int | None = 16
    add_special_tokens: bool = True

    def to_sampling_params(self, max_tokens: int, defaults: dict[str, Any]) -> SamplingParams:
        kwargs = self._sampling_kwargs(defaults)
        if self.logprobs is not None:
            kwargs["logprobs"] = self.logprobs
            if self.echo:
                kwargs["prompt_logprobs"] = self.logprobs
        return SamplingParams(max_tokens=max_tokens, **kwargs)


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs entry: one candidate token at one prompt position."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per prompt token ({token id: entry}); the first token has none (null).
PromptLogprobsOut = list[dict[int, PromptLogprob] | None]


class CompletionResponseChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobsOut | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None


class CompletionStreamResponse(CompletionResponse):
    pass


# ----- /v1/chat/completions -----


class ChatMessage(OpenAIBaseModel):
    role: Text
    content: Text | list[dict[str, Any]] | None = None
    name: Text | None = None
    # An assistant's calls (OpenAI's shape: id, type, function {name, arguments as JSON text}),
    # and a tool message's answer to one of them.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: Text | None = None
    reasoning_content: Text | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    logprobs: bool | None = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any | None = None
    parallel_tool_calls: bool | None = True
    # vLLM's chat extras.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Text | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens (OpenAI's current name) wins over max_tokens (deprecated)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def to_sampling_params(self, max_tokens: int, defaults: dict[str, Any]) -> SamplingParams:
        kwargs = self._sampling_kwargs(defaults)
        if self.logprobs:
            kwargs["logprobs"] = self.top_logprobs or 0
        return SamplingParams(max_tokens=max_tokens, **kwargs)


class ChatLogProb(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatLogProbs(BaseModel):
    content: list[ChatLogProbsContent] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # a JSON object, as text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo | None = None
    prompt_logprobs: PromptLogprobsOut | None = None


class DeltaFunctionCallOut(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCallOut(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCallOut | None = None


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCallOut] = Field(default_factory=list)


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# ----- models, tokenizer -----


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedllm"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(OpenAIBaseModel):
    """Either `prompt` (text) or `messages` (rendered through the chat template first)."""

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Text | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIBaseModel):
    model: Text | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
