"""LLM: the offline API. `LLM(model=...).generate(prompts, sampling_params)`, as vLLM's."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagedllm.engine.input_processor import PromptType, render_chat
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine_args import EngineArgs
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """An engine for offline batches. Keyword arguments are `EngineArgs` fields."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        kwargs["usage_context"] = "offline"  # NOTE: the LLM class is the offline API
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` and `chat` use when given no SamplingParams: the model's generation
        config (`generation_config=`) over SamplingParams' own defaults, as vLLM does."""
        return SamplingParams(**self.llm_engine.config.model_config.sampling_defaults)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs come back in input order."""
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"got {len(params_list)} sampling_params for {len(prompt_list)} prompts"
                )
        request_ids = [str(next(self._counter)) for _ in prompt_list]
        try:
            for req_id, prompt, params in zip(request_ids, prompt_list, params_list):
                self.llm_engine.add_request(
                    req_id, prompt, params, output_kind=RequestOutputKind.FINAL_ONLY
                )
        except Exception:
            self.llm_engine.abort_request(request_ids)
            raise
        return self._run_engine(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Generates replies to one conversation (a list of messages) or to a list of them,
        each rendered through the model's chat template (or `chat_template`)."""
        conversations = _as_conversations(messages)
        prompts: list[PromptType] = [
            self.render_chat(
                conversation,
                chat_template,
                add_generation_prompt,
                continue_final_message,
                chat_template_kwargs,
            )
            for conversation in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def render_chat(
        self,
        conversation: list[dict[str, Any]],
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """One conversation → `{"prompt": text, "prompt_token_ids": ids}` via the chat template."""
        return render_chat(
            self.get_tokenizer(),
            conversation,
            chat_template,
            add_generation_prompt,
            continue_final_message,
            chat_template_kwargs,
        )

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm)
        num_output_tokens = 0
        try:
            while self.llm_engine.has_unfinished_requests():
                for output in self.llm_engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        num_output_tokens += sum(len(o.token_ids) for o in output.outputs)
                        bar.update(1)
                        elapsed = bar.format_dict["elapsed"] or 1e-9
                        bar.set_postfix_str(f"output {num_output_tokens / elapsed:.1f} tok/s")
        except BaseException:
            self.llm_engine.abort_request(request_ids)
            raise
        finally:
            bar.close()
        return [finished[r] for r in request_ids]


def _as_prompt_list(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _as_conversations(messages: Any) -> list[list[dict[str, Any]]]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of messages or of conversations")
    if all(isinstance(m, dict) for m in messages):
        return [list(messages)]
    if all(isinstance(c, (list, tuple)) and all(isinstance(m, dict) for m in c) for c in messages):
        return [list(c) for c in messages]
    raise ValueError(
        "messages must be a list of {'role', 'content'} dicts, or a list of such lists"
    )
