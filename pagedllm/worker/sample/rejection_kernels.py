"""The rejection sampler's verification in one Triton launch (`rejection.rejection_sample` on CUDA).

One program per drafting request, over its 1 + k rows (`DraftLayout`: rows `start .. start + k`,
drafts `start - i .. start - i + k - 1` for request i, since `start = i + sum of the drafts
before`): it walks the drafts in order, accepting draft d of row j while `u_j < p_j(d)` (a
deterministic draft, q one-hot) or `u_j * q_j(d) < p_j(d)` (a probabilistic one: u < p / q
without dividing by q), the same fp32 comparisons as the torch path. At the first rejected row
it draws the recovered token from the residual (p with the draft's entry zeroed, or
max(p - q, 0)), after k acceptances the bonus token from p_k: the exponential race
`argmax_v(residual_v / E_v)` (no normalization needed), with the division rounded to nearest
(`div_rn`: torch's `div_`), so that given the same E the kernel picks torch's token: the first
maximum, as `argmax`. A greedy row takes `argmax_v(residual_v)` (E = 1, as torch's path).

E comes either from a tensor (fp32 [N, V]: the torch path's noise, for tests or a caller that drew
it) or is hashed in the kernel from a 64-bit key per row (`kernels._exponential`: the one-pass
sampler's noise, so no [N, V] noise tensor is drawn or read). The acceptance uniforms are an
input (fp32 [sum k]). Outputs: int64 [N] tokens by row (the accepted drafts, then the recovered /
bonus token at row `start + a`, then 0 in the rows after it) and int64 [R] accepted counts.

NOTE: each program reads only the rows it needs (the drafts' k entries of p, then one full row
of p, of q when given, of E when given); rows past the first rejection are never read. Grid
`(R,)`: with few requests most SMs idle, but one row per request is the whole read.
NOTE: compiled, the hashed E uses `lg2.approx` (as the sampling kernel): the GPU's E differ
from the interpreter's numpy mirror in the last bits, so only the tensor-noise form compares
exactly with the torch path on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.worker.sample.kernels import _exponential

BLOCK = 1024
NUM_WARPS = 8


@triton.jit(do_not_specialize=["num_reqs"])  # one compile per variant, whatever the batch
def _rejection_kernel(
    probs_ptr,
    q_ptr,
    noise_ptr,
    keys_ptr,
    greedy_ptr,
    meta_ptr,  # int64: starts [R], then num_drafts [R], then draft ids [sum k]
    uniforms_ptr,
    out_ptr,
    accepted_ptr,
    num_reqs,
    vocab,
    stride_p,
    stride_q,
    stride_n,
    HAS_Q: tl.constexpr,
    NOISE: tl.constexpr,  # 0: greedy only (E = 1), 1: E from noise_ptr, 2: hashed from keys
    HAS_GREEDY: tl.constexpr,
    BLOCK: tl.constexpr,
    FAST_LOG: tl.constexpr,
):
    req = tl.program_id(0)
    start = tl.load(meta_ptr + req)
    k = tl.load(meta_ptr + num_reqs + req)
    d0 = start - req  # the request's first draft
    ids_ptr = meta_ptr + 2 * num_reqs
    # The accepted count: a runs while every draft so far was accepted.
    a = k * 0
    go = k * 0 + 1
    for j in range(0, k):
        d = tl.load(ids_ptr + d0 + j)
        p = tl.load(probs_ptr + (start + j) * stride_p + d)
        u = tl.load(uniforms_ptr + d0 + j)
        if HAS_Q:
            q = tl.load(q_ptr + (d0 + j) * stride_q + d)
            ok = u * q < p
        else:
            ok = u < p
        go = go * ok.to(tl.int64)
        a += go
    rejected = a < k
    row = start + a
    d_rej = tl.load(ids_ptr + d0 + a, mask=rejected, other=-1)  # -1: no entry is zeroed
    p_row = probs_ptr + row * stride_p
    q_row = q_ptr + (d0 + a) * stride_q
    if HAS_GREEDY:  # noqa: SIM108 (a compile-time branch)
        noisy = tl.load(greedy_ptr + row) == 0
    else:
        noisy = True
    if NOISE == 2:
        key = tl.load(keys_ptr + row)
        key_lo = (key & 0xFFFFFFFF).to(tl.uint32)
        key_hi = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
    q_end = tl.where(rejected, vocab, 0)  # q is read only at a rejection
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = lanes
    for off in range(0, vocab, BLOCK):
        idx = off + lanes
        inside = idx < vocab
        r = tl.load(p_row + idx, mask=inside, other=float("-inf"))
        if HAS_Q:
            q_v = tl.load(q_row + idx, mask=idx < q_end, other=0.0)
            r = tl.where(idx < q_end, tl.maximum(r - q_v, 0.0), r)
        else:
            r = tl.where(idx == d_rej, 0.0, r)
        if NOISE == 1:
            e = tl.load(noise_ptr + row * stride_n + idx, mask=inside, other=1.0)
            r = tl.where(noisy, tl.div_rn(r, e), r)
        elif NOISE == 2:
            e = _exponential(idx, key_lo, key_hi, FAST_LOG)
            r = tl.where(noisy, tl.div_rn(r, e), r)
        better = r > best  # NOTE: strict, so each lane keeps its first maximum
        best = tl.where(better, r, best)
        best_idx = tl.where(better, idx, best_idx)
    top = tl.max(best, axis=0)
    token = tl.min(tl.where(best == top, best_idx, vocab), axis=0).to(tl.int64)
    for j in range(0, k + 1):
        d = tl.load(ids_ptr + d0 + j, mask=j < a, other=0)
        tl.store(out_ptr + start + j, tl.where(j == a, token, d))
    tl.store(accepted_ptr + req, a)


def verify(
    probs: torch.Tensor,
    meta: torch.Tensor,
    num_reqs: int,
    uniforms: torch.Tensor,
    *,
    draft_probs: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    greedy_rows: torch.Tensor | None = None,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The verification of `probs` (fp32 [N, V], unit stride over V) against the drafts in
    `meta` (int64, on probs' device: the layout's starts [R], num_drafts [R], draft ids [sum k]).
    `uniforms` (fp32 [sum k]); `draft_probs` (fp32 [sum k, V]; None: deterministic drafts); the
    race's E: `noise` (fp32 [N, V]) or `keys` (int64 [N]), or neither (every row greedy);
    `greedy_rows` (bool [N]: rows without noise; None: none). Returns (tokens by row int64 [N],
    accepted counts int64 [R])."""
    rows, vocab = probs.shape
    total = meta.numel() - 2 * num_reqs
    if probs.dtype != torch.float32 or probs.stride(1) != 1:
        raise ValueError(f"probs must be fp32 [rows, vocab] with unit stride, got {probs.dtype}")
    if meta.dtype != torch.int64 or rows != num_reqs + total:
        raise ValueError(f"meta must be int64 starts, counts and ids of {rows} rows")
    if uniforms.shape != (total,) or uniforms.dtype != torch.float32:
        raise ValueError(f"uniforms must be float32 [{total}]")
    if noise is not None and keys is not None:
        raise ValueError("verify: give noise or keys, not both")
    for name, t in (("draft_probs", draft_probs), ("noise", noise)):
        want = (total if name == "draft_probs" else rows, vocab)
        if t is not None and (t.shape != want or t.dtype != torch.float32 or t.stride(1) != 1):
            raise ValueError(f"{name} must be fp32 {list(want)} with unit stride")
    if keys is not None and (keys.shape != (rows,) or keys.dtype != torch.int64):
        raise ValueError(f"keys must be int64 [{rows}]")
    out = torch.empty(rows, dtype=torch.int64, device=probs.device)
    accepted = torch.empty(num_reqs, dtype=torch.int64, device=probs.device)
    if num_reqs == 0:
        return out, accepted
    greedy = None if greedy_rows is None else greedy_rows.to(torch.int8)
    dummy = probs
    _rejection_kernel[(num_reqs,)](
        probs,
        dummy if draft_probs is None else draft_probs,
        dummy if noise is None else noise,
        dummy if keys is None else keys,
        dummy if greedy is None else greedy,
        meta,
        uniforms,
        out,
        accepted,
        num_reqs,
        vocab,
        probs.stride(0),
        0 if draft_probs is None else draft_probs.stride(0),
        0 if noise is None else noise.stride(0),
        HAS_Q=draft_probs is not None,
        NOISE=1 if noise is not None else 2 if keys is not None else 0,
        HAS_GREEDY=greedy is not None,
        BLOCK=block,
        FAST_LOG=probs.is_cuda,
        num_warps=num_warps,
    )
    return out, accepted


def warm_up(vocab: int, device: torch.device) -> None:
    """Compiles the variants the engine launches (hashed noise; with and without draft
    probabilities and greedy rows) for `vocab` entries, so that no request waits for Triton's
    JIT. (Not called by the engine yet: the model runner's warm-up can.)"""
    probs = torch.zeros(2, vocab, dtype=torch.float32, device=device)
    meta = torch.tensor([0, 1, 0], dtype=torch.int64, device=device)  # one request, one draft
    uniforms = torch.zeros(1, dtype=torch.float32, device=device)
    keys = torch.zeros(2, dtype=torch.int64, device=device)
    greedy = torch.zeros(2, dtype=torch.bool, device=device)
    for q in (None, probs[:1]):
        for g in (None, greedy):
            verify(probs, meta, 1, uniforms, draft_probs=q, keys=keys, greedy_rows=g)
