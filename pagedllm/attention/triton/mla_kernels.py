"""Triton kernels of MLA's decode (multi-head latent attention, `attention/mla.py`) over the
paged latent cache `[num_blocks, block_size, R + P]` (R = kv_lora_rank: the latent c_kv, P =
qk_rope_head_dim: the rotated k_pe), and their launch wrappers.

Owns:
- `write_latents`: this step's latent rows into the cache at `slot_mapping`; negative slots (the
  padding rows of a CUDA graph) are skipped;
- `mla_decode`: absorbed attention of the single-row (decode) requests of a batch. One program
  per (request, block of `BLOCK_H` query heads[, KV split]): every query head attends to the
  same latent "KV head", so each `[BLOCK_N, R]` c_kv tile is read once for the block's heads and
  serves twice, as key and as value:

      s   = (q_latent . c_kv + q_pe . k_pe) * scale       (two tl.dot: R wide, P wide)
      out = sum_s softmax(s) c_kv                          (the latent; W_UV applied outside)

  in fp32 with an online softmax in the exp2 domain, as `kernels._attend_tile`. With
  `num_splits > 1` (flash-decoding) each program covers a slice of the request's context and
  writes fp32 partials that `kernels._reduce_splits_kernel` combines (the regular backend's).

Requests of more than one query row are skipped (their rows are left as they are: the caller
computes prompts). Any R and P: the kernel's lanes are padded to powers of two >= 16 and masked,
as in `kernels.py`.

NOTE: grid sizes come from host ints only (`num_reqs`, `num_actual_tokens`, the split count):
no device tensor is read on the host, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.attention.triton.cache import _in_head
from pagedllm.attention.triton.kernels import _reduce_splits_kernel
from pagedllm.attention.triton.tiles import choose_num_splits, num_sms, padded_head_dim

__all__ = ["MLATileConfig", "mla_decode", "mla_decode_config", "write_latents"]

_LOG2E = math.log2(math.e)
_M_INIT = tl.constexpr(-1.0e30)  # finite: see kernels.py


@dataclass(frozen=True)
class MLATileConfig:
    """`block_h` query heads per program, `block_n` latent rows per step."""

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int


def mla_decode_config(num_heads: int, dtype: torch.dtype) -> MLATileConfig:
    """16 heads x 32 latent rows (SGLang's grouped decode at R = 512, P = 64); 16 rows in fp32,
    whose tiles take twice the registers. NOTE: `tl.dot` needs 16 rows: fewer heads are
    masked rows of the tile."""
    del num_heads  # NOTE: more heads run as more head blocks (the latents are read per block)
    block_n = 16 if dtype == torch.float32 else 32
    return MLATileConfig(block_h=16, block_n=block_n, num_warps=4, num_stages=2)


# ----------------------------------------------------------------------------------------------
# Cache write
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_tokens"])
def _write_latents_kernel(
    latent_ptr,
    cache_ptr,
    slot_mapping_ptr,
    num_tokens,
    stride_lt,
    stride_cb,
    stride_cs,
    DIM: tl.constexpr,
    DIM_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per token: its latent row into slot `slot_mapping[t]` (none if negative)."""
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    offs = tl.arange(0, DIM_P)
    mask = offs < DIM
    row = tl.load(latent_ptr + tok * stride_lt + offs, mask=mask)
    dst = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
    tl.store(dst + offs, row.to(cache_ptr.dtype.element_ty), mask=mask)


def write_latents(
    latent: torch.Tensor,  # [>= num_tokens, D]
    kv_cache: torch.Tensor,  # [num_blocks, block_size, D]
    slot_mapping: torch.Tensor,  # int64 [num_tokens]
    num_tokens: int,
) -> None:
    """Stores token `t`'s latent row in flat slot `slot_mapping[t]` (cast to the cache's
    dtype); a negative slot marks a padding token and is skipped."""
    if num_tokens == 0:
        return
    _, block_size, dim = kv_cache.shape
    assert latent.stride(-1) == 1 and kv_cache.stride(-1) == 1
    _write_latents_kernel[(num_tokens,)](
        latent, kv_cache, slot_mapping, num_tokens, latent.stride(0), kv_cache.stride(0),
        kv_cache.stride(1), DIM=dim, DIM_P=triton.next_power_of_2(dim), BLOCK_SIZE=block_size,
        num_warps=4,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Decode
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_lanes(ptrs, offs, DIM: tl.constexpr, DIM_P: tl.constexpr):
    """A tile whose lanes past `DIM` read 0 (no mask at all when `DIM` is its own tile)."""
    if DIM_P != DIM:
        return tl.load(ptrs, mask=offs < DIM, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _attend_latents(
    acc,
    l_i,
    m_i,
    q_lat,  # [BLOCK_H, RANK_P]
    q_pe,  # [BLOCK_H, ROPE_P]
    cache_ptr,
    bt_ptr,
    start,
    kv_hi,
    qk_scale,
    stride_cb,
    stride_cs,
    RANK: tl.constexpr,
    RANK_P: tl.constexpr,
    ROPE: tl.constexpr,
    ROPE_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    APPLY_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over latent rows `start : start + BLOCK_N` (through the block
    table); without `APPLY_MASK` every row must be `< kv_hi`."""
    pos = start + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RANK_P)
    offs_p = tl.arange(0, ROPE_P)
    in_range = pos < kv_hi
    if APPLY_MASK:
        block = tl.load(bt_ptr + pos // BLOCK_SIZE, mask=in_range, other=0)
    else:
        block = tl.load(bt_ptr + pos // BLOCK_SIZE)
    slot = block.to(tl.int64) * stride_cb + (pos % BLOCK_SIZE) * stride_cs  # [BLOCK_N]
    # NOTE: masked rows read 0 (finite), so their p = 0 adds nothing to the accumulator.
    c_ptrs = cache_ptr + slot[:, None] + offs_r[None, :]  # [BLOCK_N, RANK_P]
    pe_ptrs = cache_ptr + slot[:, None] + RANK + offs_p[None, :]  # [BLOCK_N, ROPE_P]
    if APPLY_MASK:
        c_mask = _in_head(in_range[:, None], offs_r[None, :], RANK, RANK_P)
        c_kv = tl.load(c_ptrs, mask=c_mask, other=0.0)
        pe_mask = _in_head(in_range[:, None], offs_p[None, :], ROPE, ROPE_P)
        k_pe = tl.load(pe_ptrs, mask=pe_mask, other=0.0)
    else:
        c_kv = _load_lanes(c_ptrs, offs_r[None, :], RANK, RANK_P)
        k_pe = _load_lanes(pe_ptrs, offs_p[None, :], ROPE, ROPE_P)
    s = tl.dot(q_lat, tl.trans(c_kv), input_precision=DOT_PRECISION)
    s = tl.dot(q_pe, tl.trans(k_pe), s, input_precision=DOT_PRECISION) * qk_scale
    if APPLY_MASK:
        s = tl.where(in_range[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(c_kv.dtype), c_kv, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _mla_decode_kernel(
    out_ptr,
    q_ptr,
    cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    order_ptr,  # int32 [num_reqs] (HAS_ORDER only)
    part_acc_ptr,  # fp32 [T, H, num_splits, RANK] (SPLIT only)
    part_m_ptr,  # fp32 [T, H, num_splits] (SPLIT only)
    part_l_ptr,  # fp32 [T, H, num_splits] (SPLIT only)
    num_heads,
    num_splits,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_bt,
    RANK: tl.constexpr,
    RANK_P: tl.constexpr,
    ROPE: tl.constexpr,
    ROPE_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_ORDER: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # NOTE: grid (head block, request, split): the head blocks of one request run side by side.
    head_block = tl.program_id(0)
    req = tl.program_id(1)
    if HAS_ORDER:  # longest context first: the long programs must not start last
        req = tl.load(order_ptr + req)
    q_start = tl.load(query_start_loc_ptr + req)
    if tl.load(query_start_loc_ptr + req + 1) - q_start != 1:
        return  # a prompt (the caller's) or a padding row of a CUDA graph
    kv_hi = tl.load(seq_lens_ptr + req)

    head = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_valid = head < num_heads
    row = q_start.to(tl.int64)
    offs_r = tl.arange(0, RANK_P)
    offs_p = tl.arange(0, ROPE_P)
    q_row = q_ptr + row * stride_qt + head[:, None] * stride_qh
    r_mask = _in_head(head_valid[:, None], offs_r[None, :], RANK, RANK_P)
    q_lat = tl.load(q_row + offs_r[None, :], mask=r_mask, other=0.0)
    p_mask = _in_head(head_valid[:, None], offs_p[None, :], ROPE, ROPE_P)
    q_pe = tl.load(q_row + RANK + offs_p[None, :], mask=p_mask, other=0.0)

    tile_lo = 0
    tile_hi = kv_hi
    if SPLIT:
        per_split = tl.cdiv(tl.cdiv(kv_hi, BLOCK_N), num_splits) * BLOCK_N
        tile_lo = tl.program_id(2) * per_split
        tile_hi = tl.minimum(kv_hi, tile_lo + per_split)
    full_hi = tl.maximum(tile_lo + (tile_hi - tile_lo) // BLOCK_N * BLOCK_N, tile_lo)

    acc = tl.zeros([BLOCK_H, RANK_P], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], _M_INIT, dtype=tl.float32)
    bt_ptr = block_table_ptr + req.to(tl.int64) * stride_bt
    for start in range(tile_lo, full_hi, BLOCK_N):
        acc, l_i, m_i = _attend_latents(
            acc, l_i, m_i, q_lat, q_pe, cache_ptr, bt_ptr, start, tile_hi, qk_scale, stride_cb,
            stride_cs, RANK, RANK_P, ROPE, ROPE_P, BLOCK_N, BLOCK_SIZE, False, DOT_PRECISION,
        )  # fmt: skip
    for start in range(full_hi, tile_hi, BLOCK_N):  # the last, partial tile
        acc, l_i, m_i = _attend_latents(
            acc, l_i, m_i, q_lat, q_pe, cache_ptr, bt_ptr, start, tile_hi, qk_scale, stride_cb,
            stride_cs, RANK, RANK_P, ROPE, ROPE_P, BLOCK_N, BLOCK_SIZE, True, DOT_PRECISION,
        )  # fmt: skip

    if SPLIT:
        part = (row * num_heads + head) * num_splits + tl.program_id(2)
        tl.store(part_m_ptr + part, m_i, mask=head_valid)
        tl.store(part_l_ptr + part, l_i, mask=head_valid)
        tl.store(part_acc_ptr + part[:, None] * RANK + offs_r[None, :], acc, mask=r_mask)
    else:
        # NOTE: a decode row sees its own position, so l_i > 0 for every valid head.
        out = acc / tl.where(head_valid, l_i, 1.0)[:, None]
        out_ptrs = out_ptr + row * stride_ot + head[:, None] * stride_oh + offs_r[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=r_mask)


def mla_decode(
    query: torch.Tensor,  # [>= T, H, R + P]: absorbed queries (q_nope W_UK | rotated q_pe)
    kv_cache: torch.Tensor,  # [num_blocks, block_size, R + P]
    metadata: AttentionMetadata,
    output: torch.Tensor,  # [>= T, H, R]; the rows of single-row requests are written
    kv_lora_rank: int,
    scale: float,
    num_splits: int | None = None,
    tiles: MLATileConfig | None = None,
) -> None:
    """Latent attention of the batch's single-row requests over their cached context.

    `num_splits`: KV splits (None: `choose_num_splits` when every request is a decode, else 1;
    1: off). Splits need a pure-decode batch (`max_query_len == 1`): they are then 1 otherwise.
    """
    num_tokens, num_reqs = metadata.num_actual_tokens, metadata.num_reqs
    if num_tokens == 0 or num_reqs == 0:
        return
    num_heads = query.shape[1]
    _, block_size, dim = kv_cache.shape
    rank, rope = kv_lora_rank, dim - kv_lora_rank
    if query.shape[2] != dim or output.shape[2] != rank:
        raise ValueError(
            f"query rows must be {dim} wide and output rows {rank}, got "
            f"{query.shape[2]} and {output.shape[2]}"
        )
    if query.stride(-1) != 1:
        query = query.contiguous()
    assert output.stride(-1) == 1 and kv_cache.stride(-1) == 1
    cfg = tiles or mla_decode_config(num_heads, query.dtype)
    head_blocks = triton.cdiv(num_heads, cfg.block_h)
    if metadata.max_query_len > 1:
        num_splits = 1
    elif num_splits is None:
        num_splits = choose_num_splits(
            num_reqs, head_blocks, metadata.max_seq_len, cfg.block_n, num_sms(query.device)
        )
    split = num_splits > 1
    if split:
        f32, dev = torch.float32, query.device
        part_acc = torch.empty(num_tokens, num_heads, num_splits, rank, dtype=f32, device=dev)
        part_m = torch.empty(num_tokens, num_heads, num_splits, dtype=f32, device=dev)
        part_l = torch.empty(num_tokens, num_heads, num_splits, dtype=f32, device=dev)
    else:
        part_acc = part_m = part_l = output  # unused
    order = metadata.decode_order
    _mla_decode_kernel[(head_blocks, num_reqs, num_splits)](
        output,
        query,
        kv_cache,
        metadata.block_table,
        metadata.seq_lens,
        metadata.query_start_loc,
        metadata.seq_lens if order is None else order,  # unused without HAS_ORDER
        part_acc,
        part_m,
        part_l,
        num_heads,
        num_splits,
        scale * _LOG2E,
        query.stride(0),
        query.stride(1),
        output.stride(0),
        output.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        metadata.block_table.stride(0),
        RANK=rank,
        RANK_P=padded_head_dim(rank),
        ROPE=rope,
        ROPE_P=padded_head_dim(rope),
        BLOCK_SIZE=block_size,
        BLOCK_H=cfg.block_h,
        BLOCK_N=cfg.block_n,
        HAS_ORDER=order is not None,
        SPLIT=split,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split:
        _reduce_splits_kernel[(num_tokens, num_heads)](
            output, part_acc, part_m, part_l, output, num_heads, num_splits, output.stride(0),
            output.stride(1), HEAD_DIM=rank, HEAD_DIM_P=padded_head_dim(rank),
            SPLITS_P=triton.next_power_of_2(num_splits), HAS_SINKS=False, num_warps=4,
        )  # fmt: skip
