"""The sampler's torch ops: whole-batch tensor ops over the logits of the sampled rows.

The logits processors, in place, before the draw (they can change the argmax): the grammar's
token bitmask (`apply_token_bitmask`, before the raw logprobs are taken), then allowed ids,
banned ids, logit bias and the three penalties (`apply_logits_processors`). The filters, on
temperature-scaled logits: min-p, top-k, top-p (`apply_filters`). The draws: the argmax
(`argmax_rows`) and the exponential race (`random_sample`). Each op works on every row at once,
with per-row parameters (no loop over requests, except one generator call per seeded row).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pagedllm.worker.sample.metadata import Penalties, SamplingMetadata

NEG_INF = float("-inf")


def argmax_rows(x: torch.Tensor, chunked: bool | None = None) -> torch.Tensor:
    """`x.argmax(-1)` for `[R, V]`, faster on the GPU for a few long rows: torch reduces each row
    in one thread block (28 µs for one 128k-vocabulary row on an H200); here each row is cut into
    chunks reduced in parallel, then the best chunk is picked. The same index as `argmax` (the
    first maximum: `max` and `argmax` both return the first, chunks are in order).
    `chunked` forces the choice (tests); by default chunks on CUDA for at most 16 rows."""
    rows, vocab = x.shape
    chunks = next((c for c in (256, 128, 64, 32, 16) if vocab % c == 0), 1)
    if chunked is None:
        chunked = x.is_cuda and rows <= 16 and vocab >= 8192
    if not chunked or chunks == 1:
        return x.argmax(dim=-1)
    values, within = x.view(rows, chunks, vocab // chunks).max(dim=-1)
    best = values.argmax(dim=-1, keepdim=True)
    return (within.gather(1, best) + best * (vocab // chunks)).squeeze(1)


def random_sample(
    probs: torch.Tensor,
    generator: torch.Generator | None,
    generators: dict[int, torch.Generator],
) -> torch.Tensor:
    """Samples one id per row from `probs` without a host sync (the exponential race:
    argmax(p / E) with E ~ Exp(1) is distributed as p). A seeded row draws its noise from its
    own generator, so its samples do not depend on the other rows of the batch."""
    q = torch.empty_like(probs)
    if len(generators) != probs.shape[0]:
        _exponential_(q, generator)
    for i, gen in generators.items():
        _exponential_(q[i], gen)
    return argmax_rows(probs.div_(q))


def _exponential_(out: torch.Tensor, generator: torch.Generator | None) -> None:
    """Fills `out` with Exp(1) noise. On the CPU, -log(U) with U ~ Uniform[0, 1) is 4-5x faster
    than `exponential_` (U = 0 gives +inf, a weight of 0: harmless)."""
    if out.device.type == "cpu":
        out.uniform_(generator=generator).log_().neg_()
    else:
        out.exponential_(generator=generator)


def apply_penalties(logits: torch.Tensor, p: Penalties) -> None:
    """vLLM's penalties, in place: repetition over prompt and output tokens (divides positive
    logits, multiplies negative ones), frequency (× count) and presence over output tokens."""
    vocab = logits.shape[1]
    num_rows = p.rows.shape[0]
    out_idx = torch.where(p.output_mask, p.token_ids, vocab)
    counts = torch.zeros(num_rows, vocab + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, out_idx, torch.ones_like(out_idx, dtype=logits.dtype))
    counts = counts[:, :vocab]
    prompt_idx = torch.where(p.prompt_mask, p.token_ids, vocab)
    seen = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, prompt_idx, True)
    seen = seen[:, :vocab] | (counts > 0)
    sub = logits[p.rows]
    rep = p.repetition.unsqueeze(1)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub -= p.frequency.unsqueeze(1) * counts
    sub -= p.presence.unsqueeze(1) * (counts > 0).to(sub.dtype)
    logits[p.rows] = sub


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Masks tokens whose probability is below min_p × the row's top probability."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    logits.masked_fill_(probs < threshold, NEG_INF)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> None:
    """Keeps the tokens at least as likely as each row's k-th (rows with k = 0 keep all)."""
    max_top_k = min(max_top_k, logits.shape[1])
    k = top_k.clamp(min=1, max=max_top_k)
    threshold = logits.topk(max_top_k, dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    threshold.masked_fill_((top_k == 0).unsqueeze(1), NEG_INF)
    logits.masked_fill_(logits < threshold, NEG_INF)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor
) -> torch.Tensor:
    """Top-k then top-p (keep the fewest top tokens whose probability reaches p), by one sort."""
    vocab = logits.shape[1]
    ascending, order = logits.sort(dim=-1)
    if top_k is not None:
        k = torch.where(top_k == 0, vocab, top_k).clamp(max=vocab)
        threshold = ascending.gather(1, (vocab - k).unsqueeze(1))
        ascending.masked_fill_(ascending < threshold, NEG_INF)
    cum = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - top_p.unsqueeze(1)
    drop[:, -1] = False  # NOTE: the most likely token always stays
    ascending.masked_fill_(drop, NEG_INF)
    return logits.scatter_(1, order, ascending)


def apply_top_k_top_p_candidates(
    logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int, top_p: torch.Tensor
) -> torch.Tensor:
    """Top-k then top-p when every row has a top-k: only the `max_top_k` candidates are sorted
    (the vocabulary-wide sort of `apply_top_k_top_p` is the sampler's most expensive op).

    NOTE: a token tied with a row's k-th logit but ranked past `max_top_k` is dropped, where the
    full sort keeps it; the kept set is otherwise the same.
    """
    values, indices = logits.topk(max_top_k, dim=-1)
    kth = values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))
    values.masked_fill_(values < kth, NEG_INF)
    probs = values.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    values.masked_fill_(mass_above >= top_p.unsqueeze(1), NEG_INF)
    out = torch.full_like(logits, NEG_INF)
    return out.scatter_(1, indices, values)


def apply_filters(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """min_p, then top-k and top-p, on temperature-scaled logits (in place, or a new tensor)."""
    if md.min_p is not None:
        apply_min_p(logits, md.min_p)
    if md.top_p is not None and md.top_k is not None and md.top_k_in_all_rows:
        return apply_top_k_top_p_candidates(logits, md.top_k, md.max_top_k, md.top_p)
    if md.top_p is not None:
        return apply_top_k_top_p(logits, md.top_k, md.top_p)
    if md.top_k is not None:
        apply_top_k(logits, md.top_k, md.max_top_k)
    return logits


def apply_logits_processors(logits: torch.Tensor, md: SamplingMetadata) -> None:
    """Allowed ids, banned ids, logit bias, penalties: the processors of the sampling
    parameters, in place (after the raw logprobs are taken)."""
    if md.allowed is not None:
        assert md.allowed_rows is not None
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[md.allowed_rows] = True
        mask[md.allowed.rows, md.allowed.token_ids] = False
        logits.masked_fill_(mask, NEG_INF)
    if md.banned is not None:
        logits[md.banned.rows, md.banned.token_ids] = NEG_INF
    if md.logit_bias is not None:
        assert md.logit_bias.values is not None
        logits.index_put_(
            (md.logit_bias.rows, md.logit_bias.token_ids),
            md.logit_bias.values,
            accumulate=True,
        )
    if md.penalties is not None:
        apply_penalties(logits, md.penalties)


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None
) -> None:
    """Masks to -inf, in place, the tokens a grammar forbids. `bitmask`: int32 [M, ceil(V / 32)]
    in xgrammar's layout (bit j of word i, the least significant first, set: token 32 i + j
    allowed; the bits past V are ignored), for the rows `rows` of `logits [R, V]` (int64 [M],
    distinct; None: M = R, row for row). Other rows are untouched, as are allowed tokens.

    NOTE: the words are unpacked as little-endian bytes (every CPU and GPU torch runs on), one
    byte per token: a [M, V] temporary. A fused kernel (xgrammar's) can replace this later."""
    vocab = logits.shape[1]
    words = -(-vocab // 32)
    num_rows = logits.shape[0] if rows is None else rows.shape[0]
    if bitmask.dtype != torch.int32 or tuple(bitmask.shape) != (num_rows, words):
        raise ValueError(
            f"the token bitmask must be int32 [{num_rows}, {words}] (rows, ceil({vocab} / 32)), "
            f"got {bitmask.dtype} {tuple(bitmask.shape)}"
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    bits = bitmask.contiguous().view(torch.uint8).unsqueeze(-1) >> shifts  # [M, 4 W, 8]
    forbidden = (bits & 1).view(num_rows, words * 32)[:, :vocab] == 0
    if rows is None:
        logits.masked_fill_(forbidden, NEG_INF)
    else:
        logits[rows] = logits[rows].masked_fill_(forbidden, NEG_INF)
