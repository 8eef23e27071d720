"""Output processing: engine-core outputs → `RequestOutput`s.

Per request: incremental detokenization and stop strings (a request that hits one is reported
back so the engine ends it in the core), logprobs with their decoded tokens, the cumulative
logprob, and the output kind (CUMULATIVE, DELTA or FINAL_ONLY). The n samples of a request with
n > 1 run as n child requests; a `ParentRequest` gathers them into one `RequestOutput`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine.outputs import EngineCoreOutput, Logprobs
from pagedllm.engine.request import FinishReason
from pagedllm.outputs import (
    CompletionOutput,
    Logprob,
    PromptLogprobs,
    RequestOutput,
    SampleLogprobs,
)
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class ParentRequest:
    """A request with n > 1: its children are `child_ids[i]` (sample index i)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    output_kind: RequestOutputKind
    child_ids: list[str]
    # Latest completion of each sample not yet reported (DELTA) or reported (otherwise).
    completions: dict[int, CompletionOutput] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)
    prompt_logprobs: PromptLogprobs | None = None  # the first child's
    num_cached_tokens: int = 0  # the first child's


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer | None = None
    parent: ParentRequest | None = None
    index: int = 0  # sample index among the parent's n
    token_ids: list[int] = field(default_factory=list)
    logprobs: SampleLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None
    cumulative_logprob: float | None = None
    num_sent_tokens: int = 0
    num_sent_logprobs: int = 0
    prompt_logprobs_sent: bool = False
    num_cached_tokens: int = 0

    def __post_init__(self) -> None:
        if self.params.logprobs is not None:
            self.logprobs = []
            self.cumulative_logprob = 0.0
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def output_kind(self) -> RequestOutputKind:
        return self.params.output_kind


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    # Requests a stop string ended: the engine must end them in the core too.
    reqs_to_stop: list[str]
    # (engine-core id, why) of outputs that could not be processed (say, the tokenizer raised):
    # the engine must fail those requests; their state is left for it to drop.
    failed: list[tuple[str, str]] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}
        self.parents: dict[str, ParentRequest] = {}
        self._token_text: dict[int, str] = {}

    def add_request(self, state: RequestState) -> None:
        if self.tokenizer is not None:
            state.detokenizer = IncrementalDetokenizer(
                self.tokenizer, state.params, state.prompt_token_ids
            )
        self.states[state.request_id] = state
        if state.parent is not None:
            self.parents[state.parent.request_id] = state.parent

    def child_ids(self, request_id: str) -> list[str]:
        """The engine-core ids of a user request (its children if it has n > 1)."""
        parent = self.parents.get(request_id)
        return list(parent.child_ids) if parent is not None else [request_id]

    def abort_requests(self, request_ids: list[str]) -> None:
        for req_id in request_ids:
            self.states.pop(req_id, None)
            parent = self.parents.pop(req_id, None)
            for child in parent.child_ids if parent is not None else []:
                self.states.pop(child, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.states)

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        results: list[RequestOutput] = []
        to_stop: list[str] = []
        failed: list[tuple[str, str]] = []
        touched: dict[str, ParentRequest] = {}
        for out in outputs:
            state = self.states.get(out.request_id)
            if state is None:
                continue
            try:
                finish_reason, stop_reason = self._update(state, out)
            except Exception as e:  # NOTE: one request's failure must not stop the others'
                logger.exception("could not process the output of request %s", out.request_id)
                failed.append((out.request_id, f"{type(e).__name__}: {e}"))
                continue
            if finish_reason is not None and not out.finished:
                to_stop.append(out.request_id)
            finished = finish_reason is not None
            if finished:
                del self.states[out.request_id]
            if not finished and (
                not out.new_token_ids or state.output_kind == RequestOutputKind.FINAL_ONLY
            ):
                continue  # nothing to report yet (a prompt chunk brings only prompt logprobs)
            completion = self._completion(state, finished, finish_reason, stop_reason)
            if state.parent is not None:
                self._add_to_parent(state, completion, finished)
                touched[state.parent.request_id] = state.parent
            else:
                results.append(self._request_output(state, [completion], finished))
        for parent in touched.values():
            output = self._parent_output(parent)
            if output is not None:
                results.append(output)
        return ProcessedOutputs(results, to_stop, failed)

    def fail(self, request_id: str, why: str) -> RequestOutput | None:
        """Ends an engine-core request with finish reason "error" (`why` as its stop reason);
        its output, or its parent's, as the request's output kind says (None: none to send)."""
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        state.detokenizer = None  # NOTE: it may be what failed; the text sent so far stands
        completion = self._completion(state, True, str(FinishReason.ERROR), why)
        if state.parent is None:
            return self._request_output(state, [completion], True)
        self._add_to_parent(state, completion, True)
        return self._parent_output(state.parent)

    def _update(
        self, state: RequestState, out: EngineCoreOutput
    ) -> tuple[str | None, int | str | None]:
        """Takes in one step's news; returns the finish and stop reasons (a stop string too)."""
        if out.num_cached_tokens is not None:
            state.num_cached_tokens = out.num_cached_tokens
        if out.new_prompt_logprobs is not None and state.prompt_logprobs is not None:
            self._extend_prompt_logprobs(state.prompt_logprobs, out.new_prompt_logprobs)
        state.token_ids.extend(out.new_token_ids)
        if out.new_logprobs is not None and state.logprobs is not None:
            state.logprobs.extend(self._logprob_dicts(out.new_logprobs))
            state.cumulative_logprob = (state.cumulative_logprob or 0.0) + sum(
                row[0] for row in out.new_logprobs.logprobs
            )
        finish_reason = str(out.finish_reason) if out.finish_reason is not None else None
        stop_reason = out.stop_reason
        if state.detokenizer is not None and out.new_token_ids:
            stop_terminated = out.finish_reason == FinishReason.STOP
            stop_string = state.detokenizer.update(out.new_token_ids, stop_terminated, out.finished)
            if stop_string is not None:
                finish_reason, stop_reason = str(FinishReason.STOP), stop_string
        return finish_reason, stop_reason

    def _extend_prompt_logprobs(self, acc: PromptLogprobs, new: Logprobs) -> None:
        """Appends prompt logprobs past those already held (a preempted request recomputes)."""
        skip = len(acc) - new.start
        if skip < 0:
            raise AssertionError(f"prompt logprobs from token {new.start}, have {len(acc)}")
        rows = Logprobs(new.token_ids[skip:], new.logprobs[skip:], new.ranks[skip:])
        acc.extend(self._logprob_dicts(rows))

    def _logprob_dicts(self, lp: Logprobs) -> SampleLogprobs:
        dicts: SampleLogprobs = []
        for ids, lps, rank in zip(lp.token_ids, lp.logprobs, lp.ranks):
            d = {ids[0]: Logprob(lps[0], rank, self._text(ids[0]))}
            for j in range(1, len(ids)):
                if ids[j] not in d:
                    d[ids[j]] = Logprob(lps[j], j, self._text(ids[j]))
            dicts.append(d)
        return dicts

    def _text(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._token_text[token_id] = text
        return text

    def _completion(
        self,
        state: RequestState,
        finished: bool,
        finish_reason: str | None,
        stop_reason: int | str | None,
    ) -> CompletionOutput:
        delta = state.output_kind == RequestOutputKind.DELTA
        text = ""
        if state.detokenizer is not None:
            text = state.detokenizer.get_next_output_text(finished, delta)
        if delta:
            token_ids = state.token_ids[state.num_sent_tokens :]
            logprobs = state.logprobs[state.num_sent_logprobs :] if state.logprobs else None
        else:
            token_ids, logprobs = list(state.token_ids), state.logprobs
        state.num_sent_tokens = len(state.token_ids)
        state.num_sent_logprobs = len(state.logprobs or [])
        return CompletionOutput(
            index=state.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=state.cumulative_logprob,
            logprobs=list(logprobs) if logprobs is not None else None,
            finish_reason=finish_reason,
            stop_reason=stop_reason,
        )

    def _prompt_logprobs_to_send(self, state: RequestState) -> PromptLogprobs | None:
        """All of them, except in DELTA mode: only in the first output."""
        if state.prompt_logprobs is None:
            return None
        if state.output_kind == RequestOutputKind.DELTA:
            if state.prompt_logprobs_sent:
                return None
            state.prompt_logprobs_sent = True
        return state.prompt_logprobs

    def _request_output(
        self, state: RequestState, completions: list[CompletionOutput], finished: bool
    ) -> RequestOutput:
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=self._prompt_logprobs_to_send(state),
            num_cached_tokens=state.num_cached_tokens,
        )

    def _add_to_parent(
        self, state: RequestState, completion: CompletionOutput, finished: bool
    ) -> None:
        parent = state.parent
        assert parent is not None
        parent.completions[state.index] = completion
        if finished:
            parent.finished.add(state.index)
        if state.index == 0:
            parent.num_cached_tokens = state.num_cached_tokens
            if state.prompt_logprobs is not None:
                parent.prompt_logprobs = self._prompt_logprobs_to_send(state)

    def _parent_output(self, parent: ParentRequest) -> RequestOutput | None:
        """One output for the step's news of the parent's samples (all of them, in index order,
        unless DELTA), or None (FINAL_ONLY before every sample finished)."""
        finished = len(parent.finished) == len(parent.child_ids)
        if parent.output_kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        completions = [parent.completions[i] for i in sorted(parent.completions)]
        prompt_logprobs = parent.prompt_logprobs
        if parent.output_kind == RequestOutputKind.DELTA:
            parent.completions, parent.prompt_logprobs = {}, None
        if finished:
            self.parents.pop(parent.request_id, None)
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=completions,
            finished=finished,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=parent.num_cached_tokens,
        )
