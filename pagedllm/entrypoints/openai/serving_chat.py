"""POST /v1/chat/completions: the conversation is rendered through the chat template (the same
function `LLM.chat` uses), then sampled `n` times. Text-only: content parts other than text,
tools and structured response formats are refused with a 400 rather than silently ignored."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from pagedllm.engine.input_processor import CheckedInput, render_chat
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
    DeltaMessage,
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
    if message.name is not None:
        out["name"] = message.name
    return out


class OpenAIServingChat(OpenAIServing):
    def render(
        self,
        messages: list[ChatMessage],
        chat_template: str | None,
        add_generation_prompt: bool,
        continue_final_message: bool,
        chat_template_kwargs: dict[str, Any] | None,
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
        conversation = [message_dict(m) for m in messages]
        tokenizer = self.need_tokenizer("chat")
        try:
            return render_chat(
                tokenizer,
                conversation,
                chat_template or self.config.chat_template,
                add_generation_prompt,
                continue_final_message,
                chat_template_kwargs,
            )
        except Exception as e:  # jinja2 errors (raise_exception in templates), bad kwargs
            raise OpenAIError(f"could not apply the chat template: {e}", param="messages") from e

    async def create_chat_completion(
        self, request: ChatCompletionRequest
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        self.check_model(request.model)
        self.check_engine()
        self._check_unsupported(request)
        prompt = await self.off_loop(
            self.render,
            request.messages,
            request.chat_template,
            request.add_generation_prompt,
            request.continue_final_message,
            request.chat_template_kwargs,
        )
        ids = self.check_token_ids(prompt["prompt_token_ids"], "messages")
        max_tokens = self.max_tokens_for(
            len(ids),
            request.requested_max_tokens,
            "messages",
            "max_tokens" if request.max_completion_tokens is None else "max_completion_tokens",
        )
        params = self.sampling_params(request, max_tokens)
        last = request.messages[-1]
        echo = ""
        if request.echo and last.role == ROLE:
            echo = message_dict(last)["content"]
        self.check_capacity(request.n or 1)
        request_id = random_id("chatcmpl")
        gen = self.engine.generate(CheckedInput(prompt["prompt"], ids, params), None, request_id)
        if request.stream:
            return self._stream(request, request_id, len(ids), echo, gen)
        final = await collect_final(gen)
        if final is None:
            raise OpenAIError("the engine returned no output", 500)
        return self._response(request, request_id, echo, final)

    def _check_unsupported(self, request: ChatCompletionRequest) -> None:
        if request.tools and request.tool_choice != "none":
            raise OpenAIError("tools are not supported", param="tools")
        fmt = (request.response_format or {}).get("type", "text")
        if fmt != "text":
            raise OpenAIError(
                f"response_format {fmt!r} is not supported (only 'text')", param="response_format"
            )
        if request.top_logprobs is not None and not request.logprobs:
            raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")

    def _logprobs(
        self, request: ChatCompletionRequest, out: CompletionOutput
    ) -> ChatLogProbs | None:
        if not request.logprobs:
            return None
        return self.chat_logprobs(out.token_ids, out.logprobs or [], request.top_logprobs or 0)

    def _response(
        self, request: ChatCompletionRequest, request_id: str, echo: str, final: RequestOutput
    ) -> ChatCompletionResponse:
        outputs = sorted(final.outputs, key=lambda o: o.index)
        choices = [
            ChatCompletionResponseChoice(
                index=out.index,
                message=ChatResponseMessage(role=ROLE, content=echo + out.text),
                logprobs=self._logprobs(request, out),
                finish_reason=out.finish_reason,
                stop_reason=out.stop_reason,
            )
            for out in outputs
        ]
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
    ) -> AsyncIterator[str]:
        created = int(time.time())

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
                delta = DeltaMessage(role=ROLE, content=echo)
                yield chunk([ChatCompletionStreamChoice(index=index, delta=delta)])
            async with aclosing(gen):
                async for res in gen:
                    for out in res.outputs:
                        num_generated += len(out.token_ids)
                        if nothing_to_send(out.text, out, bool(request.logprobs)):
                            continue
                        choice = ChatCompletionStreamChoice(
                            index=out.index,
                            delta=DeltaMessage(content=out.text),
                            logprobs=self._logprobs(request, out),
                            finish_reason=out.finish_reason,
                            stop_reason=out.stop_reason,
                        )
                        yield chunk([choice])
            if request.include_usage_in_stream:
                yield chunk([], usage(num_prompt_tokens, num_generated))
        except Exception as e:
            yield sse_error(e)
        yield SSE_DONE
