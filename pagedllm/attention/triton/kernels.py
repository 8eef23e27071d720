"""Triton kernels of the paged attention backend and their thin launch wrappers.

Owns:
- `reshape_and_cache`: this step's K/V into the paged cache at `slot_mapping`.
- `paged_attention`: causal (optionally sliding-window) GQA attention of a flat varlen batch over
  the paged cache, FlashAttention-style (online softmax in fp32, exp2 domain). One kernel body,
  launched as
  * the *decode* launch: one program per (request, KV head[, KV split]) for the requests of at
    most `BLOCK_Q = BLOCK_M // G` query rows; the `G` query heads of a KV head are rows of one
    tile, so each K/V tile is read once per KV head. Programs visit the requests in the
    metadata's `decode_order` (longest context first: no long program starts last). With
    `num_splits > 1` (flash-decoding)
    each program covers a slice of its request's KV range and writes fp32 partials that
    `_reduce_splits_kernel` combines;
  * the *varlen* launch: one program per (`BLOCK_Q` query tokens of one request, KV head) for
    the requests of more query rows (prompts and prompt chunks).
- The tile sizes and the split count come from `tiles.py` (host heuristics; re-exported here).

An FP8 cache (constexpr `FP8_KV`) is read as E4M3 tiles cast to the query's dtype (exact), its
per-tensor scales folded in rather than multiplied into every element: `k_scale` into the score
scale (q.k = k_scale * q.k_q) and `v_scale` into the accumulator once at the end (the output is
linear in V; with splits, into each partial).

Two softmax options, constexpr flags (off: the kernel bodies are exactly those without them): `SOFT_CAP` (scores `cap * tanh(s / cap)`, Gemma 2) and `HAS_SINKS` (one value-less logit
per head in the softmax denominator, gpt-oss). Without splits the sink seeds the running max and
sum (`m = sink, l = 1`: a key of weight `exp(sink)` and value 0); with splits the partials carry
none and `_reduce_splits_kernel` adds it once.

Tensors: query/output `[T, H, D]`; K and V caches `[num_blocks, block_size, Hkv, D]` (views of
the `[2, ...]` cache); block table `[num_reqs, width]`, seq lens and query start locs int32.
Row `r` of a program's tile is query token `r // G` of its block and head `kv_head * G + r % G`.

Any head dim D: the kernels' head axis is `padded_head_dim(D)` lanes (`tl.arange` lengths are
powers of two, `tl.dot` needs 16), and every load and store masks the lanes past D (loads read 0
there, so q.k and P @ V are unchanged); the tensors themselves are never padded.
NOTE: a power-of-two D >= 16 is its own tile and compiles to exactly the code of the unpadded
kernels (the lane masks are constexpr-off: PTX compared for sm_90 at D = 16 ... 256).

NOTE: grid sizes come from host ints only (`num_reqs`, `num_actual_tokens`); nothing here
reads a device tensor on the host. Integer arguments that change from step to step (request
count, block-table width, split count) are marked `do_not_specialize`: Triton otherwise compiles
a new variant whenever one of them turns divisible by 16 or equal to 1 (a second or more each,
in the middle of serving).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.attention.fp8_kv import is_fp8
from pagedllm.attention.triton.cache import _in_head, last_dim_contiguous, reshape_and_cache
from pagedllm.attention.triton.tiles import (
    TileConfig,
    choose_num_splits,
    decode_config,
    num_sms,
    padded_head_dim,
    varlen_config,
)

__all__ = [
    "TileConfig",
    "choose_num_splits",
    "decode_config",
    "padded_head_dim",
    "paged_attention",
    "reshape_and_cache",
    "varlen_config",
]

_LOG2E = math.log2(math.e)
# NOTE: the running max starts finite so that a row whose keys are all masked so far keeps
# exp2(-inf - m) = 0 and alpha = 1 instead of NaN.
_M_INIT = tl.constexpr(-1.0e30)
_LOG2E_K = tl.constexpr(_LOG2E)


# ----------------------------------------------------------------------------------------------
# Paged attention
# ----------------------------------------------------------------------------------------------


@triton.jit
def _find_request(query_start_loc_ptr, num_reqs, q_block, BLOCK_Q: tl.constexpr):
    """The request owning varlen program `q_block`: request i's first block is
    `query_start_loc[i] // BLOCK_Q + i` (monotone; a request needs at most
    `query_len // BLOCK_Q + 1` blocks, so the ranges never overlap)."""
    lo: tl.int32 = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp2 of a non-positive argument (no overflow at any |x|)."""
    t = tl.exp2(tl.abs(x) * (-2.0 * _LOG2E_K))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -r, r)


@triton.jit
def _attend_tile(
    acc,
    l_i,
    m_i,
    q,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    kv_head_offset,
    start,
    kv_hi,
    q_pos,
    window,
    qk_scale,
    cap_scale,
    stride_cb,
    stride_cs,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    APPLY_MASK: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8_KV: tl.constexpr,
):
    """One online-softmax step over KV positions `start : start + BLOCK_N`, read through the
    block table. Without `APPLY_MASK` every position must be `< kv_hi` and visible to every row.

    Scores in the exp2 domain: `q.k * qk_scale`, or with `SOFT_CAP`
    `tanh(q.k * qk_scale) * cap_scale` (qk_scale = scale / cap, cap_scale = cap * log2(e))."""
    pos = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_P)
    if APPLY_MASK:
        in_range = pos < kv_hi
        block = tl.load(block_table_ptr + pos // BLOCK_SIZE, mask=in_range, other=0)
    else:
        block = tl.load(block_table_ptr + pos // BLOCK_SIZE)
    slot = block.to(tl.int64) * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head_offset
    k_ptrs = k_cache_ptr + slot[None, :] + offs_d[:, None]  # [D, BLOCK_N]
    v_ptrs = v_cache_ptr + slot[:, None] + offs_d[None, :]  # [BLOCK_N, D]
    if APPLY_MASK:
        k_mask = _in_head(in_range[None, :], offs_d[:, None], HEAD_DIM, HEAD_DIM_P)
        k = tl.load(k_ptrs, mask=k_mask, other=0.0)
    elif HEAD_DIM_P != HEAD_DIM:
        k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
    else:
        k = tl.load(k_ptrs)
    if FP8_KV:
        k = k.to(q.dtype)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    if SOFT_CAP:
        s = _tanh(s) * cap_scale
    if APPLY_MASK:
        visible = pos[None, :] <= q_pos[:, None]
        if USE_WINDOW:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if APPLY_MASK:
        v_mask = _in_head(in_range[:, None], offs_d[None, :], HEAD_DIM, HEAD_DIM_P)
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
    elif HEAD_DIM_P != HEAD_DIM:
        v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        v = tl.load(v_ptrs)
    if FP8_KV:
        v = v.to(q.dtype)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["num_reqs", "min_query_len", "num_splits", "window", "stride_bt"])
def _paged_attention_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    order_ptr,  # int32 [num_reqs]: the decode launch's request order (HAS_ORDER only)
    part_acc_ptr,  # fp32 [T, H, num_splits, D] (SPLIT only)
    part_m_ptr,  # fp32 [T, H, num_splits] (SPLIT only)
    part_l_ptr,  # fp32 [T, H, num_splits] (SPLIT only)
    sinks_ptr,  # [H] (HAS_SINKS only)
    k_scale_ptr,  # fp32 [] (FP8_KV only)
    v_scale_ptr,  # fp32 [] (FP8_KV only)
    num_reqs,
    min_query_len,
    num_heads,
    num_splits,
    qk_scale,
    cap_scale,
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    NUM_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_DECODE: tl.constexpr,
    HAS_ORDER: tl.constexpr,
    SPLIT: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FP8_KV: tl.constexpr,
):
    # NOTE: grid (KV head, request or q block, split): the KV heads of one q block run side by
    # side, and varlen q blocks go last to first, so the longest (causal) ones start first.
    kv_head = tl.program_id(0)
    if IS_DECODE:
        req = tl.program_id(1)
        if HAS_ORDER:  # longest context first: the long programs must not start last
            req = tl.load(order_ptr + req)
        q_block = 0
    else:
        pid = tl.num_programs(1) - 1 - tl.program_id(1)
        req = _find_request(query_start_loc_ptr, num_reqs, pid, BLOCK_Q)
        q_block = pid - (tl.load(query_start_loc_ptr + req) // BLOCK_Q + req)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if IS_DECODE:
        if q_len > BLOCK_Q:  # the varlen launch's
            return
    elif (q_len < min_query_len) | (q_block * BLOCK_Q >= q_len):
        return
    seq_len = tl.load(seq_lens_ptr + req)
    ctx_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + offs_m // NUM_GROUP  # query row within the request
    row_valid = (offs_m < BLOCK_Q * NUM_GROUP) & (tok < q_len)
    q_pos = ctx_len + tok
    head = kv_head * NUM_GROUP + offs_m % NUM_GROUP
    rows = (q_start + tok).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_P)
    row_mask = _in_head(row_valid[:, None], offs_d[None, :], HEAD_DIM, HEAD_DIM_P)
    q_ptrs = q_ptr + rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_mask, other=0.0)

    # KV positions [kv_lo, kv_hi) cover every valid row; tiles start at kv_lo + k * BLOCK_N.
    first_q = ctx_len + q_block * BLOCK_Q
    last_q = ctx_len + tl.minimum((q_block + 1) * BLOCK_Q, q_len) - 1
    kv_hi = last_q + 1
    kv_lo = 0
    full_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(first_q - window + 1, 0) // BLOCK_N * BLOCK_N
        full_lo = kv_lo + tl.cdiv(tl.maximum(last_q - window + 1 - kv_lo, 0), BLOCK_N) * BLOCK_N
    # NOTE: tiles in [full_lo, full_hi) are visible to every valid row and need no mask.
    full_hi = tl.maximum(kv_lo + (first_q + 1 - kv_lo) // BLOCK_N * BLOCK_N, full_lo)
    tile_lo = kv_lo
    tile_hi = kv_hi
    if SPLIT:
        per_split = tl.cdiv(tl.cdiv(kv_hi - kv_lo, BLOCK_N), num_splits) * BLOCK_N
        tile_lo = kv_lo + tl.program_id(2) * per_split
        tile_hi = tl.minimum(kv_hi, tile_lo + per_split)

    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], _M_INIT, dtype=tl.float32)
    if HAS_SINKS and not SPLIT:
        # The sink as a key of logit `sink` and value 0 (the reduction adds it with splits).
        m_i = tl.load(sinks_ptr + head).to(tl.float32) * _LOG2E_K
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    if FP8_KV:
        qk_scale = qk_scale * tl.load(k_scale_ptr).to(tl.float32)
    bt_ptr = block_table_ptr + req.to(tl.int64) * stride_bt
    kv_off = kv_head * stride_ch
    for start in range(tile_lo, tl.minimum(full_lo, tile_hi), BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_ptr, kv_off, start, kv_hi, q_pos,
            window, qk_scale, cap_scale, stride_cb, stride_cs, HEAD_DIM, HEAD_DIM_P, BLOCK_N,
            BLOCK_SIZE, True, USE_WINDOW, SOFT_CAP, DOT_PRECISION, FP8_KV,
        )  # fmt: skip
    for start in range(tl.maximum(tile_lo, full_lo), tl.minimum(full_hi, tile_hi), BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_ptr, kv_off, start, kv_hi, q_pos,
            window, qk_scale, cap_scale, stride_cb, stride_cs, HEAD_DIM, HEAD_DIM_P, BLOCK_N,
            BLOCK_SIZE, False, USE_WINDOW, SOFT_CAP, DOT_PRECISION, FP8_KV,
        )  # fmt: skip
    for start in range(tl.maximum(tile_lo, full_hi), tile_hi, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_ptr, kv_off, start, kv_hi, q_pos,
            window, qk_scale, cap_scale, stride_cb, stride_cs, HEAD_DIM, HEAD_DIM_P, BLOCK_N,
            BLOCK_SIZE, True, USE_WINDOW, SOFT_CAP, DOT_PRECISION, FP8_KV,
        )  # fmt: skip

    if FP8_KV:
        acc = acc * tl.load(v_scale_ptr).to(tl.float32)
    if SPLIT:
        part = (rows * num_heads + head) * num_splits + tl.program_id(2)
        tl.store(part_m_ptr + part, m_i, mask=row_valid)
        tl.store(part_l_ptr + part, l_i, mask=row_valid)
        acc_ptrs = part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(acc_ptrs, acc, mask=row_mask)
    else:
        # NOTE: every valid row sees at least its own position, so l_i > 0 there.
        out = acc / tl.where(row_valid, l_i, 1.0)[:, None]
        out_ptrs = out_ptr + rows[:, None] * stride_ot + head[:, None] * stride_oh
        tl.store(out_ptrs + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_splits_kernel(
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    sinks_ptr,  # [H] (HAS_SINKS only)
    num_heads,
    num_splits,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    SPLITS_P: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    """One program per (token, head): the softmax-weighted sum of the splits' partials (and,
    with `HAS_SINKS`, the head's sink once in the denominator)."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    base = (row * num_heads + head) * num_splits
    offs_s = tl.arange(0, SPLITS_P)
    offs_d = tl.arange(0, HEAD_DIM_P)
    s_mask = offs_s < num_splits
    m = tl.load(part_m_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
    l_s = tl.load(part_l_ptr + base + offs_s, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * _LOG2E_K
        m_max = tl.maximum(m_max, sink)
    weight = tl.exp2(m - m_max)  # empty splits: exp2(-1e30 - max) = 0
    acc_ptrs = part_acc_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :]
    acc_mask = _in_head(s_mask[:, None], offs_d[None, :], HEAD_DIM, HEAD_DIM_P)
    acc = tl.load(acc_ptrs, mask=acc_mask, other=0.0)
    denom = tl.sum(l_s * weight, 0)
    if HAS_SINKS:
        denom += tl.exp2(sink - m_max)
    out = tl.sum(acc * weight[:, None], 0) / denom
    out_ptrs = out_ptr + row * stride_ot + head * stride_oh + offs_d
    if HEAD_DIM_P != HEAD_DIM:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)
    else:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# Host side: launches
# ----------------------------------------------------------------------------------------------


def paged_attention(
    query: torch.Tensor,  # [>= T, H, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    metadata: AttentionMetadata,
    output: torch.Tensor,  # [>= T, H, D]; rows < T are written
    scale: float,
    sliding_window: int | None,
    num_splits: int | None = None,
    use_decode_launch: bool = True,
    decode_tiles: TileConfig | None = None,
    varlen_tiles: TileConfig | None = None,
    logits_soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,  # [H]
    k_scale: torch.Tensor | None = None,  # fp32 [] (an FP8 cache; None: 1.0)
    v_scale: torch.Tensor | None = None,
) -> None:
    """Attention of the batch's first `num_actual_tokens` query rows over the paged cache.

    `num_splits`: KV splits of a pure-decode batch (None: `choose_num_splits`; 1: off).
    `use_decode_launch=False` sends every request through the varlen launch (tests).
    `logits_soft_cap` and `sinks`: the softmax options of `AttentionImpl`; `k_scale` /
    `v_scale`: an FP8 cache's scales.
    """
    num_tokens, num_reqs = metadata.num_actual_tokens, metadata.num_reqs
    if num_tokens == 0 or num_reqs == 0:
        return
    _, _, _, num_kv_heads, head_dim = kv_cache.shape
    num_heads = query.shape[1]
    group = num_heads // num_kv_heads
    query = last_dim_contiguous(query)
    assert output.stride(-1) == 1
    dec = decode_tiles or decode_config(group, head_dim, query.dtype)
    var = varlen_tiles or varlen_config(group, head_dim, query.dtype)
    dec_q = dec.block_m // group if use_decode_launch else 0
    if sinks is not None:
        assert sinks.shape == (num_heads,) and sinks.stride(0) == 1
    scales = None
    if is_fp8(kv_cache.dtype):
        one = torch.ones((), dtype=torch.float32, device=kv_cache.device)
        scales = (one if k_scale is None else k_scale, one if v_scale is None else v_scale)
    common = _LaunchArgs(
        query, kv_cache, metadata, output, scale, sliding_window, logits_soft_cap, sinks, scales
    )
    if metadata.max_query_len <= dec_q:
        max_kv_len = metadata.max_seq_len
        if sliding_window is not None:
            max_kv_len = min(max_kv_len, sliding_window + dec_q + dec.block_n)
        if num_splits is None:
            num_splits = choose_num_splits(
                num_reqs, num_kv_heads, max_kv_len, dec.block_n, num_sms(query.device)
            )
        _launch(common, dec, (num_kv_heads, num_reqs, num_splits), True, 0, num_splits)
        return
    if dec_q > 0:
        _launch(common, dec, (num_kv_heads, num_reqs, 1), True, 0, 1)
    block_q = var.block_m // group
    grid = (num_kv_heads, num_tokens // block_q + num_reqs, 1)
    _launch(common, var, grid, False, dec_q + 1, 1)


@dataclass
class _LaunchArgs:
    query: torch.Tensor
    kv_cache: torch.Tensor
    metadata: AttentionMetadata
    output: torch.Tensor
    scale: float
    sliding_window: int | None
    logits_soft_cap: float | None
    sinks: torch.Tensor | None
    scales: tuple[torch.Tensor, torch.Tensor] | None  # (k_scale, v_scale) of an FP8 cache


def _launch(
    a: _LaunchArgs,
    tiles: TileConfig,
    grid: tuple[int, int, int],
    is_decode: bool,
    min_query_len: int,
    num_splits: int,
) -> None:
    md, query, output = a.metadata, a.query, a.output
    key_cache, value_cache = a.kv_cache[0], a.kv_cache[1]
    order = md.decode_order if is_decode else None
    block_size, num_kv_heads, head_dim = key_cache.shape[1:]
    num_heads = query.shape[1]
    group = num_heads // num_kv_heads
    split = num_splits > 1
    if split:
        num_tokens = md.num_actual_tokens
        f32 = dict(dtype=torch.float32, device=query.device)
        part_acc = torch.empty(num_tokens, num_heads, num_splits, head_dim, **f32)
        part_m = torch.empty(num_tokens, num_heads, num_splits, **f32)
        part_l = torch.empty(num_tokens, num_heads, num_splits, **f32)
    else:
        part_acc = part_m = part_l = output  # unused
    sinks = output if a.sinks is None else a.sinks  # unused without HAS_SINKS
    k_scale, v_scale = (output, output) if a.scales is None else a.scales  # unused without FP8
    cap = a.logits_soft_cap
    # NOTE: exp2 domain; with a cap the kernel computes tanh(q.k * scale / cap) * cap * log2(e).
    qk_scale = a.scale * _LOG2E if cap is None else a.scale / cap
    cap_scale = 1.0 if cap is None else cap * _LOG2E
    _paged_attention_kernel[grid](
        output,
        query,
        key_cache,
        value_cache,
        md.block_table,
        md.seq_lens,
        md.query_start_loc,
        md.seq_lens if order is None else order,  # unused without HAS_ORDER
        part_acc,
        part_m,
        part_l,
        sinks,
        k_scale,
        v_scale,
        md.num_reqs,
        min_query_len,
        num_heads,
        num_splits,
        qk_scale,
        cap_scale,
        a.sliding_window or 0,
        query.stride(0),
        query.stride(1),
        output.stride(0),
        output.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        md.block_table.stride(0),
        NUM_GROUP=group,
        HEAD_DIM=head_dim,
        HEAD_DIM_P=padded_head_dim(head_dim),
        BLOCK_SIZE=block_size,
        BLOCK_M=tiles.block_m,
        BLOCK_Q=tiles.block_m // group,
        BLOCK_N=tiles.block_n,
        IS_DECODE=is_decode,
        HAS_ORDER=order is not None,
        SPLIT=split,
        USE_WINDOW=a.sliding_window is not None,
        SOFT_CAP=cap is not None,
        HAS_SINKS=a.sinks is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        FP8_KV=a.scales is not None,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    if split:
        _reduce_splits_kernel[(md.num_actual_tokens, num_heads)](
            output,
            part_acc,
            part_m,
            part_l,
            sinks,
            num_heads,
            num_splits,
            output.stride(0),
            output.stride(1),
            HEAD_DIM=head_dim,
            HEAD_DIM_P=padded_head_dim(head_dim),
            SPLITS_P=triton.next_power_of_2(num_splits),
            HAS_SINKS=a.sinks is not None,
            num_warps=4,
        )
