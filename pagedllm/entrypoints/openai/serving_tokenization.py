"""POST /tokenize and /detokenize (vLLM's extras): the server's own tokenizer, so a client can
count tokens or build token-id prompts without a copy of it."""

from __future__ import annotations

from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat


class OpenAIServingTokenization(OpenAIServingChat):
    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """In the tokenizer thread: a huge prompt must not stall the event loop."""
        self.check_model(request.model)
        return await self.off_loop(self._tokenize, request)

    def _tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        tokenizer = self.need_tokenizer("tokenize")
        if (request.prompt is None) == (request.messages is None):
            raise OpenAIError("give exactly one of prompt and messages", param="prompt")
        if request.messages is not None:
            rendered = self.render(
                request.messages,
                request.chat_template,
                request.add_generation_prompt,
                request.continue_final_message,
                request.chat_template_kwargs,
            )
            text = rendered["prompt"]
            # The template writes any special tokens itself (as for chat completions).
            add_special = bool(request.add_special_tokens)
        else:
            text = request.prompt
            add_special = request.add_special_tokens is not False
        ids = list(tokenizer.encode(text, add_special_tokens=add_special))
        strs = None
        if request.return_token_strs:
            strs = [str(tokenizer.decode([t])) for t in ids]
        return TokenizeResponse(
            count=len(ids), max_model_len=self.max_model_len, tokens=ids, token_strs=strs
        )

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(request.model)
        return await self.off_loop(self._detokenize, request)

    def _detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        tokenizer = self.need_tokenizer("detokenize")
        if request.tokens:
            self.check_token_ids(request.tokens, "tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(request.tokens))
