"""GEMVs of quantized weights for a few rows (decode steps): the structure of `gemv_kernels` (each
program owns a block of outputs and streams its weight bytes once, `evict_first`; one fp32
accumulator of products per row, reduced once after the loop; optionally split along K, the fp32
partials summed with the bias by the GEMV's `_split_k_reduce_kernel`), with the weight
dequantized in registers and the scales applied in the epilogue.

- `fp8_gemv`: W8A8 FP8. `q [M, K]` e4m3 is the activation quantized per token (or with the static
  scale) by `fp8_quant.quant_per_token`, exactly as for `torch._scaled_mm`; the e4m3 weight
  `[N, K]` has one float32 scale per tensor or per output channel. `y = (sum_k q * w) * sa[m] *
  sb[n] + bias`: the math of `fp8_gemm.scaled_mm` (and of the torch path, up to the order of the
  float32 sums: the e4m3 products are exact in float32). Up to 4 rows the elementwise form (as
  the bf16 GEMV; launch shapes from its tuned table, `BLOCK_K` doubled: 16 bytes per thread of
  1-byte weights); 5-8 rows a `tl.dot` of the e4m3 tiles.
- `int_gemv`: W4A16 / W8A16 integers in the W4A16 kernel's layout (`packed.IntWeights`: int32
  words `[K / pack, N]` packed along K, float32 group scales `[groups, N]`, optional zeros).
  A program owns `BLOCK_N` columns and streams `[BLOCK_R, BLOCK_N]` word tiles (coalesced along N).
  Each field becomes a float without a conversion instruction: `(q | 0x4B000000)` read as a float32
  is `2^23 + q` exactly, minus `2^23 + zero` gives `q - zero`; the products with the input are
  summed per word row and multiplied by the word row's group scale once per tile. The result is
  the exact `(q - zero) * scale` weight times the input, summed in float32: the torch path rounds
  the dequantized weight to the model dtype first (within `BF16_TOL` of the largest output).
  Up to 4 rows (elementwise); more rows take `w4a16.int_gemm` (tensor cores).

The dispatch (`fp8_wanted`, `int_wanted`): the methods' `apply` take these for `m <= FP8_MAX_M` /
`INT_MAX_M` rows on CUDA (or under Triton's interpreter), with the GEMV switch on (the method's
`use_gemv`, else `PAGEDLLM_GEMV`); `PAGEDLLM_QUANT_KERNELS=0` already keeps the torch path.
Nothing is autotuned; the launch reads no device values and allocates only its outputs (CUDA
graphs capture it).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pagedllm.layers import fused
from pagedllm.layers.gemv_kernels import (
    MAX_ELEMENTWISE_M,
    _config,
    _on_device,
    _split_k_reduce_kernel,
    _store_rows,
)
from pagedllm.layers.quantization.packed import IntWeights

# The most rows that take the GEMVs (parameters of the dispatch; 4: the elementwise form's rows).
# NOTE: 4, not 8: the tl.dot form (5-8 rows) missed the reference by up to 10 % on an H200
# (M 7, K 14336, N 4096, 2026-12-04) while it passes under the interpreter: those rows take
# `scaled_mm` until it is fixed.
FP8_MAX_M = 4
INT_MAX_M = MAX_ELEMENTWISE_M
# The bits of 2^23 in float32, OR-ed into a word's fields (a kernel argument, not a literal: the
# mask is the one immediate of the LOP3 that does `(word & mask) | magic`; two literals made
# ptxas materialize one with a MOV per field).
MAGIC = 0x4B000000


class QuantGemvConfig(NamedTuple):
    block_n: int
    block_k: int  # FP8: inputs per tile; int: word rows per tile (BLOCK_R)
    num_warps: int = 4
    split_k: int = 1
    dot: bool = False  # FP8 only


# ("fp8" | "int4" | "int8", N, K, M padded to a power of two) -> config, from `pagedllm bench
# quant-gemm --sweep-gemv` on the GPU; empty until swept (the defaults below are guesses).
C = QuantGemvConfig
_TABLE: dict[tuple[str, int, int, int], QuantGemvConfig] = {}


def _table(kind: str, m: int, n: int, k: int) -> QuantGemvConfig | None:
    return _TABLE.get((kind, n, k, triton.next_power_of_2(m)))


def _switch(use_gemv: bool | None) -> bool:
    return fused.gemv_enabled() if use_gemv is None else use_gemv


def _rows(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1]) if x.dim() > 0 else 0


def fp8_wanted(q_input: torch.Tensor, weight: torch.Tensor, use_gemv: bool | None) -> bool:
    """Whether `fp8_gemv` should compute this FP8 layer's product for input `q_input [..., K]`."""
    m = _rows(q_input)
    return 1 <= m <= FP8_MAX_M and _switch(use_gemv) and _on_device(weight) and weight.dim() == 2


def int_wanted(x: torch.Tensor, w: IntWeights, use_gemv: bool | None) -> bool:
    """Whether `int_gemv` should compute this packed layer's product."""
    m = _rows(x)
    if not (1 <= m <= INT_MAX_M and w.bits in (4, 8) and w.group_size % (32 // w.bits) == 0):
        return False
    return _switch(use_gemv) and _on_device(w.qweight)


def _split(k_units: int, block: int, split_k: int) -> tuple[int, int]:
    """(units per split, splits): whole tiles per split, empty trailing splits dropped (as the
    GEMV's launch: an empty split of an unmasked launch would read past the end)."""
    split_k = max(1, min(split_k, triton.cdiv(k_units, block)))
    per = triton.cdiv(triton.cdiv(k_units, split_k), block) * block
    return per, triton.cdiv(k_units, per)


def _reduce(y: torch.Tensor, part: torch.Tensor, bias: torch.Tensor | None, split: int) -> None:
    n = y.shape[1]
    block = min(1024, triton.next_power_of_2(n))
    _split_k_reduce_kernel[(y.shape[0], triton.cdiv(n, block))](
        y, part, bias if bias is not None else y, n, y.stride(0), part.stride(0), part.stride(1),
        SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block,
    )  # fmt: skip


# --- FP8 ------------------------------------------------------------------------------------


@triton.jit
def _fp8_acc(acc, ptrs, k_ok, w, EVEN_K: tl.constexpr):
    if EVEN_K:  # noqa: SIM108 (a constexpr branch)
        a = tl.load(ptrs)
    else:
        a = tl.load(ptrs, mask=k_ok, other=0.0)
    return acc + a.to(tl.float32)[None, :] * w


@triton.jit
def _act_scale(sa_ptr, m, M, PER_TOKEN: tl.constexpr):
    if PER_TOKEN:
        return tl.load(sa_ptr + tl.minimum(m, M - 1))
    return tl.load(sa_ptr)


@triton.jit
def _fp8_gemv_kernel(y_ptr, x_ptr, w_ptr, sa_ptr, sb_ptr, b_ptr, N, K, K_PER_SPLIT, stride_xm,
                     stride_ym, stride_ys, M, M_PAD: tl.constexpr, PER_TOKEN: tl.constexpr,
                     PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                     EVEN_K: tl.constexpr, DOT: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    w_rows = tl.minimum(rows, N - 1).to(tl.int64)  # NOTE: as the GEMV: rows past N never stored
    w_ptrs = w_ptr + w_rows[:, None] * K + ks[None, :]
    k_start = pid_k * K_PER_SPLIT
    if PER_CHANNEL:  # noqa: SIM108 (a constexpr branch)
        sb = tl.load(sb_ptr + w_rows)
    else:
        sb = tl.load(sb_ptr)
    if DOT:
        ms = tl.arange(0, M_PAD)
        x_ptrs = x_ptr + tl.minimum(ms, M - 1).to(tl.int64)[:, None] * stride_xm + ks[None, :]
        acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    else:
        x0 = x_ptr + ks
        x1 = x_ptr + tl.minimum(1, M - 1).to(tl.int64) * stride_xm + ks
        x2 = x_ptr + tl.minimum(2, M - 1).to(tl.int64) * stride_xm + ks
        x3 = x_ptr + tl.minimum(3, M - 1).to(tl.int64) * stride_xm + ks
        acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if M_PAD > 1:
            acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if M_PAD > 2:
            acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            acc3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = k_start + kk
        k_ok = (ks + k0) < K
        if EVEN_K:
            w = tl.load(w_ptrs + k0, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs + k0, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
        if DOT:
            if EVEN_K:
                x = tl.load(x_ptrs + k0)
            else:
                x = tl.load(x_ptrs + k0, mask=k_ok[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w))
        else:
            w = w.to(tl.float32)
            acc0 = _fp8_acc(acc0, x0 + k0, k_ok, w, EVEN_K)
            if M_PAD > 1:
                acc1 = _fp8_acc(acc1, x1 + k0, k_ok, w, EVEN_K)
            if M_PAD > 2:
                acc2 = _fp8_acc(acc2, x2 + k0, k_ok, w, EVEN_K)
                acc3 = _fp8_acc(acc3, x3 + k0, k_ok, w, EVEN_K)
    if DOT:
        ms = tl.arange(0, M_PAD)
        if PER_TOKEN:  # noqa: SIM108 (a constexpr branch)
            sa = tl.load(sa_ptr + tl.minimum(ms, M - 1))[:, None]
        else:
            sa = tl.load(sa_ptr)
        if PER_CHANNEL:  # noqa: SIM108 (a constexpr branch)
            out = acc * sa * sb[None, :]
        else:
            out = acc * sa * sb
        _store_rows(out, y_ptr, b_ptr, ms[:, None], rows[None, :], w_rows[None, :], N, M,
                    pid_k, stride_ym, stride_ys, HAS_BIAS, PARTIAL)  # fmt: skip
    else:
        out0 = tl.sum(acc0, axis=1) * _act_scale(sa_ptr, 0, M, PER_TOKEN) * sb
        _store_rows(out0, y_ptr, b_ptr, 0, rows, w_rows, N, M, pid_k, stride_ym, stride_ys,
                    HAS_BIAS, PARTIAL)  # fmt: skip
        if M_PAD > 1:
            out1 = tl.sum(acc1, axis=1) * _act_scale(sa_ptr, 1, M, PER_TOKEN) * sb
            _store_rows(out1, y_ptr, b_ptr, 1, rows, w_rows, N, M, pid_k, stride_ym, stride_ys,
                        HAS_BIAS, PARTIAL)  # fmt: skip
        if M_PAD > 2:
            out2 = tl.sum(acc2, axis=1) * _act_scale(sa_ptr, 2, M, PER_TOKEN) * sb
            _store_rows(out2, y_ptr, b_ptr, 2, rows, w_rows, N, M, pid_k, stride_ym, stride_ys,
                        HAS_BIAS, PARTIAL)  # fmt: skip
            out3 = tl.sum(acc3, axis=1) * _act_scale(sa_ptr, 3, M, PER_TOKEN) * sb
            _store_rows(out3, y_ptr, b_ptr, 3, rows, w_rows, N, M, pid_k, stride_ym, stride_ys,
                        HAS_BIAS, PARTIAL)  # fmt: skip


@functools.cache
def fp8_default_config(m: int, n: int, k: int) -> QuantGemvConfig:
    """The bf16 GEMV's launch for the shape (its tuned table, else its default), its tile widened
    to 16 bytes per thread of the 1-byte weights where it had fewer, and 2 weight rows per program
    where it had 1 (each e4m3 input is converted once per tile, for all its rows) while the
    accumulators stay within 64 registers a thread. 5-8 rows: a `tl.dot`. NOTE: a guess until
    swept (`pagedllm bench quant-gemm --m 1,4,8 --sweep-gemv`)."""
    if m > MAX_ELEMENTWISE_M:
        return QuantGemvConfig(block_n=32, block_k=256, num_warps=4, dot=True)
    c = _config(m, n, k, torch.bfloat16)
    threads = 32 * c.num_warps
    block_k = min(max(c.block_k, 16 * threads), max(16, triton.next_power_of_2(k)))
    fits = max(1, 64 * threads // (block_k * triton.next_power_of_2(m)))  # rows of weights
    block_n = min(max(c.block_n, 2), fits)
    return QuantGemvConfig(block_n, block_k, c.num_warps, c.split_k)


def fp8_gemv(
    q: torch.Tensor,
    scale_a: torch.Tensor,
    weight: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    config: QuantGemvConfig | None = None,
) -> torch.Tensor:
    """`fp8_gemm.scaled_mm`'s product for at most `FP8_MAX_M` rows: e4m3 `q [M, K]` with
    `scale_a` (one element, or `[M, 1]`), e4m3 `weight [N, K]` with `scale_b` (one element, or
    `N`) -> `[M, N]` in `out_dtype`."""
    m, k = q.shape
    n = weight.shape[0]
    if weight.shape[1] != k or not weight.is_contiguous() or q.stride(-1) != 1:
        raise ValueError(f"fp8_gemv: q {tuple(q.shape)} and weight {tuple(weight.shape)}")
    if scale_a.numel() not in (1, m) or scale_b.numel() not in (1, n):
        raise ValueError(f"fp8_gemv: scales of {scale_a.numel()} and {scale_b.numel()} elements")
    cfg = config or _table("fp8", m, n, k) or fp8_default_config(m, n, k)
    if not cfg.dot and m > MAX_ELEMENTWISE_M:
        raise ValueError(f"{m} rows need a tl.dot config (elementwise: at most 4), got {cfg}")
    y = torch.empty(m, n, dtype=out_dtype, device=q.device)
    if m == 0:
        return y
    m_pad = max(16, triton.next_power_of_2(m)) if cfg.dot else triton.next_power_of_2(m)
    per, split = _split(k, cfg.block_k, cfg.split_k)
    partial = split > 1
    out = torch.empty(split, m, n, dtype=torch.float32, device=q.device) if partial else y
    has_bias = bias is not None and not partial
    _fp8_gemv_kernel[(triton.cdiv(n, cfg.block_n), split)](
        out, q, weight, scale_a.reshape(-1), scale_b.reshape(-1), bias if has_bias else out,
        n, k, per, q.stride(0), out.stride(-2), out.stride(0) if partial else 0, m, M_PAD=m_pad,
        PER_TOKEN=scale_a.numel() > 1,
        PER_CHANNEL=scale_b.numel() > 1, HAS_BIAS=has_bias, PARTIAL=partial,
        EVEN_K=k % per == 0, DOT=cfg.dot, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
    )  # fmt: skip
    if partial:
        _reduce(y, out, bias, split)
    return y


# --- int4 / int8 ----------------------------------------------------------------------------


@triton.jit
def _int_acc(t, ptrs, r_ok, d, unit, EVEN: tl.constexpr):
    if EVEN:  # noqa: SIM108 (a constexpr branch)
        a = tl.load(ptrs)
    else:
        a = tl.load(ptrs, mask=r_ok, other=0.0)
    return t + (a.to(tl.float32) * unit)[:, None] * d


@triton.jit
def _int_gemv_kernel(y_ptr, x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, N, KW, R_PER_SPLIT, GROUP_SIZE,
                     stride_xm, stride_w, stride_s, stride_z, stride_ym, stride_ys, M, magic,
                     M_PAD: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                     HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, EVEN: tl.constexpr,
                     ONE_GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_R: tl.constexpr):  # fmt: skip
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    LO: tl.constexpr = 23 // BITS  # the fields that lie within bits 0..22 of a word
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # NOTE: a mask, not the GEMV's clamped index: N is the contiguous axis here, and a clamp
    # would hide its contiguity (scalar loads instead of 16-byte ones).
    n_ok = cols < N
    b_cols = tl.minimum(cols, N - 1)  # the bias's (loaded at the store)
    rs = tl.arange(0, BLOCK_R)
    r_start = pid_k * R_PER_SPLIT
    x0 = x_ptr
    x1 = x_ptr + tl.minimum(1, M - 1).to(tl.int64) * stride_xm
    x2 = x_ptr + tl.minimum(2, M - 1).to(tl.int64) * stride_xm
    x3 = x_ptr + tl.minimum(3, M - 1).to(tl.int64) * stride_xm
    acc0 = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    if M_PAD > 1:
        acc1 = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    if M_PAD > 2:
        acc2 = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for rr in range(0, R_PER_SPLIT, BLOCK_R):
        r = r_start + rr + rs
        r_ok = r < KW
        w_ptrs = w_ptr + r.to(tl.int64)[:, None] * stride_w + cols[None, :]
        w_ok = n_ok[None, :] if EVEN else r_ok[:, None] & n_ok[None, :]
        words = tl.load(w_ptrs, mask=w_ok, other=0, eviction_policy="evict_first")
        # Each word row lies in one group (the pack divides the group size); ONE_GROUP: the tile.
        if ONE_GROUP:
            g = ((r_start + rr) * PACK) // GROUP_SIZE
            # NOTE: loaded as a whole tile (the same row for every word row, from L1): in the
            # words' layout, where a `[BLOCK_N]` row would be converted through shared memory.
            one = (rs * 0)[:, None] + cols[None, :]
            s = tl.load(s_ptr + g * stride_s + one, mask=n_ok[None, :], other=0.0)
            if HAS_ZERO:
                z = tl.load(z_ptr + g * stride_z + one, mask=n_ok[None, :], other=0)
                z = z.to(tl.float32)
        else:
            g = (tl.minimum(r, KW - 1) * PACK) // GROUP_SIZE
            s = tl.load(
                s_ptr + g[:, None] * stride_s + cols[None, :], mask=n_ok[None, :], other=0.0
            )
            if HAS_ZERO:
                z = tl.load(
                    z_ptr + g[:, None] * stride_z + cols[None, :], mask=n_ok[None, :], other=0
                )
                z = z.to(tl.float32)
        if not HAS_ZERO:
            z = 1 << (BITS - 1)
        t0 = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        t1 = t0
        t2 = t0
        t3 = t0
        hi = words >> (LO * BITS)
        for j in tl.static_range(PACK):
            # Field j at bit offset `o` (of the word, or of `hi` past the LO fields): OR-ing its
            # bits in place into 2^23 (`magic`) gives 2^23 + q * 2^o; minus 2^23 + z * 2^o,
            # (q - zero) * 2^o, exactly; the input is multiplied by 2^-o instead (exact).
            o = (j - LO * (j >= LO)) * BITS
            if j < LO:  # noqa: SIM108 (a constexpr branch)
                bits = (words & (MASK << o)) | magic
            else:
                bits = (hi & (MASK << o)) | magic
            d = bits.to(tl.float32, bitcast=True) - (z * (1 << o) + 8388608.0)
            k = r * PACK + j
            t0 = _int_acc(t0, x0 + k, r_ok, d, 1.0 / (1 << o), EVEN)
            if M_PAD > 1:
                t1 = _int_acc(t1, x1 + k, r_ok, d, 1.0 / (1 << o), EVEN)
            if M_PAD > 2:
                t2 = _int_acc(t2, x2 + k, r_ok, d, 1.0 / (1 << o), EVEN)
                t3 = _int_acc(t3, x3 + k, r_ok, d, 1.0 / (1 << o), EVEN)
        acc0 += t0 * s
        if M_PAD > 1:
            acc1 += t1 * s
        if M_PAD > 2:
            acc2 += t2 * s
            acc3 += t3 * s
    _store_rows(tl.sum(acc0, axis=0), y_ptr, b_ptr, 0, cols, b_cols, N, M, pid_k, stride_ym,
                stride_ys, HAS_BIAS, PARTIAL)  # fmt: skip
    if M_PAD > 1:
        _store_rows(tl.sum(acc1, axis=0), y_ptr, b_ptr, 1, cols, b_cols, N, M, pid_k, stride_ym,
                    stride_ys, HAS_BIAS, PARTIAL)  # fmt: skip
    if M_PAD > 2:
        _store_rows(tl.sum(acc2, axis=0), y_ptr, b_ptr, 2, cols, b_cols, N, M, pid_k, stride_ym,
                    stride_ys, HAS_BIAS, PARTIAL)  # fmt: skip
        _store_rows(tl.sum(acc3, axis=0), y_ptr, b_ptr, 3, cols, b_cols, N, M, pid_k, stride_ym,
                    stride_ys, HAS_BIAS, PARTIAL)  # fmt: skip


@functools.cache
def int_default_config(m: int, n: int, kw: int) -> QuantGemvConfig:
    """`[16, 128]` word tiles (16 bytes per thread along N; 128 inputs of 4 bits, one group of
    128), 8 rows of words for 3-4 input rows (registers); split along K (a power of two) up to
    about 4 programs per SM of an H200.
    NOTE: a guess until swept (`pagedllm bench quant-gemm --m 1,4 --sweep-gemv`)."""
    block_n = 128 if n >= 128 else max(16, triton.next_power_of_2(n))
    block_r = 16 if m <= 2 else 8
    split = max(1, min(triton.cdiv(kw, block_r), 528 // triton.cdiv(n, block_n)))
    split = 1 << (split.bit_length() - 1)  # NOTE: a power of two: whole tiles in every split
    return QuantGemvConfig(block_n, block_r, 4, split)


def int_gemv(
    x: torch.Tensor,
    w: IntWeights,
    bias: torch.Tensor | None = None,
    config: QuantGemvConfig | None = None,
) -> torch.Tensor:
    """`w4a16.int_gemm`'s product (up to rounding: see the module doc) for `x [..., K]` of at most
    4 rows."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    pack = 32 // w.bits
    if rows.shape[1] != w.k or w.k % pack or m > MAX_ELEMENTWISE_M:
        raise ValueError(f"int_gemv: x {tuple(rows.shape)} for a [{w.n}, {w.k}] weight")
    y = torch.empty(m, w.n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*x.shape[:-1], w.n)
    kw = w.k // pack
    cfg = config or _table(f"int{w.bits}", m, w.n, w.k) or int_default_config(m, w.n, kw)
    per, split = _split(kw, cfg.block_k, cfg.split_k)
    partial = split > 1
    out = torch.empty(split, m, w.n, dtype=torch.float32, device=x.device) if partial else y
    has_bias = bias is not None and not partial
    zeros = w.zeros if w.zeros is not None else w.scales
    _int_gemv_kernel[(triton.cdiv(w.n, cfg.block_n), split)](
        out, rows, w.qweight, w.scales, zeros, bias if has_bias else out, w.n, kw, per,
        w.group_size, rows.stride(0), w.qweight.stride(0), w.scales.stride(0), zeros.stride(0),
        out.stride(-2), out.stride(0) if partial else 0, m, MAGIC, M_PAD=triton.next_power_of_2(m),
        BITS=w.bits, HAS_ZERO=w.zeros is not None, HAS_BIAS=has_bias, PARTIAL=partial,
        EVEN=kw % per == 0, ONE_GROUP=w.group_size % (cfg.block_k * pack) == 0,
        BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_k, num_warps=cfg.num_warps,
    )  # fmt: skip
    if partial:
        _reduce(y, out, bias, split)
    return y.view(*x.shape[:-1], w.n)
