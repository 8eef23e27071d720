"""`reshape_and_cache`: a step's K/V rows into the paged cache at `slot_mapping` (Triton), and
the masked-head helpers `_in_head` and `_quantize_fp8` the attention kernels share.

An FP8 cache stores `e4m3(clamp(x / scale, ±448))` (`fp8_kv.quantize_kv`, its oracle), the
division correctly rounded (`div_rn`) so that both round the same fp32 value."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.fp8_kv import FP8_E4M3_MAX, kernel_scales
from pagedllm.attention.triton.tiles import padded_head_dim

_FP8_MAX = tl.constexpr(FP8_E4M3_MAX)


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def _in_head(mask, offs_d, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr):
    """`mask` restricted to the head's lanes `offs_d < HEAD_DIM` of a `HEAD_DIM_P` tile.

    NOTE: a head of a power of two (>= 16) is its own tile: `mask` is returned as it is, so that
    case compiles to the code it had before tiles were padded."""
    if HEAD_DIM_P != HEAD_DIM:
        mask = mask & (offs_d < HEAD_DIM)
    return mask


@triton.jit
def _quantize_fp8(x, scale_ptr, FP8: tl.constexpr):
    """`x` divided by the scale at `scale_ptr` and saturated to E4M3's range (`FP8`), else as
    it is; the caller's store casts."""
    if FP8:
        x = tl.div_rn(x.to(tl.float32), tl.load(scale_ptr).to(tl.float32))
        x = tl.minimum(tl.maximum(x, -_FP8_MAX), _FP8_MAX)
    return x


@triton.jit(do_not_specialize=["num_rows"])
def _reshape_and_cache_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    k_scale_ptr,  # fp32 [] (FP8 only)
    v_scale_ptr,
    num_rows,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    FP8: tl.constexpr,
):
    """One program per `BLOCK_R` (token, KV head) rows: K and V rows into slot `slot_mapping[t]`
    (quantized with the layer's scales when `FP8`)."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    token = row // NUM_KV_HEADS
    head = row % NUM_KV_HEADS
    slot = tl.load(slot_mapping_ptr + token, mask=row < num_rows, other=-1).to(tl.int64)
    # NOTE: a negative slot marks a padding token (vLLM's convention; the contract has none).
    mask = ((row < num_rows) & (slot >= 0))[:, None]
    offs_d = tl.arange(0, HEAD_DIM_P)[None, :]
    mask = _in_head(mask, offs_d, HEAD_DIM, HEAD_DIM_P)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + head * stride_ch
    dst = dst[:, None] + offs_d
    k = tl.load(key_ptr + (token * stride_kt + head * stride_kh)[:, None] + offs_d, mask=mask)
    k = _quantize_fp8(k, k_scale_ptr, FP8)
    tl.store(key_cache_ptr + dst, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(value_ptr + (token * stride_vt + head * stride_vh)[:, None] + offs_d, mask=mask)
    v = _quantize_fp8(v, v_scale_ptr, FP8)
    tl.store(value_cache_ptr + dst, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor,  # [>= num_tokens, Hkv, D]
    value: torch.Tensor,  # [>= num_tokens, Hkv, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # int64 [num_tokens]
    num_tokens: int,
    k_scale: torch.Tensor | None = None,  # fp32 [] (an FP8 cache; None: 1.0)
    v_scale: torch.Tensor | None = None,
) -> None:
    """Stores the first `num_tokens` rows of `key`/`value` at their slots (cast to the cache's
    dtype; an FP8 cache's quantized with `k_scale` / `v_scale`)."""
    if num_tokens == 0:
        return
    fp8, k_scale, v_scale = kernel_scales(kv_cache, k_scale, v_scale, slot_mapping)
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    key, value = last_dim_contiguous(key), last_dim_contiguous(value)
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    assert key_cache.stride(-1) == 1, "the KV cache's head_dim must be contiguous"
    num_rows = num_tokens * num_kv_heads
    head_dim_p = padded_head_dim(head_dim)
    block_r = max(1, 2048 // head_dim_p)
    _reshape_and_cache_kernel[(triton.cdiv(num_rows, block_r),)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        k_scale,
        v_scale,
        num_rows,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_P=head_dim_p,
        BLOCK_R=block_r,
        BLOCK_SIZE=block_size,
        FP8=fp8,
        num_warps=4,
    )
