"""POST /v1/completions: one or several prompts (text or token ids), each sampled `n` times;
choice `i * n + j` is prompt i's sample j, as in OpenAI and vLLM. Echo puts the prompt (and, with
logprobs, its logprobs) before each choice's text."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pagedllm.engine.input_processor import CheckedInput
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    usage,
)
from pagedllm.entrypoints.openai.serving_engine import (
    SSE_DONE,
    OpenAIServing,
    collect_final,
    gather_or_cancel,
    merge_async_iterators,
    nothing_to_send,
    random_id,
    sse,
    sse_error,
)
from pagedllm.outputs import CompletionOutput, RequestOutput


@dataclass
class _Prompt:
    text: str | None
    token_ids: list[int]


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(
        self, request: CompletionRequest
    ) -> CompletionResponse | AsyncIterator[str]:
        """The full response, or (stream=true) the server-sent events to send."""
        self.check_model(request.model)
        self.check_engine()
        if request.suffix:
            raise OpenAIError("suffix is not supported", param="suffix")
        if request.best_of is not None and request.best_of != (request.n or 1):
            raise OpenAIError("best_of is not supported (it must equal n)", param="best_of")
        raw = request.prompt
        has_text = isinstance(raw, str) or any(isinstance(item, str) for item in raw)
        # NOTE: text goes to the tokenizer thread; token ids are checked here (C-speed), so
        # they never queue behind a huge text being tokenized.
        prompts = (
            await self.off_loop(self._prompts, request) if has_text else self._prompts(request)
        )
        params = [
            self.sampling_params(
                request,
                self.max_tokens_for(len(p.token_ids), request.max_tokens, "prompt", "max_tokens"),
            )
            for p in prompts
        ]
        if request.echo:
            self.need_tokenizer("echo")
        self.check_capacity(len(prompts) * (request.n or 1))
        request_id = random_id("cmpl")
        gens = [
            self.engine.generate(CheckedInput(p.text, p.token_ids, sp), None, f"{request_id}-{i}")
            for i, (p, sp) in enumerate(zip(prompts, params))
        ]
        if request.stream:
            return self._stream(request, request_id, prompts, gens)
        finals = await gather_or_cancel(*(collect_final(g) for g in gens))
        return self._response(request, request_id, prompts, finals)

    def _prompts(self, request: CompletionRequest) -> list[_Prompt]:
        raw = request.prompt
        if isinstance(raw, str):
            items: list[Any] = [raw]
        elif raw and all(isinstance(t, int) for t in raw):
            items = [raw]  # one prompt of token ids
        else:
            items = list(raw)
        if not items:
            raise OpenAIError("prompt must not be empty", param="prompt")
        self.check_count(items, self.config.max_prompts, "prompt")
        prompts = []
        for item in items:
            if isinstance(item, str):
                tokenizer = self.need_tokenizer("a text prompt")
                ids = list(tokenizer.encode(item, add_special_tokens=request.add_special_tokens))
                prompts.append(_Prompt(item, self.check_token_ids(ids, "prompt")))
            else:
                prompts.append(_Prompt(None, self.check_token_ids(item, "prompt")))
        return prompts

    def _echo(self, prompt: _Prompt) -> str:
        if prompt.text is None:
            prompt.text = str(self.need_tokenizer("echo").decode(prompt.token_ids))
        return prompt.text

    def _choice_logprobs(
        self,
        request: CompletionRequest,
        out: CompletionOutput,
        prompt: _Prompt,
        prompt_logprobs: Any,
        echo: bool,
        text_offset: int,
    ) -> CompletionLogProbs | None:
        if request.logprobs is None:
            return None
        token_ids: list[int] = []
        entries: list[Any] = []
        if echo and prompt_logprobs is not None:
            token_ids, entries = list(prompt.token_ids), list(prompt_logprobs)
        token_ids += out.token_ids
        entries += out.logprobs or []
        return self.completion_logprobs(token_ids, entries, text_offset)

    def _response(
        self,
        request: CompletionRequest,
        request_id: str,
        prompts: list[_Prompt],
        finals: list[RequestOutput | None],
    ) -> CompletionResponse:
        choices = []
        num_generated = 0
        n = request.n or 1
        for i, (prompt, final) in enumerate(zip(prompts, finals)):
            if final is None:
                raise OpenAIError("the engine returned no output", 500)
            for out in sorted(final.outputs, key=lambda o: o.index):
                num_generated += len(out.token_ids)
                text = (self._echo(prompt) if request.echo else "") + out.text
                logprobs = self._choice_logprobs(
                    request, out, prompt, final.prompt_logprobs, bool(request.echo), 0
                )
                choices.append(
                    CompletionResponseChoice(
                        index=i * n + out.index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=out.finish_reason,
                        stop_reason=out.stop_reason,
                        prompt_logprobs=self.prompt_logprobs(request, final.prompt_logprobs),
                    )
                )
        return CompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=choices,
            usage=usage(sum(len(p.token_ids) for p in prompts), num_generated),
        )

    async def _stream(
        self,
        request: CompletionRequest,
        request_id: str,
        prompts: list[_Prompt],
        gens: list[Any],
    ) -> AsyncIterator[str]:
        n = request.n or 1
        created = int(time.time())
        started: set[int] = set()
        text_offsets: dict[int, int] = {}
        prompt_logprobs: list[Any] = [None] * len(prompts)
        num_generated = 0
        try:
            async for i, res in merge_async_iterators(*gens):
                if res.prompt_logprobs is not None:
                    prompt_logprobs[i] = res.prompt_logprobs
                for out in res.outputs:
                    index = i * n + out.index
                    # NOTE: echo goes with a choice's first chunk; with n > 1 and logprobs, a
                    # sample that reports before the first one does goes without prompt logprobs.
                    echo = bool(request.echo) and index not in started
                    started.add(index)
                    num_generated += len(out.token_ids)
                    text = (self._echo(prompts[i]) if echo else "") + out.text
                    # NOTE: without a tokenizer every text is empty: each step gets its chunk,
                    # so clients still see the tokens arrive (and can time them).
                    wants_logprobs = request.logprobs is not None
                    if self.tokenizer is not None and nothing_to_send(text, out, wants_logprobs):
                        continue
                    offset = text_offsets.get(index, 0)
                    logprobs = self._choice_logprobs(
                        request, out, prompts[i], prompt_logprobs[i], echo, offset
                    )
                    text_offsets[index] = offset + len(text)
                    chunk = CompletionStreamResponse(
                        id=request_id,
                        created=created,
                        model=self.model_name,
                        choices=[
                            CompletionResponseChoice(
                                index=index,
                                text=text,
                                logprobs=logprobs,
                                finish_reason=out.finish_reason,
                                stop_reason=out.stop_reason,
                            )
                        ],
                    )
                    yield sse(chunk.model_dump_json())
            if request.include_usage_in_stream:
                chunk = CompletionStreamResponse(
                    id=request_id,
                    created=created,
                    model=self.model_name,
                    choices=[],
                    usage=usage(sum(len(p.token_ids) for p in prompts), num_generated),
                )
                yield sse(chunk.model_dump_json())
        except Exception as e:
            yield sse_error(e)
        yield SSE_DONE
