"""The rejection sampler of speculative decoding: verifies drafts exactly.

A request with drafts d_1..d_k has 1 + k logits rows: row j is the target's distribution p_j of
the token after d_j (row 0: after its last known token). Each draft d_{j+1} was drawn from a
draft distribution q_j: row j accepts it with probability min(1, p_j(d_{j+1}) / q_j(d_{j+1}));
at the first rejection the token is drawn from the residual max(p_j - q_j, 0) renormalized;
after k acceptances the bonus token is drawn from p_k. Each emitted token is then distributed
as the target's own sample, so the output keeps the target's distribution (Leviathan et al.,
Chen et al. 2023). A deterministic draft (n-gram, or a greedy draft model) is the one-hot q = 1
at d_{j+1}: it is accepted with probability p_j(d_{j+1}), and the residual is p_j without
d_{j+1}. Greedy rows (temperature 0) are the one-hot p_j of their argmax: they accept exactly
the drafts equal to the argmax and emit the argmax at the first mismatch, the output of greedy
decoding without speculation.

p_j is the target after the request's temperature, min_p, top-k and top-p (the processors that
read per-position state - penalties, bad words, min_tokens, allowed ids, logit bias, grammars -
are not drafted for: the scheduler gives those requests no drafts).

Two implementations, one host sync each: torch ops (the reference, and the CPU's path), and on
CUDA one Triton launch (`rejection_kernels.verify`, unless `PAGEDLLM_TRITON_REJECTION` is "0"):
the same tokens given the same noise and uniforms.

Randomness (`draw_noise`): on the torch path Exp(1) noise [N, V] and the acceptance uniforms are
drawn from the `SamplingRNG`'s generator; a seeded request's from a generator keyed by (its
seed, its output position). On the kernel path (`SamplingRNG.use_kernel` and the switch on)
each row gets a 64-bit key instead, from which the kernel hashes its noise (as the one-pass
sampler: `kernels._exponential`), and the uniforms are hashed from the keys on the host: a
seeded request's keys depend only on (its seed, its output position, the row), an unseeded
one's on a step key (`SamplingRNG.next_step_key`) and its index. Either way a seeded request's
output does not depend on the batch.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.worker.sample.metadata import SamplingMetadata
from pagedllm.worker.sample.ops import apply_filters, argmax_rows
from pagedllm.worker.sample.rng import SamplingRNG

MASK63 = (1 << 63) - 1
_UNIFORM_COUNTER = 1 << 32  # a row key's counter for its draft's acceptance uniform


@functools.cache
def triton_enabled() -> bool:
    """Whether CUDA verifications run `rejection_kernels.verify`: Triton installed and
    `PAGEDLLM_TRITON_REJECTION=1` (read once; tests clear the cache). NOTE: opt-in until the
    compiled kernel has run on a GPU (it is tested under Triton's interpreter only so far)."""
    return (
        os.environ.get("PAGEDLLM_TRITON_REJECTION", "0") == "1"
        and importlib.util.find_spec("triton") is not None
    )


@dataclass
class DraftLayout:
    """Where each request's rows are among the `N` logits rows: request i owns rows
    `starts[i] .. starts[i] + num_drafts[i]` (its drafts then its bonus row)."""

    num_drafts: np.ndarray  # int64 [R]
    draft_ids: np.ndarray  # int64 [sum k]: every request's drafts, in order
    starts: np.ndarray  # int64 [R]
    draft_rows: np.ndarray  # int64 [sum k]: the logits row verifying each draft

    @classmethod
    def from_counts(cls, num_drafts: np.ndarray, draft_ids: np.ndarray) -> DraftLayout:
        sizes = 1 + num_drafts
        starts = np.cumsum(sizes) - sizes
        offsets = np.arange(int(num_drafts.sum())) - np.repeat(
            np.cumsum(num_drafts) - num_drafts, num_drafts
        )
        draft_rows = np.repeat(starts, num_drafts) + offsets
        return cls(num_drafts, draft_ids.astype(np.int64), starts, draft_rows)

    @property
    def num_rows(self) -> int:
        return int(self.num_drafts.sum()) + len(self.num_drafts)


def target_probs(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """fp32 [N, V] target distributions after temperature and filters; one-hot argmax rows for
    greedy rows. NOTE: `logits` is changed in place."""
    logits = logits.float()
    greedy_ids = argmax_rows(logits)
    one_hot = torch.zeros_like(logits).scatter_(1, greedy_ids.unsqueeze(1), 1.0)
    if md.all_greedy:
        return one_hot
    assert md.temperature is not None
    greedy_rows = md.temperature == 0
    logits = logits.div_(torch.where(greedy_rows, 1.0, md.temperature).unsqueeze(1))
    probs = apply_filters(logits, md).softmax(dim=-1)
    return torch.where(greedy_rows.unsqueeze(1), one_hot, probs)


def draw_noise(
    num_rows: int,
    vocab: int,
    layout: DraftLayout,
    rng: SamplingRNG,
    seeded: np.ndarray,
    seed_keys: np.ndarray,
    positions: np.ndarray,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The randomness of `rejection_sample`: the race's noise (torch path: Exp(1) noise
    fp32 [N, V]; kernel path: the rows' noise keys, int64 [N]) and the acceptances' uniforms
    (fp32 [sum k]). A seeded request's (`seeded[i]`) depend only on its seed and its output
    position `positions[i]`; the others' on the engine's generator (step key)."""
    if rng.use_kernel and triton_enabled():
        return row_keys(layout, rng, seeded, seed_keys, positions, device)
    noise = torch.empty(num_rows, vocab, device=device)
    uniforms = torch.empty(len(layout.draft_ids), device=device)
    if not seeded.all():
        noise.exponential_(generator=rng.generator)
        uniforms.uniform_(generator=rng.generator)
    if seeded.any():
        keys = SamplingRNG.sample_keys(
            np.ones(int(seeded.sum()), bool), seed_keys[seeded], positions[seeded], 0
        )
        draft_starts = np.cumsum(layout.num_drafts) - layout.num_drafts
        for key, i in zip(keys.tolist(), np.flatnonzero(seeded).tolist()):
            gen = torch.Generator(device=device)
            gen.manual_seed(int(key) & MASK63)
            start, k = int(layout.starts[i]), int(layout.num_drafts[i])
            noise[start : start + k + 1].exponential_(generator=gen)
            d = int(draft_starts[i])
            uniforms[d : d + k].uniform_(generator=gen)
    return noise, uniforms


def row_keys(
    layout: DraftLayout,
    rng: SamplingRNG,
    seeded: np.ndarray,
    seed_keys: np.ndarray,
    positions: np.ndarray,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel path's randomness: int64 [N] noise keys (row j of request i: the request's
    `SamplingRNG.sample_keys` key mixed with j) and fp32 [sum k] uniforms (24 bits of a hash of
    each draft row's key, in [0, 1)), computed on the host."""
    req = SamplingRNG.sample_keys(seeded, seed_keys, positions, rng.next_step_key() or 0)
    sizes = 1 + layout.num_drafts
    within = np.arange(layout.num_rows) - np.repeat(layout.starts, sizes)
    ones = np.ones(layout.num_rows, bool)
    keys = SamplingRNG.sample_keys(ones, np.repeat(req, sizes), within, 0)
    n = len(layout.draft_rows)
    bits = SamplingRNG.sample_keys(
        ones[:n], keys[layout.draft_rows], np.full(n, _UNIFORM_COUNTER), 0
    )
    uniforms = (bits >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)
    return (
        torch.from_numpy(keys.view(np.int64)).to(device),
        torch.from_numpy(uniforms).to(device),
    )


def rejection_sample(
    probs: torch.Tensor,
    layout: DraftLayout,
    noise: torch.Tensor,
    uniforms: torch.Tensor,
    greedy_rows: torch.Tensor | None,
    draft_probs: torch.Tensor | None = None,
) -> tuple[np.ndarray, list[list[int]]]:
    """The verification of `probs [N, V]` (`target_probs`) against the drafts of `layout`.
    Returns the token each row emits if it is the request's last emitted row (int64 [N] on the
    host: the residual draw of a draft row, the bonus draw of a bonus row) and each request's
    emitted tokens (its accepted drafts, then that row's token). `greedy_rows` (bool [N]):
    rows drawn without noise (None: none). `draft_probs` (fp32 [sum k, V]): the distribution
    q each draft was drawn from, one-hot rows for deterministic drafts (None: all are).
    `noise`: Exp(1) noise fp32 [N, V], or the rows' noise keys int64 [N] (`row_keys`: the kernel
    hashes the noise; needs Triton). On CUDA (and with keys) the Triton kernel verifies, whose
    row ids after a request's last emitted row are 0 and before it its accepted drafts."""
    if noise.dtype == torch.int64 or (probs.is_cuda and triton_enabled()):
        return _kernel_sample(probs, layout, noise, uniforms, greedy_rows, draft_probs)
    dev = probs.device
    draft_rows = torch.from_numpy(layout.draft_rows).to(dev)
    draft_ids = torch.from_numpy(layout.draft_ids).to(dev)
    p_draft = probs[draft_rows, draft_ids]
    residual = probs.clone()  # NOTE: unnormalized: the race needs no sum
    if draft_probs is None:
        accepted = uniforms < p_draft
        residual[draft_rows, draft_ids] = 0.0
    else:
        q_draft = draft_probs.gather(1, draft_ids.unsqueeze(1)).squeeze(1)
        accepted = uniforms * q_draft < p_draft  # u < p / q, without dividing by q
        residual[draft_rows] = (probs[draft_rows] - draft_probs).clamp_(min=0.0)
    if greedy_rows is not None:
        noise = torch.where(greedy_rows.unsqueeze(1), 1.0, noise)
    emitted_row_ids = argmax_rows(residual.div_(noise))
    host = torch.cat([emitted_row_ids, accepted.long()]).cpu().numpy()
    row_ids, accepts = host[: probs.shape[0]], host[probs.shape[0] :].astype(bool)
    tokens: list[list[int]] = []
    d = 0
    for start, k in zip(layout.starts.tolist(), layout.num_drafts.tolist()):
        a = 0
        while a < k and accepts[d + a]:
            a += 1
        tokens.append(layout.draft_ids[d : d + a].tolist() + [int(row_ids[start + a])])
        d += k
    return row_ids, tokens


def _kernel_sample(
    probs: torch.Tensor,
    layout: DraftLayout,
    noise: torch.Tensor,
    uniforms: torch.Tensor,
    greedy_rows: torch.Tensor | None,
    draft_probs: torch.Tensor | None,
) -> tuple[np.ndarray, list[list[int]]]:
    """`rejection_sample` by `rejection_kernels.verify`."""
    from pagedllm.worker.sample import rejection_kernels

    num_reqs = len(layout.num_drafts)
    meta = np.concatenate([layout.starts, layout.num_drafts, layout.draft_ids]).astype(np.int64)
    keyed = noise.dtype == torch.int64
    out, accepted = rejection_kernels.verify(
        probs.float().contiguous(),
        torch.from_numpy(meta).to(probs.device),
        num_reqs,
        uniforms.float(),
        draft_probs=None if draft_probs is None else draft_probs.float().contiguous(),
        noise=None if keyed else noise.float().contiguous(),
        keys=noise if keyed else None,
        greedy_rows=greedy_rows,
    )
    host = torch.cat([out, accepted]).cpu().numpy()
    row_ids, counts = host[: probs.shape[0]], host[probs.shape[0] :]
    tokens = [
        row_ids[start : start + a + 1].tolist()
        for start, a in zip(layout.starts.tolist(), counts.tolist())
    ]
    return row_ids, tokens
