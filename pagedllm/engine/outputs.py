"""The engine's typed contracts, in one place: what crosses each boundary of a step.

- `SchedulerOutput` (with `NewRequestData`, `CachedRequestData`): the scheduler → the worker.
- `ModelRunnerOutput` (with `Logprobs`): the worker → the scheduler.
- `EngineCoreOutput`: one request's news from one step, the core → the output processor;
  `EngineCoreOutputs`: one message of them from the core process (serial.py sends it).

Dataclasses with named fields; `None` means "not known" or "not asked", never a sentinel
value. The wire format (serial.py) is derived from these fields: a new field crosses the
process boundary with no change there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine.request import FinishReason
from pagedllm.engine.stats import SchedulerStats
from pagedllm.sampling_params import SamplingParams

# ----- scheduler → worker -----


@dataclass
class NewRequestData:
    """A request the worker has not seen, or one resumed after preemption (sent whole again)."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request the worker already holds: the blocks it gained and where its cache stands."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    """One step's work. `num_scheduled_tokens[req_id]` tokens of each request run this step,
    starting at that request's `num_computed_tokens`."""

    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests that ended (finished or aborted) since the last step: the worker drops them.
    finished_req_ids: set[str] = field(default_factory=set)
    # Requests preempted this step: the worker drops them; they come back as new requests.
    preempted_req_ids: set[str] = field(default_factory=set)
    # The requests with a grammar that sample this step, in scheduling order: the step's
    # sampling waits for their `GrammarOutput` (EngineCore fills it during the forward).
    structured_output_request_ids: list[str] = field(default_factory=list)
    # Speculative decoding: the draft tokens each request verifies this step. Its scheduled
    # tokens are its last known token then these (they count in `num_scheduled_tokens`); the
    # worker returns the accepted drafts then one more token (1 to 1 + len(drafts) tokens).
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class GrammarOutput:
    """The token bitmask of a step's constrained rows: `bitmask[i]` (int32 numpy [M,
    ceil(vocab / 32)], bit j of word w set: token 32 w + j allowed) belongs to `req_ids[i]`."""

    req_ids: list[str]
    bitmask: Any  # np.ndarray (NOTE: typed loosely: this module imports no numpy)


# ----- worker → scheduler -----


@dataclass
class Logprobs:
    """Logprobs of consecutive positions of one request, under the model's raw distribution.

    Row i: the chosen token first (the sampled one, or for a prompt the actual next prompt
    token), then the request's top-N; `ranks[i]` is the chosen token's rank (1 = most likely).
    For prompt logprobs, row i belongs to prompt token `start + i` (the first one has none).
    """

    token_ids: list[list[int]]  # [num_positions][1 + N]
    logprobs: list[list[float]]  # same shape
    ranks: list[int]  # [num_positions]
    start: int = 0


@dataclass
class ModelRunnerOutput:
    """What one step produced: the sampled tokens of each request that sampled.

    `sampled_token_ids[i]` belongs to `req_ids[i]`; an empty list means the request ran a prompt
    chunk that did not reach its end and sampled nothing. A request that verified draft tokens
    (`SchedulerOutput.scheduled_spec_decode_tokens`) gets its accepted drafts then one token.
    """

    req_ids: list[str]
    sampled_token_ids: list[list[int]]
    # `logprobs[i]`: one row per sampled token of `req_ids[i]`, or None where the request did not
    # ask for logprobs (the whole list is None when no request did).
    logprobs: list[Logprobs | None] | None = None
    # Prompt logprobs computed this step, for the requests that asked (one row per prompt token).
    prompt_logprobs: dict[str, Logprobs] = field(default_factory=dict)
    # Speculative decoding with a draft model: the drafts the worker proposed after this step,
    # by request (the scheduler schedules them next step, cut to its budget).
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Seconds the worker spent proposing them (the draft model's forwards and sampling).
    draft_time_s: float = 0.0


# ----- core → output processor -----


@dataclass(slots=True)
class EngineCoreOutput:
    """One request's news from one step: the tokens it gained (with their logprobs, if asked),
    prompt logprobs computed this step (if asked), and whether it ended.

    NOTE: built once per request per step (`Scheduler.update_from_output`): slots, and the hot
    path passes its fields by position.
    """

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    # The stop token id or stop string that ended it; for FinishReason.ERROR, why it failed.
    stop_reason: int | str | None = None
    new_logprobs: Logprobs | None = None
    # Prompt tokens found in the prefix cache when it was first scheduled (None: not known here,
    # as in an abort's output before it was scheduled).
    num_cached_tokens: int | None = None
    new_prompt_logprobs: Logprobs | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineCoreOutputs:
    """One message from the core: a step's outputs (maybe none), the scheduler's stats after it,
    and the queue time (seconds from reaching the core to first scheduled) of each request
    scheduled for the first time."""

    outputs: list[EngineCoreOutput]
    stats: SchedulerStats
    queue_times: dict[str, float]
