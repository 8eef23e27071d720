"""`SamplingMetadata`: the per-row sampling parameters of one step's sampled rows, on the device;
and `build_sampling_metadata`, which gathers them from the input batch's columns.

The input batch owns the columns (one entry per row: temperature, top-k, ..., `seeded` and
`seed_keys`) and the token tables (`tables.py`); this module derives a step's metadata from the
rows that sample, with vectorized numpy indexing, and copies it to the device through the
step's `HostStager`. The randomness in it (the kernel path's keys, the torch path's
generators) comes from the `SamplingRNG`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from pagedllm.worker.sample.rng import SamplingRNG

if TYPE_CHECKING:
    from collections.abc import Callable

    from pagedllm.worker.input_batch import InputBatch
    from pagedllm.worker.staging import HostStager

    ToDevice = Callable[[np.ndarray], torch.Tensor]

# Up to this many candidates, top-k + top-p sorts the top-k candidates instead of the vocabulary.
MAX_TOP_K_CANDIDATES = 1024


@dataclass
class TokenPairs:
    """A sparse [num_rows, vocab] matrix on the device: (row, token id[, value]) entries."""

    rows: torch.Tensor  # int64 [E]
    token_ids: torch.Tensor  # int64 [E]
    values: torch.Tensor | None = None  # float32 [E]


@dataclass
class Penalties:
    """The rows with a penalty, their parameters, and their tokens so far (padded)."""

    rows: torch.Tensor  # int64 [P]: indices into the sampled rows
    presence: torch.Tensor  # float32 [P]
    frequency: torch.Tensor  # float32 [P]
    repetition: torch.Tensor  # float32 [P]
    token_ids: torch.Tensor  # int64 [P, L]: prompt then output tokens
    prompt_mask: torch.Tensor  # bool [P, L]
    output_mask: torch.Tensor  # bool [P, L]


@dataclass
class SamplingMetadata:
    """Per-row sampling parameters of one step's sampled rows. Optional parts are None when no
    row uses them, so the sampler skips their work."""

    all_greedy: bool
    all_random: bool
    temperature: torch.Tensor | None = None  # float32 [R], 0 for greedy rows; None if all greedy
    top_k: torch.Tensor | None = None  # int64 [R], 0 = off
    max_top_k: int = 0  # largest top_k in use (the sampler needs it without a sync)
    top_k_in_all_rows: bool = False  # every row has a top_k <= MAX_TOP_K_CANDIDATES
    top_p: torch.Tensor | None = None  # float32 [R], 1 = off
    min_p: torch.Tensor | None = None  # float32 [R], 0 = off
    # The torch path's randomness (`SamplingRNG`): the unseeded rows' generator (None: torch's
    # default), and the seeded rows' own.
    generator: torch.Generator | None = None
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row → its own
    # The kernel path's (see `kernels`): float32 [R] 1 / T, 0 for greedy rows (None: from
    # `temperature`), and int64 [R] noise keys (`SamplingRNG.sample_keys`).
    inv_temperature: torch.Tensor | None = None
    sample_keys: torch.Tensor | None = None
    allowed: TokenPairs | None = None  # the allowed ids of the rows that restrict them
    allowed_rows: torch.Tensor | None = None  # int64: the rows that restrict them
    banned: TokenPairs | None = None
    logit_bias: TokenPairs | None = None
    penalties: Penalties | None = None
    max_num_logprobs: int | None = None  # None: no row asked for logprobs
    # Structured output (a later issue: the grammar's bitmask, filled by its manager; nothing
    # sets it yet): int32 [M, ceil(vocab / 32)], xgrammar's layout (bit j of word i set: token
    # 32 i + j allowed), for the sampled rows `token_bitmask_rows` (int64 [M]; None: M = R,
    # row for row). Rows without a grammar have no bitmask row (or one of all ones, -1 words).
    token_bitmask: torch.Tensor | None = None
    token_bitmask_rows: torch.Tensor | None = None


def build_sampling_metadata(
    batch: InputBatch, rows: np.ndarray, stager: HostStager, rng: SamplingRNG
) -> SamplingMetadata:
    """The sampling parameters of `rows` (the input-batch rows that sample this step, in logits
    order), copied to the device through `stager`, with the randomness of `rng`'s path: the
    noise keys of the kernel path, or the generators of the torch path."""
    step_key = rng.next_step_key()  # NOTE: first, whatever the step: one draw per step
    dev = stager.to_device
    temperature = batch.temperature[rows]
    all_greedy = bool((temperature == 0).all())
    md = SamplingMetadata(all_greedy=all_greedy, all_random=bool((temperature != 0).all()))
    num_logprobs = int(batch.num_logprobs[rows].max(initial=-1))
    md.max_num_logprobs = None if num_logprobs < 0 else num_logprobs
    pos = np.full(batch.max_num_reqs, -1, np.int64)
    pos[rows] = np.arange(len(rows))
    _add_token_masks(md, batch, pos, dev)
    md.penalties = _penalties(batch, rows, dev)
    if all_greedy:
        return md
    md.temperature = dev(temperature)
    if step_key is not None:  # the kernel path
        inv_temperature = np.zeros_like(temperature)
        np.divide(1, temperature, out=inv_temperature, where=temperature != 0)
        md.inv_temperature = dev(inv_temperature)
        md.sample_keys = dev(row_sample_keys(batch, rows, step_key).view(np.int64))
    else:
        md.generator = rng.generator
        for i in np.flatnonzero(batch.seeded[rows]).tolist():
            req_id = batch.row_req_ids[int(rows[i])]
            assert req_id is not None, "a sampled row belongs to a request"
            md.generators[i] = rng.generator_of(req_id)
    top_k = batch.top_k[rows]
    if top_k.any():
        md.top_k, md.max_top_k = dev(top_k), int(top_k.max())
        md.top_k_in_all_rows = bool(top_k.all()) and md.max_top_k <= MAX_TOP_K_CANDIDATES
    top_p = batch.top_p[rows]
    if (top_p < 1).any():
        md.top_p = dev(top_p)
    min_p = batch.min_p[rows]
    if min_p.any():
        md.min_p = dev(min_p)
    return md


def row_sample_keys(batch: InputBatch, rows: np.ndarray, step_key: int) -> np.ndarray:
    """`SamplingRNG.sample_keys` of `rows` (uint64). The output position counts the tokens of
    steps still in flight (`num_tokens` includes their placeholders), so a seeded row's key is
    the same in any batch, after a preemption and with async scheduling."""
    positions = batch.num_tokens[rows] - batch.num_prompt_tokens[rows]
    return SamplingRNG.sample_keys(batch.seeded[rows], batch.seed_keys[rows], positions, step_key)


def _add_token_masks(
    md: SamplingMetadata, batch: InputBatch, pos: np.ndarray, dev: ToDevice
) -> None:
    """Allowed ids, logit bias and banned ids (stop ids before min_tokens, bad words) of the
    rows with `pos[row] >= 0`, as entries of the sampled rows `pos[row]`."""
    if batch.allowed_token_ids:
        r, ids, _ = batch.allowed_token_ids.select(pos)
        if r.size:
            md.allowed = TokenPairs(dev(r), dev(ids))
            md.allowed_rows = dev(np.unique(r))
    if batch.logit_bias:
        r, ids, vals = batch.logit_bias.select(pos)
        if r.size:
            md.logit_bias = TokenPairs(dev(r), dev(ids), dev(vals))
    banned_rows, banned_ids = [], []
    if batch.min_tokens_stop_ids:
        num_output = batch.num_tokens - batch.num_prompt_tokens
        early = np.where(num_output < batch.min_tokens, pos, -1)
        r, ids, _ = batch.min_tokens_stop_ids.select(early)
        banned_rows.append(r)
        banned_ids.append(ids)
    if batch.bad_words:
        r, ids = batch.bad_words.banned(
            pos, batch.token_ids, batch.num_tokens, batch.num_prompt_tokens
        )
        banned_rows.append(r)
        banned_ids.append(ids)
    if banned_rows and sum(r.size for r in banned_rows):
        md.banned = TokenPairs(dev(np.concatenate(banned_rows)), dev(np.concatenate(banned_ids)))


def _penalties(batch: InputBatch, rows: np.ndarray, dev: ToDevice) -> Penalties | None:
    """The rows with a presence, frequency or repetition penalty, with their tokens so far."""
    presence = batch.presence_penalty[rows]
    frequency = batch.frequency_penalty[rows]
    repetition = batch.repetition_penalty[rows]
    which = np.flatnonzero((presence != 0) | (frequency != 0) | (repetition != 1))
    if not which.size:
        return None
    prow = rows[which]
    num_tokens, num_prompt = batch.num_tokens[prow], batch.num_prompt_tokens[prow]
    cols = np.arange(int(num_tokens.max()))
    prompt_mask = cols[None, :] < num_prompt[:, None]
    output_mask = ~prompt_mask & (cols[None, :] < num_tokens[:, None])
    tokens = batch.token_ids[prow, : cols.size].astype(np.int64)
    return Penalties(
        rows=dev(which),
        presence=dev(presence[which]),
        frequency=dev(frequency[which]),
        repetition=dev(repetition[which]),
        token_ids=dev(tokens),
        prompt_mask=dev(prompt_mask),
        output_mask=dev(output_mask),
    )
