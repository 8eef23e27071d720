"""The weight-only integer GEMM (W4A16, and W8A16 int): packed weights, group scales and optional
zero points, dequantized in registers (Triton).

One kernel layout serves every checkpoint format (`IntWeights`, built once after loading by
`packed.pack_int_weights` from unsigned values `[K, N]`): `qweight` int32 `[K / pack, N]`,
input feature `r * pack + j` at bits `j * bits` of row r (GPTQ's layout; `pack = 32 / bits`), so
a tile reads whole words along N; `scales` float32 `[groups, N]`; `zeros` uint8 (int16 past 255)
`[groups, N]`, or None for the constant zero `2 ** (bits - 1)` (symmetric). The weight of a tile
is `((q - zero) * scale)` in float32, rounded to the activation dtype: exactly the `[N, K]`
weight the torch path dequantizes at load (`packed.PackedLinearMethod`), so kernel and oracle
differ only in the order of the float32 sums.

Two configs of the one kernel: for a few rows (M <= 16, decode) a GEMV-like launch of 16-row
tiles split along K over `split_k` programs, so that a small N still fills the GPU, their float32
partial sums added (with the bias) by the GEMV's reduction kernel (deterministic, unlike
atomics); for more rows a tiled launch of larger M tiles. Each K tile lies in one scale group
(`BLOCK_K` divides the group size), so each tile loads one row of scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedllm.layers.gemv_kernels import _split_k_reduce_kernel
from pagedllm.layers.quantization.packed import IntWeights

GEMV_MAX_M = 16


@dataclass(frozen=True)
class IntGemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    # Each word read once, as `pack` dots (needs `block_k / pack >= 16`); see the kernel.
    split_dot: bool = False


@triton.jit
def _dequant(q, s, z, HAS_ZERO: tl.constexpr, BITS: tl.constexpr, dtype: tl.constexpr):
    """`((q - zero) * scale)` in float32, rounded to `dtype`, of unsigned `q [rows, BLOCK_N]`."""
    if HAS_ZERO:  # noqa: SIM108 (a constexpr branch)
        q = q - z[None, :]
    else:
        q = q - (1 << (BITS - 1))
    return (q.to(tl.float32) * s[None, :]).to(dtype)


@triton.jit
def _dot(acc, x, w, IEEE: tl.constexpr):
    if IEEE:
        return acc + tl.dot(x, w, input_precision="ieee")
    return acc + tl.dot(x, w)


@triton.jit
def _int_gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, b_ptr, M, N, K, GROUP_SIZE,
                     stride_xm, stride_w, stride_s, stride_z, stride_ym, stride_ys,
                     BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SPLIT_K: tl.constexpr, SPLIT_DOT: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):  # fmt: skip
    # NOTE: SPLIT_DOT reads each word once and multiplies it as PACK dots of BLOCK_K / PACK
    # rows (bit field j of a tile's words: inputs j, j + PACK, ...); else each word is read by
    # the PACK rows it holds (the same address, so one fetch from memory, but PACK loads).
    PACK: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = BLOCK_K // PACK
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(pid_k, tl.cdiv(K, BLOCK_K), SPLIT_K):
        g = (t * BLOCK_K) // GROUP_SIZE
        s = tl.load(s_ptr + g * stride_s + offs_n, mask=n_ok, other=0.0)
        z = s
        if HAS_ZERO:
            z = tl.load(z_ptr + g * stride_z + offs_n, mask=n_ok, other=0).to(tl.int32)
        if SPLIT_DOT:
            r = t * ROWS + tl.arange(0, ROWS)
            r_ok = r * PACK < K
            words = tl.load(
                w_ptr + r.to(tl.int64)[:, None] * stride_w + offs_n[None, :],
                mask=r_ok[:, None] & n_ok[None, :],
                other=0,
            )
            for j in tl.static_range(PACK):
                x = tl.load(x_rows + (r * PACK + j)[None, :], mask=m_ok[:, None] & r_ok[None, :],
                            other=0.0)  # fmt: skip
                q = (words >> (j * BITS)) & ((1 << BITS) - 1)
                acc = _dot(acc, x, _dequant(q, s, z, HAS_ZERO, BITS, x.dtype), IEEE)
        else:
            k = t * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = k < K
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            words = tl.load(
                w_ptr + (k // PACK).to(tl.int64)[:, None] * stride_w + offs_n[None, :],
                mask=k_ok[:, None] & n_ok[None, :],
                other=0,
            )
            q = (words >> ((k % PACK) * BITS)[:, None]) & ((1 << BITS) - 1)
            acc = _dot(acc, x, _dequant(q, s, z, HAS_ZERO, BITS, x.dtype), IEEE)
    y = y_ptr + pid_k * stride_ys + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def default_config(m: int, n: int, k: int, group_size: int) -> IntGemmConfig:
    """A config by rows: 16-row tiles split along K until about 264 programs (two per SM of an
    H200), each word read once where the tile allows (`split_dot`), for `m <= GEMV_MAX_M`; else
    tiles of 64 or 128 rows. NOTE: a guess until swept (`pagedllm bench quant-gemm --sweep`)."""
    block_k = min(128, group_size)
    if m <= GEMV_MAX_M:
        block_n = 64
        tiles_k = triton.cdiv(k, block_k)
        split_k = max(1, min(tiles_k, 264 // max(1, triton.cdiv(n, block_n)), 16))
        split_dot = block_k >= 128  # NOTE: 16 rows of words per dot at 4 bits, 32 at 8
        return IntGemmConfig(16, block_n, block_k, split_k, 4, 4, split_dot)
    if m <= 64:
        return IntGemmConfig(64, 64, min(64, block_k), num_warps=4, num_stages=4)
    return IntGemmConfig(128, 128, min(64, block_k), num_warps=8, num_stages=3)


def supports(w: IntWeights, config: IntGemmConfig | None = None) -> bool:
    """Whether the kernel's tiles fit the groups: a K tile (a power of two >= 16, a multiple of
    the pack) inside one group."""
    block_k = config.block_k if config else min(128, w.group_size)
    split_dot_ok = config is None or not config.split_dot or block_k * w.bits >= 16 * 32
    return (
        w.bits in (4, 8)
        and block_k >= 16
        and block_k & (block_k - 1) == 0
        and w.group_size % block_k == 0
        and split_dot_ok
    )


def int_gemm(
    x: torch.Tensor,
    w: IntWeights,
    bias: torch.Tensor | None = None,
    config: IntGemmConfig | None = None,
) -> torch.Tensor:
    """`x [..., K] @ dequantized(w).T + bias` in `x`'s dtype (see the module doc)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    if rows.shape[1] != w.k:
        raise ValueError(f"int_gemm: x has {rows.shape[1]} features, the weight {w.k}")
    cfg = config or default_config(m, w.n, w.k, w.group_size)
    if not supports(w, cfg):
        raise ValueError(f"int_gemm: {cfg} does not fit group size {w.group_size}")
    split_k = max(1, min(cfg.split_k, triton.cdiv(w.k, cfg.block_k)))
    y = torch.empty(m, w.n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*x.shape[:-1], w.n)
    # NOTE: split-K sums its float32 partials in a second kernel (deterministic, unlike atomics).
    partial = split_k > 1
    out = torch.empty(split_k, m, w.n, dtype=torch.float32, device=x.device) if partial else y
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(w.n, cfg.block_n), split_k)
    zeros = w.zeros if w.zeros is not None else w.scales
    has_bias = bias is not None and not partial
    _int_gemm_kernel[grid](
        rows, w.qweight, w.scales, zeros, out, bias if has_bias else out, m, w.n, w.k,
        w.group_size, rows.stride(0), w.qweight.stride(0), w.scales.stride(0), zeros.stride(0),
        out.stride(-2), out.stride(0) if partial else 0, BITS=w.bits,
        HAS_ZERO=w.zeros is not None, HAS_BIAS=has_bias, SPLIT_K=split_k,
        SPLIT_DOT=cfg.split_dot, IEEE=x.dtype == torch.float32, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if partial:
        block = min(1024, triton.next_power_of_2(w.n))
        _split_k_reduce_kernel[(m, triton.cdiv(w.n, block))](
            y, out, bias if bias is not None else y, w.n, y.stride(0), out.stride(0),
            out.stride(1), SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=block,
        )  # fmt: skip
    return y.view(*x.shape[:-1], w.n)
