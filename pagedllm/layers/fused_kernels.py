"""Fused Triton kernels for the decoder layer's elementwise ops (see `pagedllm.layers.fused`).

In eager PyTorch, RMSNorm with its residual add is ~8 kernels, the rotary embedding ~12 and
SiLU-and-mul 2, each reading and writing the whole activation. Here each is one kernel:
- `rms_norm` / `fused_add_rms_norm`: one program per row;
- `silu_and_mul`: one program per (row, column block);
- `rotary_embedding_`: one program per token, rotating all its q and k heads in place;
- `rope_norm_and_cache_`: a layer's whole attention prologue (Qwen3's per-head q/k RMSNorm, the
  rotary on q and k, the K/V store into the paged cache) in one launch, where it was up to four
  (two norms, the rotary, the attention backend's cache write); programs per (token, head group).

Numerics follow HF transformers' op by op, including the rounding to the activation dtype
between ops (the residual sum, the normalized value before the weight, SiLU before the product,
each rotary product), so bf16 results track HF's as closely as the eager ops do. Measured
(tests/layers/test_fused.py): the residual sum is bit-equal; the rest within one rounding step
(the order of the fp32 sum of squares; compiled, the rotary kernel's intermediate casts are not
all kept, about a fifth of its outputs differ by one step). The prologue shares the norm's and the
rotary's jit helpers, so it rounds at the same points (tests/layers/test_prologue.py).

Sizes need not be powers of two: a row's tile is the next power of two (`tl.arange` lengths
are), its lanes past the size masked. The norm's and SiLU's columns always are; the rotary's
tiles are half heads, masked only when the half is not a power of two (`HALF_P != HALF`), so a
power-of-two head compiles to exactly the unmasked code (sm_90 PTX compared at 16 to 256).

Imported only when used (CUDA), so CPU start-up does not import Triton; tests run the kernels on
the CPU under Triton's interpreter (`TRITON_INTERPRET=1` set before this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.attention.fp8_kv import kernel_scales
from pagedllm.attention.triton.cache import _quantize_fp8


@triton.jit
def _rms_norm_kernel(
    out_ptr,
    x_ptr,
    residual_ptr,
    residual_out_ptr,
    weight_ptr,
    n_cols,
    stride_x,
    stride_r,
    stride_ro,
    stride_o,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = _rms_scale(x, rstd, w)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_scale(x, rstd, w):
    """RMSNorm after its statistics, in HF's order: `x * rstd` rounds to x's dtype, then the
    product with the fp32 weight `w` (returned in fp32; the caller rounds it)."""
    normed = (x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32)
    return normed * w


@triton.jit
def _silu_and_mul_kernel(out_ptr, x_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32)
    out = (act * up.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


@triton.jit
def _in_half(mask, offs, HALF: tl.constexpr, HALF_P: tl.constexpr):
    """`mask` restricted to the lanes `offs < HALF` of a half head padded to `HALF_P` lanes.

    NOTE: the rotary's tiles are half heads, `tl.arange(0, HALF_P)` with `HALF_P` the next power
    of two; a power-of-two half is its own tile and `mask` is returned as it is (no extra
    instructions)."""
    if HALF_P != HALF:
        mask = mask & (offs < HALF)
    return mask


@triton.jit
def _rotate(ptr, stride_t, tok, num_heads, cos, sin, HEAD_DIM: tl.constexpr,
            HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    heads = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, HALF_P)
    mask = _in_half((heads < num_heads)[:, None], offs[None, :], HALF, HALF_P)
    base = ptr + tok * stride_t + heads[:, None] * HEAD_DIM + offs[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    o1, o2 = _rope(x1, x2, cos, sin)
    tl.store(base, o1, mask=mask)
    tl.store(base + HALF, o2, mask=mask)


@triton.jit
def _rope(x1, x2, cos, sin):
    """The neox rotation of the halves `x1`, `x2` (activation dtype; cos/sin fp32 holding values
    of that dtype). Each product rounds to the activation dtype, then the sum does (HF's order)."""
    dt = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    o1 = (a1 * cos).to(dt).to(tl.float32) - (a2 * sin).to(dt).to(tl.float32)
    o2 = (a2 * cos).to(dt).to(tl.float32) + (a1 * sin).to(dt).to(tl.float32)
    return o1.to(dt), o2.to(dt)


@triton.jit
def _cos_sin(cos_ptr, sin_ptr, pos, dt_ptr, HALF: tl.constexpr, HALF_P: tl.constexpr):
    """cos and sin of position `pos` as `[1, HALF_P]` rows (0 past `HALF`): the fp32 cache rounds
    to the activation dtype (`dt_ptr`'s) first, as in HF."""
    offs = tl.arange(0, HALF_P)
    dt = dt_ptr.dtype.element_ty
    if HALF_P != HALF:
        mask = offs < HALF
        cos = tl.load(cos_ptr + pos * HALF + offs, mask=mask, other=0.0).to(dt).to(tl.float32)
        sin = tl.load(sin_ptr + pos * HALF + offs, mask=mask, other=0.0).to(dt).to(tl.float32)
    else:
        cos = tl.load(cos_ptr + pos * HALF + offs).to(dt).to(tl.float32)
        sin = tl.load(sin_ptr + pos * HALF + offs).to(dt).to(tl.float32)
    return cos[None, :], sin[None, :]


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_kt,
    num_q_heads,
    num_k_heads,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    cos, sin = _cos_sin(cos_ptr, sin_ptr, pos, q_ptr, HALF, HALF_P)
    _rotate(q_ptr, stride_qt, tok, num_q_heads, cos, sin, HEAD_DIM, HALF, HALF_P, BLOCK_HQ)
    _rotate(k_ptr, stride_kt, tok, num_k_heads, cos, sin, HEAD_DIM, HALF, HALF_P, BLOCK_HK)


@triton.jit
def _norm_rope(base, mask, cos, sin, w_ptr, eps, HALF: tl.constexpr, HALF_P: tl.constexpr,
               HAS_NORM: tl.constexpr):  # fmt: skip
    """Heads at `base` ([heads, HALF_P] pointers to first halves; `mask` off past `HALF`):
    optional per-head RMSNorm (weight `w_ptr`), then the rotation. Returns the two halves in the
    activation dtype."""
    # NOTE: masked lanes load 0, so padded lanes add nothing to the sum of squares.
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    if HAS_NORM:
        a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
        sum_sq = tl.sum(a1 * a1, axis=1) + tl.sum(a2 * a2, axis=1)
        rstd = tl.rsqrt(sum_sq / (2 * HALF) + eps)[:, None]
        offs = tl.arange(0, HALF_P)
        if HALF_P != HALF:
            w1 = tl.load(w_ptr + offs, mask=offs < HALF, other=0.0)
            w2 = tl.load(w_ptr + HALF + offs, mask=offs < HALF, other=0.0)
        else:
            w1 = tl.load(w_ptr + offs)
            w2 = tl.load(w_ptr + HALF + offs)
        w1 = w1.to(tl.float32)[None, :]
        w2 = w2.to(tl.float32)[None, :]
        x1 = _rms_scale(x1, rstd, w1).to(x1.dtype)
        x2 = _rms_scale(x2, rstd, w2).to(x2.dtype)
    return _rope(x1, x2, cos, sin)


@triton.jit
def _prologue_q(q_ptr, part, num_q_heads, cos, sin, w_ptr, eps, HEAD_DIM: tl.constexpr,
                HALF: tl.constexpr, HALF_P: tl.constexpr, BLOCK_HQ: tl.constexpr,
                HAS_NORM: tl.constexpr):  # fmt: skip
    """q heads `part * BLOCK_HQ` on of one token (its row at `q_ptr`): normed, rotated in place."""
    heads = part * BLOCK_HQ + tl.arange(0, BLOCK_HQ)
    offs = tl.arange(0, HALF_P)
    mask = _in_half((heads < num_q_heads)[:, None], offs[None, :], HALF, HALF_P)
    base = q_ptr + heads[:, None] * HEAD_DIM + offs[None, :]
    o1, o2 = _norm_rope(base, mask, cos, sin, w_ptr, eps, HALF, HALF_P, HAS_NORM)
    tl.store(base, o1, mask=mask)
    tl.store(base + HALF, o2, mask=mask)


@triton.jit
def _prologue_kv(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, dst, num_kv_heads, cos, sin, w_ptr, eps,
                 stride_ch, k_scale_ptr, v_scale_ptr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                 HALF_P: tl.constexpr, BLOCK_HK: tl.constexpr, HAS_NORM: tl.constexpr,
                 FP8: tl.constexpr):  # fmt: skip
    """One token's K heads (normed, rotated) and V heads into the cache slot at offset `dst`
    (an FP8 cache's quantized with the layer's scales: `_quantize_fp8`)."""
    heads = tl.arange(0, BLOCK_HK)
    lanes = tl.arange(0, HALF_P)
    mask = _in_half((heads < num_kv_heads)[:, None], lanes[None, :], HALF, HALF_P)
    offs = heads[:, None] * HEAD_DIM + lanes[None, :]
    o1, o2 = _norm_rope(k_ptr + offs, mask, cos, sin, w_ptr, eps, HALF, HALF_P, HAS_NORM)
    cache_offs = dst + heads[:, None] * stride_ch + lanes[None, :]
    o1, o2 = _quantize_fp8(o1, k_scale_ptr, FP8), _quantize_fp8(o2, k_scale_ptr, FP8)
    tl.store(k_cache_ptr + cache_offs, o1.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(k_cache_ptr + cache_offs + HALF, o2.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v1 = tl.load(v_ptr + offs, mask=mask)
    v2 = tl.load(v_ptr + offs + HALF, mask=mask)
    v1, v2 = _quantize_fp8(v1, v_scale_ptr, FP8), _quantize_fp8(v2, v_scale_ptr, FP8)
    tl.store(v_cache_ptr + cache_offs, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_offs + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_tokens"])
def _prologue_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    q_norm_ptr,
    k_norm_ptr,
    k_scale_ptr,  # fp32 [] (FP8 only)
    v_scale_ptr,
    num_tokens,
    num_q_heads,
    num_kv_heads,
    stride_qt,
    stride_kt,
    stride_vt,
    stride_cb,
    stride_cs,
    stride_ch,
    eps,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    HAS_NORM: tl.constexpr,
    FP8: tl.constexpr,
):
    """Program (token, part): part 0 normalizes and rotates the token's K heads and stores them
    with its V heads in the cache slot; part p > 0 does q heads `(p - 1) * BLOCK_HQ` on, in place.

    NOTE: the branches only call helpers: Triton requires a name assigned in both branches of an
    `if` to have one type in both, and the q and K/V tiles differ in shape.
    """
    tok = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    cos, sin = _cos_sin(cos_ptr, sin_ptr, pos, q_ptr, HALF, HALF_P)
    # NOTE: rows past num_tokens (batch padding) and slot -1 (CUDA-graph padding) are not
    # cached; rows past num_tokens have no slot_mapping entry to read.
    slot = tl.load(slot_mapping_ptr + tok, mask=(part == 0) & (tok < num_tokens), other=-1)
    slot = slot.to(tl.int64)
    if part > 0:
        _prologue_q(q_ptr + tok * stride_qt, part - 1, num_q_heads, cos, sin, q_norm_ptr,
                    eps, HEAD_DIM, HALF, HALF_P, BLOCK_HQ, HAS_NORM)  # fmt: skip
    elif slot >= 0:
        dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs
        _prologue_kv(k_ptr + tok * stride_kt, v_ptr + tok * stride_vt, k_cache_ptr, v_cache_ptr,
                     dst, num_kv_heads, cos, sin, k_norm_ptr, eps, stride_ch, k_scale_ptr,
                     v_scale_ptr, HEAD_DIM, HALF, HALF_P, BLOCK_HK, HAS_NORM, FP8)  # fmt: skip


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as [rows, last dim], a view when possible (last dim contiguous)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            out, rows, rows, rows, weight, rows.shape[1],
            rows.stride(0), 0, 0, out.stride(0), eps,
            HAS_RESIDUAL=False, BLOCK=triton.next_power_of_2(rows.shape[1]),
        )  # fmt: skip
    return out.view(x.shape)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(norm(x + residual), x + residual)` in one pass."""
    rows, res = _rows(x), _rows(residual)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(out)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            out, rows, res, new_residual, weight, rows.shape[1],
            rows.stride(0), res.stride(0), new_residual.stride(0), out.stride(0), eps,
            HAS_RESIDUAL=True, BLOCK=triton.next_power_of_2(rows.shape[1]),
        )  # fmt: skip
    return out.view(x.shape), new_residual.view(x.shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(x[..., :d]) * x[..., d:]`."""
    rows = _rows(x)
    d = rows.shape[1] // 2
    out = torch.empty(rows.shape[0], d, dtype=x.dtype, device=x.device)
    block = 1024
    if rows.shape[0]:
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(d, block))](
            out, rows, d, rows.stride(0), out.stride(0), BLOCK=block
        )
    return out.view(*x.shape[:-1], d)


def rotary_embedding_(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    head_dim: int,
) -> None:
    """Rotates `query` [T, Hq * head_dim] and `key` [T, Hk * head_dim] in place (rows may be
    strided: views of the fused qkv projection), neox style over the whole head."""
    num_tokens = query.shape[0]
    if num_tokens == 0:
        return
    assert query.stride(-1) == 1 and key.stride(-1) == 1
    assert head_dim % 2 == 0, "the neox rotation splits heads in halves"
    num_q_heads = query.shape[-1] // head_dim
    num_k_heads = key.shape[-1] // head_dim
    _rotary_kernel[(num_tokens,)](
        query, key, positions, cos_cache, sin_cache,
        query.stride(0), key.stride(0), num_q_heads, num_k_heads,
        HEAD_DIM=head_dim, HALF=head_dim // 2, HALF_P=triton.next_power_of_2(head_dim // 2),
        BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(num_k_heads),
    )  # fmt: skip


def rope_norm_and_cache_(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_tokens: int,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """The attention prologue of a layer in one launch: per token, (optionally) RMSNorm each q
    and k head with its weight, rotate q and k (neox style, whole heads), rotate `query` in place
    and store the rotated K and V in `kv_cache` ([2, num_blocks, block_size, Hkv, D]) at
    `slot_mapping[t]` for the first `num_tokens` rows (slot -1: skipped). `key` is left as it was.

    `query` [T, Hq * D], `key`/`value` [T, Hkv * D] (rows may be strided: views of the fused qkv
    projection); the norm weights go together (Qwen3) or not at all. An FP8 cache stores
    K / k_scale and V / v_scale (fp32 scalars; None: 1.0), saturated, as `reshape_and_cache`."""
    total = query.shape[0]
    if total == 0:
        return
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight must be given together")
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.stride(-1) != 1 or x.shape[-1] % head_dim:
            raise ValueError(f"{name} must be [T, heads * {head_dim}] with contiguous rows")
    assert key.shape[-1] == value.shape[-1] == num_kv_heads * head_dim
    assert head_dim % 2 == 0, "the neox rotation splits heads in halves"
    assert num_tokens <= min(total, slot_mapping.shape[0])
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    assert key_cache.stride(-1) == 1, "the KV cache's head_dim must be contiguous"
    num_q_heads = query.shape[-1] // head_dim
    block_hk = triton.next_power_of_2(num_kv_heads)
    # A q program does about the work of the K/V one (2 * Hkv heads), so at batch 1 the token's
    # work spreads over 1 + Hq / (2 * Hkv) programs instead of one.
    block_hq = min(triton.next_power_of_2(num_q_heads), max(2 * block_hk, 8))
    has_norm = q_norm_weight is not None
    fp8, k_scale, v_scale = kernel_scales(kv_cache, k_scale, v_scale, slot_mapping)
    _prologue_kernel[(total, 1 + triton.cdiv(num_q_heads, block_hq))](
        query, key, value, positions, cos_cache, sin_cache, key_cache, value_cache, slot_mapping,
        q_norm_weight if has_norm else query, k_norm_weight if has_norm else query,
        k_scale, v_scale, num_tokens, num_q_heads, num_kv_heads,
        query.stride(0), key.stride(0), value.stride(0),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), eps,
        HEAD_DIM=head_dim, HALF=head_dim // 2, HALF_P=triton.next_power_of_2(head_dim // 2),
        BLOCK_SIZE=block_size,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, HAS_NORM=has_norm, FP8=fp8,
    )  # fmt: skip
