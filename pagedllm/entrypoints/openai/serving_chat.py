"""POST /v1/chat/completions: the conversation (with its tools, tool calls and tool answers) is
rendered through the chat template (the same function `LLM.chat` uses), then sampled `n` times;
each choice's text becomes `reasoning_content`, `content` and `tool_calls` (chat_tools.py).
Text-only: content parts other than text are refused with a 400 rather than silently ignored."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from pagedllm.engine.input_processor import CheckedInput, render_chat
from pagedllm.entrypoints.openai.chat_tools import (
    KEEP_SPECIAL_TOKENS,
    ChoiceParser,
    ToolSetup,
    join_deltas,
    resolve_tools,
    template_messages,
)
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatLogProbs,
    ChatMessage,
    ChatResponseMessage,
    DeltaFunctionCallOut,
    DeltaMessage,
    DeltaToolCallOut,
    FunctionCallOut,
    ToolCallOut,
    usage,
)
from pagedllm.entrypoints.openai.serving_engine import (
    SSE_DONE,
    OpenAIServing,
    collect_final,
    nothing_to_send,
    random_id,
    sse,
    sse_error,
)
from pagedllm.outputs import CompletionOutput, RequestOutput
from pagedllm.sampling_params import StructuredOutputsParams

ROLE = "assistant"


def message_dict(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it: content a string (text parts joined)."""
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError(
                    f"only text content parts are supported, got {part.get('type')!r}",
                    param="messages",
                )
            texts.append(part["text"])
        content = "\n".join(texts)
    out: dict[str, Any] = {"role": message.role, "content": content or ""}
    for key in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
        value = getattr(message, key)
        if value is not None:
            out[key] = value
    return out


class OpenAIServingChat(OpenAIServing):
    def render(
        self,
        messages: list[ChatMessage],
        chat_template: str | None,
        add_generation_prompt: bool,
        continue_final_message: bool,
        chat_template_kwargs: dict[str, Any] | None,
        tools: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The conversation → {"prompt": text, "prompt_token_ids": ids}; template errors are 400s."""
        if not messages:
            raise OpenAIError("messages must not be empty", param="messages")
        if chat_template is not None and not self.config.trust_request_chat_template:
            raise OpenAIError(
                "chat_template in a request is refused: the server must be started with "
                "--trust-request-chat-template",
                param="chat_template",
            )
        self.check_count(messages, self.config.max_messages, "messages")
        conversation = template_messages([message_dict(m) for m in messages])
        tokenizer = self.need_tokenizer("chat")
        try:
            return render_chat(
                tokenizer,
                conversation,
                chat_template or self.config.chat_template,
                add_generation_prompt,
                continue_final_message,
                chat_template_kwargs,
                tools,
            )
        except Exception as e:  # jinja2 errors (raise_exception in templates), bad kwargs
            raise OpenAIError(f"could not apply the chat template: {e}", param="messages") from e

    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        self.check_model(request.model)
        self.check_engine()
        self._check_unsupported(request)
        setup = resolve_tools(
            request.tools, request.tool_choice, request.parallel_tool_calls, self.auto_tool_parser
        )
        if setup.schema is not None and request.structured_outputs_source is not None:
            raise OpenAIError(
                f"tool_choice {request.tool_choice!r} and {request.structured_outputs_source} "
                "both constrain the output: give one",
                param="tool_choice",
            )
        prompt = await self.off_loop(
            self.render,
            request.messages,
            request.chat_template,
            request.add_generation_prompt,
            request.continue_final_message,
            request.chat_template_kwargs,
            setup.tools,
        )
        ids = self.check_token_ids(prompt["prompt_token_ids"], "messages")
        max_tokens = self.max_tokens_for(
            len(ids),
            request.requested_max_tokens,
            "messages",
            "max_tokens" if request.max_completion_tokens is None else "max_completion_tokens",
        )
        structured = None
        if setup.schema is not None:
            structured = StructuredOutputsParams(json=setup.schema)
        params = self.sampling_params(request, max_tokens, structured, "tools")
        if setup.mode == "auto" and self.config.tool_call_parser in KEEP_SPECIAL_TOKENS:
            params.skip_special_tokens = False  # NOTE: the parser reads its special markers
        last = request.messages[-1]
        echo = ""
        if request.echo and last.role == ROLE:
            echo = message_dict(last)["content"]
        self.check_capacity(request.n or 1)
        request_id = random_id("chatcmpl")
        gen = self.engine.generate(CheckedInput(prompt["prompt"], ids, params), None, request_id)
        if request.stream:
            return self._stream(request, request_id, len(ids), echo, gen, setup)
        final = await collect_final(gen)
        if final is None:
            raise OpenAIError("the engine returned no output", 500)
        return self._response(request, request_id, echo, final, setup)

    def _parser(self, setup: ToolSetup) -> ChoiceParser:
        return ChoiceParser(setup, self.reasoning_parser_cls)

    def _check_unsupported(self, request: ChatCompletionRequest) -> None:
        if request.top_logprobs is not None and not request.logprobs:
            raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")

    def _logprobs(
        self, request: ChatCompletionRequest, out: CompletionOutput
    ) -> ChatLogProbs | None:
        if not request.logprobs:
            return None
        return self.chat_logprobs(out.token_ids, out.logprobs or [], request.top_logprobs or 0)

    def _response(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        echo: str,
        final: RequestOutput,
        setup: ToolSetup,
    ) -> ChatCompletionResponse:
        outputs = sorted(final.outputs, key=lambda o: o.index)
        choices = []
        for out in outputs:
            parser = self._parser(setup)
            parsed = parser.whole(out.text, complete=out.finish_reason == "stop")
            content = parsed.content
            if echo:
                content = echo + (content or "")
            message = ChatResponseMessage(
                role=ROLE,
                content=content,
                reasoning_content=parsed.reasoning_content,
                tool_calls=[
                    ToolCallOut(id=c.id, function=FunctionCallOut(**vars(c.function)))
                    for c in parsed.tool_calls
                ],
            )
            choices.append(
                ChatCompletionResponseChoice(
                    index=out.index,
                    message=message,
                    logprobs=self._logprobs(request, out),
                    finish_reason=_finish_reason(out.finish_reason, parser),
                    stop_reason=out.stop_reason,
                )
            )
        num_generated = sum(len(o.token_ids) for o in outputs)
        return ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=choices,
            usage=usage(len(final.prompt_token_ids), num_generated),
            prompt_logprobs=self.prompt_logprobs(request, final.prompt_logprobs),
        )

    async def _stream(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        num_prompt_tokens: int,
        echo: str,
        gen: Any,
        setup: ToolSetup,
    ) -> AsyncIterator[str]:
        created = int(time.time())
        parsers: dict[int, ChoiceParser] = {}

        def chunk(choices: list[ChatCompletionStreamChoice], usage_info: Any = None) -> str:
            body = ChatCompletionStreamResponse(
                id=request_id, created=created, model=self.model_name, choices=choices
            )
            body.usage = usage_info
            return sse(body.model_dump_json())

        num_generated = 0
        try:
            # The role first, for every choice (with the echoed text, if any), as OpenAI does.
            for index in range(request.n or 1):
                first = DeltaMessage(role=ROLE, content=echo)
                yield chunk([ChatCompletionStreamChoice(index=index, delta=first)])
            async with aclosing(gen):
                async for res in gen:
                    for out in res.outputs:
                        num_generated += len(out.token_ids)
                        parser = parsers.get(out.index)
                        if parser is None:
                            parser = parsers[out.index] = self._parser(setup)
                        parts = parser.stream(out.text) if out.text else None
                        if out.finish_reason is not None:
                            parts = join_deltas(parts, parser.finish(out.finish_reason == "stop"))
                        delta = _delta_out(parts)
                        empty = delta is None or not (
                            delta.content or delta.reasoning_content or delta.tool_calls
                        )
                        if empty and nothing_to_send("", out, bool(request.logprobs)):
                            continue
                        choice = ChatCompletionStreamChoice(
                            index=out.index,
                            delta=delta or DeltaMessage(),
                            logprobs=self._logprobs(request, out),
                            finish_reason=_finish_reason(out.finish_reason, parser),
                            stop_reason=out.stop_reason,
                        )
                        yield chunk([choice])
            if request.include_usage_in_stream:
                yield chunk([], usage(num_prompt_tokens, num_generated))
        except Exception as e:
            yield sse_error(e)
        yield SSE_DONE


def _finish_reason(reason: str | None, parser: ChoiceParser) -> str | None:
    """ "tool_calls" for an output that ended by itself with calls (as OpenAI)."""
    return "tool_calls" if reason == "stop" and parser.tools_called else reason


def _delta_out(delta: Any) -> DeltaMessage | None:
    """chat_tools' delta as the response's."""
    if delta is None:
        return None
    calls = [
        DeltaToolCallOut(
            index=c.index,
            id=c.id,
            type=c.type,
            function=None if c.function is None else DeltaFunctionCallOut(**vars(c.function)),
        )
        for c in delta.tool_calls
    ]
    return DeltaMessage(
        content=delta.content, reasoning_content=delta.reasoning_content, tool_calls=calls
    )
