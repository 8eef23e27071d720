"""Speculative decoding in the model runner: a verify step's inputs and its sampling.

A request with drafts (`SchedulerOutput.scheduled_spec_decode_tokens`) runs its last token then
its drafts, written after its known tokens in the input batch (`write_drafts`); its last 1 + k
rows give logits (`draft_layout`). Such a step is sampled and brought to the host at once
(`SpecDecodeSampler`): the drafting requests through the rejection sampler
(`sample/rejection.py`: their emitted tokens' logprobs are the target's raw ones), the others
through the sampler; the emitted tokens enter the batch then (nothing is in flight after a
speculative step: the engine core steps synchronously with speculation on).

The drafts come from the engine core (n-gram) or from the worker's draft model
(`draft_model.py`, which proposes after each step and keeps its draft probabilities for the
verification: `DraftProbs`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from pagedllm.engine.outputs import GrammarOutput, Logprobs
from pagedllm.worker.input_batch import InputBatch
from pagedllm.worker.sample import HostLogprobs, Sampler, SamplingMetadata, compute_logprobs
from pagedllm.worker.sample.logprobs import LogprobsTensors
from pagedllm.worker.sample.rejection import (
    DraftLayout,
    draw_noise,
    rejection_sample,
    target_probs,
)
from pagedllm.worker.staging import HostStager

# Puts the grammar's bitmask rows of the given requests (in order) into a sampling metadata.
AddBitmask = Callable[[SamplingMetadata, list[str], "GrammarOutput | None"], None]


class DraftProbs(Protocol):
    """Where a probabilistic draft's distributions come from (the draft model)."""

    def draft_probs(self, req_ids: list[str], layout: DraftLayout) -> torch.Tensor | None:
        """fp32 [sum k, V]: the distribution each draft of `layout` (request `req_ids[i]`'s)
        was drawn from (one-hot for a deterministic draft); None: every draft deterministic."""
        ...


def write_drafts(
    batch: InputBatch, spec: dict[str, list[int]], req_ids: list[str], rows: np.ndarray
) -> np.ndarray:
    """Writes each request's drafts after its known tokens (the step's inputs read them there;
    the tokens it emits overwrite them); returns their counts (int64 [num_reqs])."""
    counts = np.zeros(len(req_ids), np.int64)
    if not spec:
        return counts
    for i, req_id in enumerate(req_ids):
        draft = spec.get(req_id)
        if draft:
            row, n = int(rows[i]), int(batch.num_tokens[rows[i]])
            batch.token_ids[row, n : n + len(draft)] = draft
            counts[i] = len(draft)
    return counts


def draft_layout(
    spec: dict[str, list[int]],
    req_ids: list[str],
    sample_mask: np.ndarray,
    num_drafts: np.ndarray,
    logits_indices: np.ndarray,
) -> tuple[DraftLayout | None, np.ndarray]:
    """The drafts of the sampling requests (in logits order) and the logits rows: each
    sampling request's last row becomes its last 1 + k rows. (None, unchanged) without drafts."""
    if not num_drafts.any():
        return None, logits_indices
    drafting = num_drafts[sample_mask]
    ids = [t for i in np.flatnonzero(sample_mask).tolist() for t in spec.get(req_ids[i], ())]
    layout = DraftLayout.from_counts(drafting, np.array(ids, np.int64))
    sizes = 1 + drafting
    offsets = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return layout, np.repeat(logits_indices - drafting, sizes) + offsets


def _host(lp: LogprobsTensors) -> HostLogprobs:
    return HostLogprobs(lp.token_ids.cpu().numpy(), lp.logprobs.cpu().numpy(),
                        lp.ranks.cpu().numpy())  # fmt: skip


class SpecDecodeSampler:
    """Samples the logits rows of a step with drafts (see the module's docstring)."""

    def __init__(self, batch: InputBatch, stager: HostStager, sampler: Sampler) -> None:
        self.batch = batch
        self.stager = stager
        self.sampler = sampler

    def sample(
        self,
        req_ids: list[str],
        sample_mask: np.ndarray,
        rows: np.ndarray,
        layout: DraftLayout,
        logits: torch.Tensor,
        grammar: GrammarOutput | None,
        add_bitmask: AddBitmask,
        draft_source: DraftProbs | None,
    ) -> tuple[list[list[int]], list[Logprobs | None] | None]:
        """Each scheduled request's emitted tokens (`req_ids` order; [] for those that do not
        sample) and their logprobs (None when none asked), written into the batch. `rows`: the
        sampling requests' input-batch rows; `logits`: their `layout.num_rows` rows."""
        batch, st = self.batch, self.stager
        sample_idx = np.flatnonzero(sample_mask)
        sampled_reqs = [req_ids[i] for i in sample_idx.tolist()]
        tokens: list[list[int]] = [[] for _ in sampled_reqs]
        lps: list[Logprobs | None] = [None] * len(sampled_reqs)
        num_logprobs = batch.num_logprobs[rows]
        drafting = layout.num_drafts > 0
        plain = np.flatnonzero(~drafting)
        if plain.size:
            md = batch.make_sampling_metadata(rows[plain], st, self.sampler.rng)
            add_bitmask(md, [sampled_reqs[i] for i in plain.tolist()], grammar)
            out = self.sampler.sample(logits[st.to_device(layout.starts[plain])], md)
            ids = out.token_ids.cpu().numpy()
            host_lp = None if out.logprobs is None else _host(out.logprobs)
            for j, i in enumerate(plain.tolist()):
                tokens[i] = [int(ids[j])]
                if host_lp is not None and num_logprobs[i] >= 0:
                    lps[i] = host_lp.rows(j, j + 1, int(num_logprobs[i]))
        which = np.flatnonzero(drafting)
        if which.size:
            q = None
            if draft_source is not None:
                sub = DraftLayout.from_counts(layout.num_drafts[which], layout.draft_ids)
                q = draft_source.draft_probs([sampled_reqs[i] for i in which.tolist()], sub)
            self._verify(logits, layout, rows, which, q, tokens, lps)
        for i, toks in enumerate(tokens):
            row, n = int(rows[i]), int(batch.num_tokens[rows[i]])
            batch.token_ids[row, n : n + len(toks)] = toks
            batch.num_tokens[row] = n + len(toks)
        sampled_ids: list[list[int]] = [[] for _ in req_ids]
        logprobs: list[Logprobs | None] | None = None
        if (num_logprobs >= 0).any():
            logprobs = [None] * len(req_ids)
        for k, i in enumerate(sample_idx.tolist()):
            sampled_ids[i] = tokens[k]
            if logprobs is not None:
                logprobs[i] = lps[k]
        return sampled_ids, logprobs

    def _verify(
        self,
        logits: torch.Tensor,
        layout: DraftLayout,
        sample_rows: np.ndarray,
        which: np.ndarray,
        draft_probs: torch.Tensor | None,
        tokens: list[list[int]],
        lps: list[Logprobs | None],
    ) -> None:
        """The rejection sampler over the sampled requests `which` (those with drafts; their
        input-batch rows `sample_rows[which]`): their emitted tokens into `tokens`, and their
        logprobs into `lps` where asked. `draft_probs`: their drafts' distributions (None:
        deterministic drafts)."""
        batch, st, rng = self.batch, self.stager, self.sampler.rng
        sub = DraftLayout.from_counts(layout.num_drafts[which], layout.draft_ids)
        sizes = 1 + sub.num_drafts
        logit_rows = np.repeat(layout.starts[which], sizes) + (
            np.arange(sub.num_rows) - np.repeat(sub.starts, sizes)
        )
        req_rows = sample_rows[which]
        md = batch.make_sampling_metadata(np.repeat(req_rows, sizes), st, rng)
        target = logits[st.to_device(logit_rows)].float()
        asked = batch.num_logprobs[req_rows]
        raw = target.log_softmax(dim=-1) if (asked >= 0).any() else None
        probs = target_probs(target, md)
        positions = batch.num_tokens[req_rows] - batch.num_prompt_tokens[req_rows]
        noise, uniforms = draw_noise(
            sub.num_rows,
            probs.shape[1],
            sub,
            rng,
            batch.seeded[req_rows],
            batch.seed_keys[req_rows],
            positions,
            probs.device,
        )
        greedy = None
        if not md.all_random:
            greedy = (
                torch.ones(sub.num_rows, dtype=torch.bool, device=probs.device)
                if md.temperature is None
                else md.temperature == 0
            )
        row_ids, emitted = rejection_sample(probs, sub, noise, uniforms, greedy, draft_probs)
        for j, i in enumerate(which.tolist()):
            tokens[i] = emitted[j]
        if raw is None:
            return
        chosen = row_ids.copy()
        for j, toks in enumerate(emitted):  # the emitted tokens, row by row
            start = int(sub.starts[j])
            chosen[start : start + len(toks)] = toks
        lp = compute_logprobs(raw, st.to_device(chosen.astype(np.int64)), int(asked.max()))
        host = _host(lp)
        for j, i in enumerate(which.tolist()):
            if asked[j] >= 0:
                start = int(sub.starts[j])
                lps[i] = host.rows(start, start + len(emitted[j]), int(asked[j]))
