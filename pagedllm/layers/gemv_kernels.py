"""Triton GEMV for the decode linears: `y[M, N] = x[M, K] @ W[N, K]^T (+ bias)` for small M.

At batch 1-8 a decode step is bound by reading the weights once; cuBLAS reads the smaller
projections below the copy rate and adds split-K reduce kernels. Here each program owns
`BLOCK_N` output features for all M rows and streams its `[BLOCK_N, K]` weight rows in
`[BLOCK_N, BLOCK_K]` tiles (loaded `evict_first`: read once per step, they should not push the
activations out of L2). Two inner products, picked per shape by the config table:
- elementwise (M <= 4): each row keeps an fp32 `[BLOCK_N, BLOCK_K]` accumulator of products,
  reduced once after the loop (no reduction or shuffle per tile). The rows are unrolled by the
  constexpr `M_PAD` (a loop cannot carry a list of accumulators, so up to four are spelled out);
  each row's input is a 1-D tile broadcast over the weight tile. When `BLOCK_K` is a multiple of
  (16 bytes per thread) x (all threads), that broadcast needs no layout conversion: the compiled
  loop (checked in the PTX for sm_90) is vector loads and FMAs only, no shared memory or barrier.
- `tl.dot` (5 rows and more): rows padded to 16 on the tensor cores; the elementwise form would
  need `M * N * K` CUDA-core FMAs, as long as the weight read itself from about 8 rows.
Only the padded row count `M_PAD` (a power of two) is a compile-time constant, so one compiled
kernel serves `M_PAD / 2 < M <= M_PAD` (an eager step of 3 or 5 tokens compiles nothing new).
Optionally the K axis is split over `SPLIT_K` programs that write fp32 partials, summed (with the
bias) by a tiny second kernel, for shapes with too few output blocks to fill the GPU.

`gemv_silu_mul` takes the MLP's `[M, 2K]` gate_up output and computes `silu(gate) * up` while
loading it, rounded to the activation dtype between SiLU and the product and after the product,
exactly as `fused_kernels.silu_and_mul` followed by the linear: one launch for the down projection.

Launch parameters come from `_config` (a table filled from `python -m pagedllm.benchmarks.gemv
--sweep` on the GPU, with a heuristic default); nothing is autotuned at run time, so start-up
and CUDA-graph capture compile exactly the kernels that replay. The launch reads no device values
on the host and its only allocation is the output (and split-K partials), so it can be captured.

Imported only when used (CUDA); tests run the kernels on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1` set before this module is imported).
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_M = 16
MAX_ELEMENTWISE_M = 4  # the kernel's elementwise form keeps one accumulator per row, up to 4
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 1
    split_k: int = 1
    dot: bool = False


# (act, N, K, M) -> config, for 2-byte dtypes, from `python -m pagedllm.benchmarks.gemv --sweep`
# (llama3-8b M = 1: `--wide`) on an H200 (bf16, 2026-11-22). Only the winners are kept (`wins`):
# every plain M = 1 entry (faster than cuBLAS for every shape swept), the M = 2 or 4 entries that
# beat cuBLAS by 4 % or more (from 2 rows cuBLAS is otherwise as fast, from 8 rows everywhere),
# and the SiLU-and-mul entries where one fused launch beat the SiLU kernel + the plain GEMV (not
# llama3-8b's down: each program recomputes SiLU over all 14336 inputs, 31.0 µs vs 1.3 + 28.7).
C = GemvConfig  # C(block_n, block_k, num_warps[, num_stages, split_k])
_TABLE: dict[tuple[str, int, int, int], GemvConfig] = {
    ("", 6144, 4096, 1): C(1, 256, 1),  # llama3-8b qkv
    ("", 4096, 4096, 1): C(1, 256, 1),  # llama3-8b o_proj
    ("", 4096, 4096, 2): C(4, 512, 2),  # llama3-8b o_proj
    ("", 28672, 4096, 1): C(4, 2048, 4),  # llama3-8b gate_up
    ("", 4096, 14336, 1): C(1, 256, 1),  # llama3-8b down
    ("", 128256, 4096, 1): C(4, 2048, 4),  # llama3-8b lm_head
    ("", 4096, 1024, 1): C(2, 512, 2),  # qwen3-0.6b qkv
    ("", 4096, 1024, 2): C(4, 512, 2),  # qwen3-0.6b qkv
    ("", 1024, 2048, 1): C(2, 2048, 8, 1, 2),  # qwen3-0.6b o_proj
    ("", 1024, 2048, 2): C(1, 1024, 4),  # qwen3-0.6b o_proj
    ("", 1024, 2048, 4): C(1, 1024, 2),  # qwen3-0.6b o_proj
    ("", 6144, 1024, 1): C(4, 512, 2),  # qwen3-0.6b gate_up
    ("", 1024, 3072, 1): C(2, 1024, 4),  # qwen3-0.6b down
    ("", 1024, 3072, 2): C(1, 1024, 4),  # qwen3-0.6b down
    ("", 1024, 3072, 4): C(2, 1024, 4),  # qwen3-0.6b down
    ("silu_mul", 1024, 3072, 1): C(2, 1024, 4),  # qwen3-0.6b down
    ("silu_mul", 1024, 3072, 2): C(4, 1024, 4),  # qwen3-0.6b down
    ("", 151936, 1024, 1): C(4, 512, 2),  # qwen3-0.6b lm_head
}


@triton.jit
def _load_act(ptrs, K, mask, EVEN_K: tl.constexpr, SILU_MUL: tl.constexpr):
    """The GEMV input at `ptrs` (a row's 1-D tile, or a 2-D tile of rows), or with SILU_MUL
    `silu(gate) * up` from the gate at `ptrs` and the up at `ptrs + K`, in the input dtype."""
    if EVEN_K:
        a = tl.load(ptrs)
        if SILU_MUL:
            b = tl.load(ptrs + K)
    else:
        a = tl.load(ptrs, mask=mask, other=0.0)
        if SILU_MUL:
            b = tl.load(ptrs + K, mask=mask, other=0.0)
    if SILU_MUL:
        # As `_silu_and_mul_kernel`: SiLU rounds to the dtype, then the product does.
        g = a.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(b.dtype).to(tl.float32)
        a = (act * b.to(tl.float32)).to(b.dtype)
    return a


@triton.jit
def _store_rows(out, y_ptr, b_ptr, row0, rows, w_rows, N, M, pid_k, stride_ym, stride_ys,
                HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr):  # fmt: skip
    """Stores `out` (`[BLOCK_N]` of row `row0`, or `[R, BLOCK_N]` of rows `row0 + i`)."""
    if HAS_BIAS:
        out += tl.load(b_ptr + w_rows).to(tl.float32)
    ptrs = y_ptr + pid_k * stride_ys + row0 * stride_ym + rows
    # NOTE: not `(rows < N) & (row0 < M)`: triton 3.9's interpreter makes an int32 mask of that.
    mask = rows < tl.where(row0 < M, N, 0)
    if PARTIAL:
        tl.store(ptrs, out, mask=mask)
    else:
        tl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gemv_kernel(
    y_ptr,
    x_ptr,
    w_ptr,
    b_ptr,
    N,
    K,
    K_PER_SPLIT,
    stride_xm,
    stride_ym,
    stride_ys,
    M,
    M_PAD: tl.constexpr,
    SILU_MUL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Rows past N read row N - 1 (no mask on the weight stream), padding rows past M read row
    # M - 1; their sums are never stored.
    w_rows = tl.minimum(rows, N - 1).to(tl.int64)
    w_ptrs = w_ptr + w_rows[:, None] * K + ks[None, :]
    k_start = pid_k * K_PER_SPLIT
    if DOT:
        ms = tl.arange(0, M_PAD)
        x_ptrs = x_ptr + tl.minimum(ms, M - 1).to(tl.int64)[:, None] * stride_xm + ks[None, :]
        acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    else:
        # Each row's input is a 1-D tile broadcast over the weight tile's rows: with BLOCK_K =
        # (16 bytes per thread) x (all threads) the broadcast needs no layout conversion.
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
    # NOTE: every split runs K_PER_SPLIT / BLOCK_K tiles; tiles past K (only when not EVEN_K)
    # are masked off entirely.
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        k0 = k_start + kk
        k_ok = (ks + k0) < K
        if EVEN_K:
            w = tl.load(w_ptrs + k0, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs + k0, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
        if DOT:
            x = _load_act(x_ptrs + k0, K, k_ok[None, :], EVEN_K, SILU_MUL)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        else:
            w = w.to(tl.float32)
            acc0 += _load_act(x0 + k0, K, k_ok, EVEN_K, SILU_MUL).to(tl.float32)[None, :] * w
            if M_PAD > 1:
                acc1 += _load_act(x1 + k0, K, k_ok, EVEN_K, SILU_MUL).to(tl.float32)[None, :] * w
            if M_PAD > 2:
                acc2 += _load_act(x2 + k0, K, k_ok, EVEN_K, SILU_MUL).to(tl.float32)[None, :] * w
                acc3 += _load_act(x3 + k0, K, k_ok, EVEN_K, SILU_MUL).to(tl.float32)[None, :] * w
    # The sums: one reduction per row after the loop (constexpr branches: only the taken
    # ones' accumulators exist).
    if DOT:
        _store_rows(acc, y_ptr, b_ptr, tl.arange(0, M_PAD)[:, None], rows[None, :],
                    w_rows[None, :], N, M, pid_k, stride_ym, stride_ys, HAS_BIAS, PARTIAL)  # fmt: skip
    else:
        _store_rows(tl.sum(acc0, axis=1), y_ptr, b_ptr, 0, rows, w_rows, N, M, pid_k,
                    stride_ym, stride_ys, HAS_BIAS, PARTIAL)  # fmt: skip
        if M_PAD > 1:
            _store_rows(tl.sum(acc1, axis=1), y_ptr, b_ptr, 1, rows, w_rows, N, M, pid_k,
                        stride_ym, stride_ys, HAS_BIAS, PARTIAL)  # fmt: skip
        if M_PAD > 2:
            _store_rows(tl.sum(acc2, axis=1), y_ptr, b_ptr, 2, rows, w_rows, N, M, pid_k,
                        stride_ym, stride_ys, HAS_BIAS, PARTIAL)  # fmt: skip
            _store_rows(tl.sum(acc3, axis=1), y_ptr, b_ptr, 3, rows, w_rows, N, M, pid_k,
                        stride_ym, stride_ys, HAS_BIAS, PARTIAL)  # fmt: skip


@triton.jit
def _split_k_reduce_kernel(
    y_ptr, part_ptr, b_ptr, N, stride_ym, stride_ps, stride_pm,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * stride_ps + m * stride_pm + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _default_config(m: int, n: int, k: int, dtype: torch.dtype) -> GemvConfig:
    """A shape-only guess. Elementwise: `BLOCK_K` spans 16 bytes per thread over all threads
    (the width at which the input's broadcast needs no layout conversion), about 64 fp32
    accumulators per thread; `tl.dot` from 5 rows."""
    if m > MAX_ELEMENTWISE_M:
        return GemvConfig(block_n=32, block_k=256, num_warps=4, num_stages=2, dot=True)
    vec = 16 // dtype.itemsize
    warps = 4
    while warps > 1 and vec * 32 * warps > k:
        warps //= 2
    block_k = vec * 32 * warps
    block_n = max(1, 8 // triton.next_power_of_2(m))
    return GemvConfig(block_n=block_n, block_k=block_k, num_warps=warps)


@functools.cache
def wins(m: int, n: int, k: int, act: str = "") -> bool:
    """Whether the GEMV was measured faster for `m` rows of this shape: a plain one-row product
    always (any shape); otherwise only the shapes and row counts the table lists (`m` rounded up
    to a power of two), the fused SiLU-and-mul ones included."""
    if m == 1 and not act:
        return True
    return (act, n, k, triton.next_power_of_2(m)) in _TABLE


@functools.cache
def _config(m: int, n: int, k: int, dtype: torch.dtype, act: str = "") -> GemvConfig:
    """The launch parameters for `[m, k] x [n, k]^T` (table entry, else the default)."""
    if dtype.itemsize == 2:
        for key_act in dict.fromkeys((act, "")):
            swept = sorted(mm for (a, nn, kk, mm) in _TABLE if (a, nn, kk) == (key_act, n, k))
            for mm in swept:
                if mm >= m:
                    return _TABLE[(key_act, n, k, mm)]
    return _default_config(m, n, k, dtype)


def _on_device(t: torch.Tensor) -> bool:
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def supports(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    silu_mul: bool = False,
) -> bool:
    """Whether `gemv` (or `gemv_silu_mul`) runs these tensors: CUDA (or interpreter) tensors of
    one supported dtype, a contiguous `[N, K]` weight, `1 <= M <= MAX_M` rows of `x`."""
    if weight.dim() != 2 or x.dim() == 0 or not weight.is_contiguous():
        return False
    n, k = weight.shape
    if x.shape[-1] != (2 * k if silu_mul else k) or n == 0 or k == 0:
        return False
    if x.dtype not in DTYPES or weight.dtype != x.dtype or x.device != weight.device:
        return False
    if bias is not None and (
        bias.shape != (n,) or bias.dtype != x.dtype or not bias.is_contiguous()
    ):
        return False
    return 1 <= math.prod(x.shape[:-1]) <= MAX_M and _on_device(x)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for `x [..., K]` of at most `MAX_M` rows (see `supports`)."""
    return _launch(x, weight, bias, config, silu_mul=False)


def gemv_silu_mul(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """`F.linear(silu_and_mul(gate_up), weight, bias)` in one launch; `gate_up [..., 2K]`."""
    return _launch(gate_up, weight, bias, config, silu_mul=True)


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: GemvConfig | None,
    silu_mul: bool,
) -> torch.Tensor:
    if not supports(x, weight, bias, silu_mul=silu_mul):
        raise ValueError(
            f"gemv does not support x {tuple(x.shape)} {x.dtype} {x.device} with weight "
            f"{tuple(weight.shape)} {weight.dtype} (contiguous={weight.is_contiguous()})"
        )
    n, k = weight.shape
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    m = rows.shape[0]
    cfg = config or _config(m, n, k, x.dtype, "silu_mul" if silu_mul else "")
    if cfg.dot and min(cfg.block_n, cfg.block_k) < 16:
        raise ValueError(f"tl.dot needs blocks of at least 16, got {cfg}")
    if not cfg.dot and m > MAX_ELEMENTWISE_M:
        raise ValueError(f"{m} rows need a tl.dot config (elementwise: at most 4), got {cfg}")
    m_pad = max(16, triton.next_power_of_2(m)) if cfg.dot else triton.next_power_of_2(m)
    split_k = max(1, min(cfg.split_k, triton.cdiv(k, cfg.block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), cfg.block_k) * cfg.block_k
    # NOTE: rounding the split up to whole tiles may leave the last splits empty: drop them
    # (an empty split of an EVEN_K launch would read past K, unmasked).
    split_k = triton.cdiv(k, k_per_split)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    partial = split_k > 1
    out = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if partial else y
    _gemv_kernel[(triton.cdiv(n, cfg.block_n), split_k)](
        out, rows, weight, bias if bias is not None and not partial else weight,
        n, k, k_per_split, rows.stride(0), out.stride(-2), out.stride(0) if partial else 0,
        m, M_PAD=m_pad, SILU_MUL=silu_mul, HAS_BIAS=bias is not None and not partial,
        PARTIAL=partial, EVEN_K=k % k_per_split == 0 and k_per_split % cfg.block_k == 0, DOT=cfg.dot,
        IEEE=x.dtype == torch.float32, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if partial:
        block = min(1024, triton.next_power_of_2(n))
        _split_k_reduce_kernel[(m, triton.cdiv(n, block))](
            y, out, bias if bias is not None else y, n, y.stride(0), out.stride(0), out.stride(1),
            SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=block,
        )  # fmt: skip
    return y.view(*x.shape[:-1], n)
