"""The token-budget scheduler.

Each step hands out at most `max_num_batched_tokens` tokens: first to running requests (in arrival
order), then to waiting ones (first come, first served). A request's share is simply
`num_tokens - num_computed_tokens`, cut to the budget left, so long prompts are chunked across
steps, prefix-cache hits skip ahead, and one step mixes prompt chunks with decode tokens.

A request with a grammar (structured output) waits until its grammar is compiled; the others
are scheduled past it. Each token accepted for it advances its grammar; a grammar that is
complete ends the request (finish reason "stop").

When the KV cache runs out, the most recently arrived running request is preempted by
recompute: its blocks are freed and it goes back to the front of the waiting queue with
`num_computed_tokens = 0`; its tokens so far are kept, so its final output is unchanged.

Async scheduling (EngineCore): `schedule()` may run while the previous step is still on the
GPU. A request whose scheduled tokens reach its end will sample one: it counts as an output
placeholder until `update_from_output` brings the id, and the next step may already compute it.
A request whose placeholders will surely end it (max_tokens) is not scheduled again; one that
stops on a token in flight costs one wasted row in the step after, whose result is dropped.

Speculative decoding (`speculative_config`; the core then steps synchronously, no placeholders
in flight): a decoding request (one token left to compute) gets a draft from the n-gram
proposer, scheduled after its last token in the same budget (they get KV slots; only its known
tokens' full blocks are published to the prefix cache). `update_from_output` takes the verified
drafts and the one token after them, and rolls `num_computed_tokens` back over the rejected
ones: their KV slots are simply written again later (the blocks stay the request's). Drafts
are dropped rather than preempting another request, and a request whose sampling reads per
position state (a grammar, penalties, bad words, min_tokens, allowed ids, logit bias) gets none.

With a draft model (method "draft_model") the worker proposes: each step's runner output
carries the drafts proposed after it (`ModelRunnerOutput.draft_token_ids`), kept here with the
token count they continue and scheduled in the request's next step (cut to its room). The
draft writes its own KV at the positions of its proposals, up to k slots past the step's last
scheduled token: a request's allocation asks for those `num_lookahead` slots too while the
pool has a block to spare for every running request (`_lookahead`: a guess never costs another
request its place), never published (only known tokens' full blocks are); the worker drafts
only into slots its request holds.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable

from pagedllm.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from pagedllm.engine.kv_cache_manager import KVCacheManager
from pagedllm.engine.outputs import (
    CachedRequestData,
    EngineCoreOutput,
    Logprobs,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from pagedllm.engine.request import FinishReason, Request, RequestStatus
from pagedllm.engine.spec_decode import NgramProposer
from pagedllm.engine.stats import SchedulerStats
from pagedllm.engine.structured_output import StructuredOutputRequest


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        sliding_window: int | None = None,
        speculative_config: SpeculativeConfig | None = None,
    ) -> None:
        """`sliding_window`: every layer's window (`uniform_sliding_window`), whose blocks out
        of it the KV manager frees. `speculative_config`: drafts proposed (None: off)."""
        self.config = scheduler_config
        self.proposer = None
        self.num_lookahead = 0  # KV slots the worker's draft model writes past a step's tokens
        if speculative_config is not None and speculative_config.method == "ngram":
            self.proposer = NgramProposer(speculative_config)
        elif speculative_config is not None:
            self.num_lookahead = speculative_config.num_speculative_tokens
        # The worker's drafts of each request: (its num_tokens when proposed, the drafts).
        self.worker_drafts: dict[str, tuple[int, list[int]]] = {}
        self.block_size = cache_config.block_size
        self.kv_cache_manager = KVCacheManager(
            num_blocks, cache_config.block_size, cache_config.enable_prefix_caching, sliding_window
        )
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        # NOTE: kept sorted by arrival, so the last one is the preemption victim.
        self.running: list[Request] = []
        # Ended since the last schedule(): the worker drops their state on the next step.
        self.finished_req_ids: set[str] = set()
        self.stats = SchedulerStats()
        # Live requests whose sampling reads earlier token ids (penalties, bad words).
        self.num_history_reqs = 0
        # Sent back to the queue by `recover` since the last schedule(): the worker drops them.
        self._recovered_req_ids: set[str] = set()
        # Outputs of requests failed outside a step (a grammar that did not compile), until
        # the core takes them (`take_failed_outputs`).
        self._failed_outputs: list[EngineCoreOutput] = []

    # ----- requests in and out -----

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        self.requests[request.request_id] = request
        self.waiting.append(request)
        self.num_history_reqs += request.sampling_params.needs_token_history

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        return self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Ends requests from outside the step (an abort, or a stop string the detokenizer saw)."""
        ended = []
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue
            self._dequeue(request)
            request.status = status
            self._free(request)
            ended.append(request)
        return ended

    def _dequeue(self, request: Request) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)

    def _free(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        self.worker_drafts.pop(request.request_id, None)
        self.finished_req_ids.add(request.request_id)
        del self.requests[request.request_id]
        self.num_history_reqs -= request.sampling_params.needs_token_history

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    # ----- one step -----

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted: list[Request] = []
        spec_tokens: dict[str, list[int]] = {}

        # Running requests first, oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if (
                request.num_output_placeholders
                and request.num_output_tokens + request.num_output_placeholders
                >= request.max_tokens
            ):
                i += 1  # the tokens in flight end it
                continue
            num_new = min(
                request.num_tokens_with_placeholders - request.num_computed_tokens, budget
            )
            assert num_new > 0, "a running request always has a token to compute"
            drafts = self._propose(request, budget - num_new)
            new_blocks = None
            lookahead = self._lookahead()
            if drafts or lookahead:
                new_blocks = self.kv_cache_manager.allocate_slots(
                    request, num_new + len(drafts) + lookahead
                )
                if new_blocks is None:
                    drafts = []  # NOTE: no room for them: no preemption for a guess
                else:
                    num_new += len(drafts)
                    spec_tokens[request.request_id] = drafts
            if new_blocks is None:
                new_blocks = self.kv_cache_manager.allocate_slots(request, num_new)
            while new_blocks is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
                new_blocks = self.kv_cache_manager.allocate_slots(request, num_new)
            if new_blocks is None:
                break  # the request preempted itself: nothing after it is running either
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            cached_reqs.append(
                CachedRequestData(
                    req_id=request.request_id,
                    new_block_ids=[b.block_id for b in new_blocks],
                    num_computed_tokens=request.num_computed_tokens,
                )
            )
            i += 1

        # Then waiting ones, unless this step had to preempt (the cache is full); those whose
        # grammar is still compiling keep their place in the queue.
        compiling: list[Request] = []
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            so = request.structured_output
            if so is not None and not so.ready:
                compiling.append(self.waiting.popleft())
                continue
            if so is not None and so.error is not None:
                self.waiting.popleft()
                reason = f"the request's structured output failed: {so.error}"
                self._failed_outputs.append(self._fail(request, reason))
                continue
            hit_blocks, num_hit_tokens = self.kv_cache_manager.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit_tokens, budget)
            new_blocks = None
            lookahead = self._lookahead()
            if lookahead:
                new_blocks = self.kv_cache_manager.allocate_slots(
                    request, num_new + lookahead, hit_blocks, num_hit_tokens
                )
            if new_blocks is None:
                new_blocks = self.kv_cache_manager.allocate_slots(
                    request, num_new, hit_blocks, num_hit_tokens
                )
            if new_blocks is None:
                break
            self.waiting.popleft()
            self.kv_cache_manager.record_prefix_lookup(request, num_hit_tokens)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens is None:  # first scheduled (not resumed)
                request.num_cached_tokens = num_hit_tokens
            bisect.insort(self.running, request, key=lambda r: r.arrival_order)
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            new_reqs.append(
                NewRequestData(
                    req_id=request.request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    output_token_ids=list(request.output_token_ids),
                    sampling_params=request.sampling_params,
                    block_ids=self.kv_cache_manager.get_block_ids(request.request_id),
                    num_computed_tokens=num_hit_tokens,
                )
            )

        self.waiting.extendleft(reversed(compiling))

        out = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            finished_req_ids=self.finished_req_ids,
            preempted_req_ids={r.request_id for r in preempted} | self._recovered_req_ids,
            scheduled_spec_decode_tokens=spec_tokens,
        )
        self.finished_req_ids = set()
        self._recovered_req_ids = set()
        # NOTE: the scheduled tokens count as computed from here on; the next schedule() sees
        # the step's results, because steps run one after another.
        for req_id, n in num_scheduled.items():
            request = self.requests[req_id]
            prompt_left = request.num_prompt_tokens - request.num_computed_tokens
            self.stats.num_prompt_tokens += min(max(prompt_left, 0), n)
            request.num_computed_tokens += n
            num_drafts = len(spec_tokens.get(req_id, ()))
            if request.num_computed_tokens - num_drafts == request.num_tokens_with_placeholders:
                # This step samples its next token (and verifies its drafts: up to 1 + drafts).
                request.num_output_placeholders += 1 + num_drafts
                if request.structured_output is not None:
                    out.structured_output_request_ids.append(req_id)
        self.stats.num_preemptions += len(preempted)
        return out

    def _lookahead(self) -> int:
        """The draft model's slots to reserve past a request's scheduled tokens: none unless the
        pool keeps a free block for every running request (NOTE: so that the reservation
        rarely makes another request wait or be preempted)."""
        if not self.num_lookahead:
            return 0
        spare = self.kv_cache_manager.pool.num_free_blocks > len(self.running)
        return self.num_lookahead if spare else 0

    def _propose(self, request: Request, budget_left: int) -> list[int]:
        """The draft tokens of a running request, within the budget left after its own token:
        only a decoding one (its last token left to compute, none in flight) whose sampling
        has no per-position state, and never past its max_tokens (the last token after the
        drafts must fit)."""
        worker_drafts = self.worker_drafts.pop(request.request_id, None)
        if (
            (self.proposer is None and worker_drafts is None)
            or budget_left <= 0
            or request.num_output_placeholders
            or request.num_tokens - request.num_computed_tokens != 1
            or request.structured_output is not None
        ):
            return []
        sp = request.sampling_params
        if sp.needs_token_history or sp.min_tokens or sp.allowed_token_ids or sp.logit_bias:
            return []
        room = min(budget_left, request.max_tokens - request.num_output_tokens - 1)
        if room <= 0:
            return []
        if self.proposer is None:
            assert worker_drafts is not None
            num_tokens, drafts = worker_drafts
            # NOTE: drafts continue the tokens they were proposed after, and nothing else.
            return drafts[:room] if num_tokens == request.num_tokens else []
        return self.proposer.propose(request.all_token_ids, room)

    def _fail(self, request: Request, reason: str) -> EngineCoreOutput:
        """Ends a request (already off the queues) with an error; its output."""
        request.status = RequestStatus.FINISHED_ERROR
        self._free(request)
        return EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=[],
            finish_reason=FinishReason.ERROR,
            stop_reason=reason,
            num_cached_tokens=request.num_cached_tokens,
        )

    def take_failed_outputs(self) -> list[EngineCoreOutput]:
        """The outputs of requests failed outside a step since the last call."""
        outputs, self._failed_outputs = self._failed_outputs, []
        return outputs

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        self.worker_drafts.pop(request.request_id, None)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def recover(
        self, failed: list[SchedulerOutput], culprits: set[str], reason: str
    ) -> list[EngineCoreOutput]:
        """After steps whose results are lost (a step raised): the `culprits` end with an error,
        every other request of those steps goes back to the queue to be recomputed (preemption
        by recompute: its output is unchanged), and blocks published before their content was
        computed are forgotten. Returns the culprits' outputs (finish reason ERROR)."""
        outputs: list[EngineCoreOutput] = []
        affected = {r for out in failed for r in out.num_scheduled_tokens}
        live = [self.requests[r] for r in affected if r in self.requests]
        # NOTE: latest first, so the queue's front ends in arrival order.
        for request in sorted(live, key=lambda r: r.arrival_order, reverse=True):
            if request.is_finished:
                continue
            self._dequeue(request)
            request.num_output_placeholders = 0
            if request.request_id in culprits:
                outputs.append(self._fail(request, reason))
            else:
                self._preempt(request)
                self._recovered_req_ids.add(request.request_id)
                self.stats.num_preemptions += 1
        self.kv_cache_manager.pool.forget_free_blocks()
        return outputs

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Appends the sampled tokens, ends requests that hit a stop condition, frees them."""
        outputs: list[EngineCoreOutput] = []
        logprobs = runner_output.logprobs
        prompt_logprobs = runner_output.prompt_logprobs
        spec_tokens = scheduler_output.scheduled_spec_decode_tokens
        for idx, (req_id, token_ids) in enumerate(
            zip(runner_output.req_ids, runner_output.sampled_token_ids)
        ):
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue  # ended during the step (aborted, or stopped by a token before it)
            request.num_output_placeholders -= len(token_ids)
            drafts = spec_tokens.get(req_id) if spec_tokens else None
            if drafts:
                self._roll_back_rejected(request, len(drafts), len(token_ids))
            new_prompt_logprobs = prompt_logprobs.get(req_id) if prompt_logprobs else None
            if not token_ids and new_prompt_logprobs is None:
                continue  # a prompt chunk that sampled nothing
            new_ids: list[int] = []
            so = request.structured_output
            for token_id in token_ids:
                request.append_output_token_ids([token_id])
                new_ids.append(token_id)
                if so is not None and not self._advance_grammar(request, so, token_id):
                    break
                if request.check_stop():
                    break
            new_logprobs = logprobs[idx] if logprobs is not None else None
            if new_logprobs is not None and len(new_ids) < len(token_ids):
                new_logprobs = _head(new_logprobs, len(new_ids))
            if request.is_finished:
                # NOTE: a request preempted while its token was in flight ends from the queue.
                (self.running if request in self.running else self.waiting).remove(request)
                self._free(request)
            # NOTE: fields by position (once per request per step: keywords cost twice as much).
            outputs.append(
                EngineCoreOutput(
                    req_id,
                    new_ids,
                    request.status.finish_reason,
                    request.stop_reason,
                    new_logprobs,
                    request.num_cached_tokens,
                    new_prompt_logprobs,
                )
            )
            self.stats.num_generation_tokens += len(new_ids)
        for req_id, drafts in runner_output.draft_token_ids.items():
            request = self.requests.get(req_id)
            if request is not None and not request.is_finished and drafts:
                self.worker_drafts[req_id] = (request.num_tokens, drafts)
        self.stats.spec_draft_time_s += runner_output.draft_time_s
        self.stats.num_steps += 1
        return outputs

    def _roll_back_rejected(self, request: Request, num_drafts: int, num_sampled: int) -> None:
        """A request verified `num_drafts` drafts and got `num_sampled` tokens (the accepted
        drafts then one): the rejected drafts' positions count as not computed any more."""
        assert 1 <= num_sampled <= 1 + num_drafts, "a verifying request gets 1 to 1 + k tokens"
        rejected = 1 + num_drafts - num_sampled
        request.num_output_placeholders -= rejected
        request.num_computed_tokens -= rejected
        self.stats.num_drafts += 1
        self.stats.num_draft_tokens += num_drafts
        self.stats.num_accepted_tokens += num_sampled - 1

    @staticmethod
    def _advance_grammar(request: Request, so: StructuredOutputRequest, token_id: int) -> bool:
        """Advances the request's grammar by its new token; False when that ended the request:
        the grammar is complete (stop), or it refused the token (an error: only when every
        token was masked, e.g. min_tokens forbids the stop token a complete grammar needs)."""
        if not so.accept(token_id, request.output_token_ids):
            request.status = RequestStatus.FINISHED_ERROR
            request.stop_reason = f"the grammar refused the sampled token {token_id}"
            return False
        if so.is_terminated:
            request.status = RequestStatus.FINISHED_STOPPED
            return False
        return True

    def make_stats(self) -> SchedulerStats:
        self.stats.num_running_reqs = len(self.running)
        self.stats.num_waiting_reqs = len(self.waiting)
        self.stats.kv_cache_usage = self.kv_cache_manager.usage
        return self.stats


def _head(logprobs: Logprobs, n: int) -> Logprobs:
    """The first `n` rows (the tokens kept when a stop condition cut a multi-token step)."""
    return Logprobs(logprobs.token_ids[:n], logprobs.logprobs[:n], logprobs.ranks[:n])
