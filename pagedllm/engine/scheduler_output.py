"""The typed contracts between the engine and the worker: `SchedulerOutput` and `ModelRunnerOutput`."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.sampling_params import SamplingParams


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

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


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
    chunk that did not reach its end and sampled nothing.
    """

    req_ids: list[str]
    sampled_token_ids: list[list[int]]
    # `logprobs[i]`: one row per sampled token of `req_ids[i]`, or None where the request did not
    # ask for logprobs (the whole list is None when no request did).
    logprobs: list[Logprobs | None] | None = None
    # Prompt logprobs computed this step, for the requests that asked (one row per prompt token).
    prompt_logprobs: dict[str, Logprobs] = field(default_factory=dict)
