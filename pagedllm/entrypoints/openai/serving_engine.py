"""What the completion and chat handlers share: the served model's names, the request checks
(the engine's input processor's own: prompt ids, context length, SamplingParams), logprobs in
OpenAI's two shapes, server-sent events, and merging several request streams into one.

Everything a request can get wrong is checked here, before it reaches the engine, so a stream
fails with an HTTP 400 rather than after its 200 headers. The checks are the input processor's,
run once: the engine gets a `CheckedInput` and does not run them again; what it still refuses
(ValueError) becomes an error event inside the stream.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from pagedllm.engine.exceptions import EngineDeadError
from pagedllm.engine.input_processor import PromptTooLongError
from pagedllm.entrypoints.openai.errors import OpenAIError, error_body, to_openai_error
from pagedllm.entrypoints.openai.protocol import (
    ChatLogProb,
    ChatLogProbs,
    ChatLogProbsContent,
    CompletionLogProbs,
    PromptLogprob,
    PromptLogprobsOut,
)
from pagedllm.outputs import CompletionOutput, Logprob, PromptLogprobs, SampleLogprobs
from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams

T = TypeVar("T")

# JSON has no -inf: a token the model rules out gets this logprob instead (as vLLM does).
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class ServingConfig:
    """The server's own settings (the engine's live in its EngineConfig)."""

    served_model_names: tuple[str, ...]
    model_path: str
    chat_template: str | None = None
    # max_tokens for a request that omits it (None: all the room the context leaves, as vLLM;
    # the model's generation config may set one too: the smaller wins).
    default_max_tokens: int | None = None
    # Limits on one request (the engine's own, such as max_n, are in its EngineConfig).
    max_request_body_bytes: int = 16 * 2**20
    max_prompts: int = 2048  # prompts in one /v1/completions request
    max_messages: int = 2048  # messages in one chat
    # Back-pressure: past this many requests waiting in the engine, new ones get a 503 with
    # Retry-After (None: no bound).
    max_num_waiting: int | None = None
    # Seconds a request may take, streams included, before it is aborted (None: no limit).
    request_timeout: float | None = None
    # With an API key: whether /metrics stays open to scrapers without it.
    metrics_unauthenticated: bool = False
    # CORS: the origins allowed (None: no CORS headers at all).
    allowed_origins: tuple[str, ...] | None = None
    # Whether a request may bring its own chat template (Jinja runs in the tokenizer thread:
    # an untrusted template could loop for ever there). vLLM's --trust-request-chat-template.
    trust_request_chat_template: bool = False
    # Tool calling: tool_choice "auto" reads the model's own call syntax with this parser.
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(data: str) -> str:
    return f"data: {data}\n\n"


SSE_DONE = sse("[DONE]")


def sse_error(exc: BaseException) -> str:
    """An error that happens after a stream's 200 headers: one event carrying the error body."""
    err = to_openai_error(exc)
    return sse(error_body(err.message, err.status, err.param, err.code).model_dump_json())


def nothing_to_send(text: str, out: CompletionOutput, wants_logprobs: bool) -> bool:
    """A streamed step with no text and no finish: only new tokens whose text waits for more
    bytes (part of a character); worth a chunk only for their logprobs."""
    return not text and out.finish_reason is None and not (wants_logprobs and out.token_ids)


class OpenAIServing:
    def __init__(self, engine: Any, config: ServingConfig) -> None:
        self.engine = engine
        self.config = config
        self.input_processor = engine.input_processor
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len: int = self.model_config.max_model_len
        # The generation config's defaults for the sampling fields a request leaves out.
        self.sampling_defaults: dict[str, Any] = dict(self.model_config.sampling_defaults)
        self.model_name = config.served_model_names[0]
        from pagedllm.entrypoints.openai.reasoning_parsers import get_reasoning_parser
        from pagedllm.entrypoints.openai.tool_parsers import get_tool_parser

        self.auto_tool_parser = None
        if config.enable_auto_tool_choice and config.tool_call_parser is not None:
            self.auto_tool_parser = get_tool_parser(config.tool_call_parser)
        reasoning = getattr(engine.config, "reasoning_parser", None)
        self.reasoning_parser_cls = get_reasoning_parser(reasoning) if reasoning else None

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the engine's tokenizer thread (tokenizing, chat templates): never on
        the event loop's thread, where a huge prompt would stall every stream."""
        result: T = await self.engine.run_off_loop(fn, *args)
        return result

    # ----- checks -----

    def check_capacity(self, num_requests: int) -> None:
        """Back-pressure: a 503 with Retry-After when the engine's queue is full."""
        limit = self.config.max_num_waiting
        if limit is None:
            return
        if num_requests > limit:  # NOTE: it could never be admitted: the client's fault
            raise OpenAIError(
                f"the request asks for {num_requests} samples (prompts x n); this server takes "
                f"at most {limit} at once",
                param="n",
            )
        waiting = self.engine.num_waiting_requests()
        if waiting + num_requests > limit:
            raise OpenAIError(
                f"the server is overloaded: {waiting} requests are waiting (the limit is "
                f"{limit}); retry later",
                503,
                code="server_overloaded",
                headers={"Retry-After": "1"},
            )
        self.engine.reserve(num_requests)

    def check_count(self, items: Sequence[Any], limit: int, param: str) -> None:
        if len(items) > limit:
            raise OpenAIError(
                f"{param} holds {len(items)} items; this server takes at most {limit}", param=param
            )

    def check_model(self, name: str | None) -> None:
        """The request's model must be one of the served names (none given: the first)."""
        if name is not None and name not in self.config.served_model_names:
            raise OpenAIError(
                f"The model `{name}` does not exist. This server serves: "
                f"{', '.join(self.config.served_model_names)}",
                404,
                param="model",
                code="model_not_found",
            )

    def check_engine(self) -> None:
        """A dead engine fails the request at once, with a 503 rather than a broken stream."""
        if self.engine.errored:
            raise EngineDeadError("the engine process is gone")

    def need_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise OpenAIError(f"{what} needs a tokenizer; this server's model has none")
        return self.tokenizer

    def check_token_ids(self, ids: Sequence[int], param: str) -> list[int]:
        """The ids as a list: not empty, inside the vocabulary (else a 400 naming `param`)."""
        try:
            return self.input_processor.check_prompt_ids(ids, param)
        except ValueError as e:
            raise OpenAIError(str(e), param=param) from e

    def max_tokens_for(
        self, prompt_len: int, requested: int | None, param: str, max_tokens_param: str
    ) -> int:
        """How many tokens the request may generate: what it asked for, which must fit in the
        room the context leaves (else a 400, as vLLM and OpenAI answer); when it did not ask,
        the default (`--default-max-tokens`, the generation config's), at most that room."""
        try:
            room = self.input_processor.check_prompt_len(prompt_len)
        except PromptTooLongError as e:
            raise OpenAIError(
                f"This model's maximum context length is {e.max_model_len} tokens, but the "
                f"prompt has {e.num_tokens} tokens; it must be shorter, to leave room for at "
                f"least one generated token.",
                param=param,
                code="context_length_exceeded",
            ) from e
        if requested is None:
            defaults = (self.config.default_max_tokens, self.sampling_defaults.get("max_tokens"))
            return min([room, *(d for d in defaults if d is not None)])
        if requested > room:
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
                f"{requested} in the completion): {max_tokens_param} must be at most {room}.",
                param=max_tokens_param,
                code="context_length_exceeded",
            )
        return requested

    def sampling_params(
        self,
        request: Any,
        max_tokens: int,
        structured_outputs: StructuredOutputsParams | None = None,
        structured_source: str | None = None,
    ) -> SamplingParams:
        """The request's SamplingParams (with `structured_outputs`, if given, as its constraint:
        its errors name `structured_source`),
        checked by the engine's input processor: the engine's own copy, for a `CheckedInput` (with ids that passed `check_token_ids` and
        `max_tokens_for`), which the engine runs without checking again."""
        if request.stream and request.prompt_logprobs is not None:
            raise OpenAIError(
                "prompt_logprobs is not supported with stream=true", param="prompt_logprobs"
            )
        fields = tuple(type(request).model_fields)
        try:
            params: SamplingParams = request.to_sampling_params(max_tokens, self.sampling_defaults)
            if structured_outputs is not None:  # the tools' grammar (tool_choice)
                params.structured_outputs = structured_outputs
            return self.input_processor.check_params(params)
        except ValueError as e:
            source = request.structured_outputs_source
            if structured_outputs is not None:
                source = structured_source
            if source is not None and str(e).startswith("structured_outputs"):
                # NOTE: the engine's check names its own field; the client used `source`.
                message = str(e) if source == "structured_outputs" else f"{source}: {e}"
                raise OpenAIError(message, param=source) from e
            raise to_openai_error(e, fields) from e

    # ----- logprobs -----

    def _token_text(self, token_id: int, logprob: Logprob | None) -> str:
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return str(self.tokenizer.decode([token_id]))

    def completion_logprobs(
        self,
        token_ids: Sequence[int],
        entries: SampleLogprobs | PromptLogprobs,
        text_offset: int,
    ) -> CompletionLogProbs:
        """The legacy completions shape: per token its text, logprob, the sampled token and the
        top-N as {text: logprob}, and where its text starts in the choice's text."""
        out = CompletionLogProbs()
        for token_id, entry in zip(token_ids, entries):
            chosen = entry.get(token_id) if entry is not None else None
            text = self._token_text(token_id, chosen)
            out.tokens.append(text)
            out.text_offset.append(text_offset)
            text_offset += len(text)
            if entry is None or chosen is None:  # the first prompt token has no logprob
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(max(chosen.logprob, MIN_LOGPROB))
            top: dict[str, float] = {}
            for t, lp in sorted(entry.items(), key=lambda kv: _rank(kv[1])):
                # NOTE: tokens with the same text (pieces of one character) share a key: the
                # best one keeps it.
                top.setdefault(self._token_text(t, lp), max(lp.logprob, MIN_LOGPROB))
            out.top_logprobs.append(top)
        return out

    def prompt_logprobs(
        self, request: Any, entries: PromptLogprobs | None
    ) -> PromptLogprobsOut | None:
        """vLLM's `prompt_logprobs` field, when the request asked for it."""
        if request.prompt_logprobs is None or entries is None:
            return None
        return [
            None
            if entry is None
            else {
                t: PromptLogprob(
                    logprob=max(lp.logprob, MIN_LOGPROB),
                    rank=lp.rank,
                    decoded_token=self._token_text(t, lp),
                )
                for t, lp in entry.items()
            }
            for entry in entries
        ]

    def chat_logprobs(
        self, token_ids: Sequence[int], entries: SampleLogprobs, num_top: int
    ) -> ChatLogProbs:
        """The chat shape: per token its text, logprob and UTF-8 bytes, and exactly the top
        `num_top` candidates by rank."""
        content = []
        for token_id, entry in zip(token_ids, entries):
            chosen = entry[token_id]
            top = sorted(
                ((t, lp) for t, lp in entry.items() if _rank(lp) <= num_top),
                key=lambda kv: _rank(kv[1]),
            )
            content.append(
                ChatLogProbsContent(
                    **self._chat_logprob(token_id, chosen).model_dump(),
                    top_logprobs=[self._chat_logprob(t, lp) for t, lp in top],
                )
            )
        return ChatLogProbs(content=content)

    def _chat_logprob(self, token_id: int, lp: Logprob) -> ChatLogProb:
        text = self._token_text(token_id, lp)
        return ChatLogProb(
            token=text, logprob=max(lp.logprob, MIN_LOGPROB), bytes=list(text.encode("utf-8"))
        )


def _rank(lp: Logprob) -> float:
    return float("inf") if lp.rank is None else lp.rank


async def collect_final(gen: AsyncGenerator[T, None]) -> T | None:
    """The last item of a stream (its only one for FINAL_ONLY outputs); closing it whatever
    happens, so a cancelled caller aborts the request in the engine."""
    last = None
    async with aclosing(gen):
        async for item in gen:
            last = item
    return last


async def gather_or_cancel(*coros: Any) -> list[Any]:
    """asyncio.gather that, when one fails or the caller is cancelled, cancels the others and
    waits for them (so their requests are aborted) before raising."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def merge_async_iterators(
    *iterators: AsyncGenerator[T, None],
) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, tagged with their stream's index. Closing the
    merged stream closes every input (each aborts its request)."""
    if len(iterators) == 1:
        async with aclosing(iterators[0]) as only:
            async for item in only:
                yield 0, item
        return
    pending = {asyncio.ensure_future(anext(it)): i for i, it in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    item = fut.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(iterators[i]))] = i
                yield i, item
    finally:
        for fut in pending:
            fut.cancel()
        # NOTE: a generator cannot be closed while a cancelled __anext__ still runs in it.
        await asyncio.gather(*pending, return_exceptions=True)
        for it in iterators:
            await it.aclose()
