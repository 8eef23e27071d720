"""Fused Triton kernels for the decoder layer's elementwise ops (see `pagedllm.layers.fused`).

In eager PyTorch, RMSNorm with its residual add is ~8 kernels, the rotary embedding ~12 and
SiLU-and-mul 2, each reading and writing the whole activation. Here each is one kernel:
- `rms_norm` / `fused_add_rms_norm`: one program per row;
- `silu_and_mul`: one program per (row, column block);
- `rotary_embedding_`: one program per token, rotating all its q and k heads in place.

Numerics follow HF transformers' op by op, including the rounding to the activation dtype
between ops (the residual sum, the normalized value before the weight, SiLU before the product,
each rotary product), so bf16 results track HF's as closely as the eager ops do. Measured
(tests/layers/test_fused.py): the residual sum is bit-equal; the rest within one rounding step
(the order of the fp32 sum of squares; compiled, the rotary kernel's intermediate casts are not
all kept, about a fifth of its outputs differ by one step).

Imported only when used (CUDA), so CPU start-up does not import Triton; tests run the kernels on
the CPU under Triton's interpreter (`TRITON_INTERPRET=1` set before this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
    normed = (x32 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


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
def _rotate(ptr, stride_t, tok, num_heads, cos, sin, HEAD_DIM: tl.constexpr,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
    heads = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, HALF)
    mask = (heads < num_heads)[:, None]
    base = ptr + tok * stride_t + heads[:, None] * HEAD_DIM + offs[None, :]
    x1 = tl.load(base, mask=mask, other=0.0)
    x2 = tl.load(base + HALF, mask=mask, other=0.0)
    dt = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    # Each product rounds to the activation dtype, then the sum does (HF's order).
    o1 = (a1 * cos).to(dt).to(tl.float32) - (a2 * sin).to(dt).to(tl.float32)
    o2 = (a2 * cos).to(dt).to(tl.float32) + (a1 * sin).to(dt).to(tl.float32)
    tl.store(base, o1.to(dt), mask=mask)
    tl.store(base + HALF, o2.to(dt), mask=mask)


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
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    offs = tl.arange(0, HALF)
    # The fp32 cos/sin cache rounds to the activation dtype first, as in HF.
    dt = q_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + pos * HALF + offs).to(dt).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * HALF + offs).to(dt).to(tl.float32)[None, :]
    _rotate(q_ptr, stride_qt, tok, num_q_heads, cos, sin, HEAD_DIM, HALF, BLOCK_HQ)
    _rotate(k_ptr, stride_kt, tok, num_k_heads, cos, sin, HEAD_DIM, HALF, BLOCK_HK)


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
    num_q_heads = query.shape[-1] // head_dim
    num_k_heads = key.shape[-1] // head_dim
    _rotary_kernel[(num_tokens,)](
        query, key, positions, cos_cache, sin_cache,
        query.stride(0), key.stride(0), num_q_heads, num_k_heads,
        HEAD_DIM=head_dim, HALF=head_dim // 2,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(num_k_heads),
    )  # fmt: skip
