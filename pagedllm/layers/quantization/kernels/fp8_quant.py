"""Dynamic FP8 (e4m3) activation quantization in Triton: per token (`quant_per_token`, one scale
per row, or the static per-tensor scale) and per token and group (`quant_per_group`, one scale per
row and group of input features, the 1 x 128 groups of block-wise FP8 checkpoints).

Both compute exactly what `fp8.fake_quant_per_token` / `fake_quant_per_group` (the torch oracle)
quantize: `scale = max(amax / 448, MIN_SCALE)` in float32 and `q = e4m3(clamp(x / scale, ±448))`
with IEEE division (`div_rn`) and round-to-nearest-even, so `q` and `scale` are bit-identical
to the reference. `silu_mul=True` reads `gate_up [M, 2K]` and quantizes `silu(gate) * up` (rounded
to the input dtype as `SiluAndMul` rounds it) in the same pass: the down projection's input is
never written in the model dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedllm.layers.gemv_kernels import _load_act

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # NOTE: fp8.MIN_SCALE (kept equal by the tests)
ONE_PASS_MAX_K = 16384  # rows up to this many inputs are read once (`_per_token_kernel`)


@triton.jit
def _quant_store(q_row, v, scale, offs, mask, FP8_MAX: tl.constexpr):
    r = tl.math.div_rn(v.to(tl.float32), scale)
    r = tl.minimum(tl.maximum(r, -FP8_MAX), FP8_MAX)
    tl.store(q_row + offs, r.to(q_row.dtype.element_ty), mask=mask)


@triton.jit
def _per_token_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q,
                      SILU_MUL: tl.constexpr, STATIC: tl.constexpr, ONE_PASS: tl.constexpr,
                      BLOCK: tl.constexpr, FP8_MAX: tl.constexpr,
                      MIN_SCALE: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    offs0 = tl.arange(0, BLOCK)
    if ONE_PASS:
        # NOTE: the row in one tile (K <= BLOCK), read once: a decode step's quantization is
        # one program, bound by the latency of its reads.
        mask = offs0 < K
        v = _load_act(x_row + offs0, K, mask, False, SILU_MUL)
        if STATIC:
            scale = tl.load(s_ptr)
        else:
            amax = tl.max(tl.abs(v.to(tl.float32)), axis=0)
            scale = tl.maximum(tl.math.div_rn(amax, FP8_MAX), MIN_SCALE)
            tl.store(s_ptr + row, scale)
        _quant_store(q_row, v, scale, offs0, mask, FP8_MAX)
    else:
        if STATIC:
            scale = tl.load(s_ptr)
        else:
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                offs = k0 + offs0
                v = _load_act(x_row + offs, K, offs < K, False, SILU_MUL)
                amax = tl.maximum(amax, tl.abs(v.to(tl.float32)))
            scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), FP8_MAX), MIN_SCALE)
            tl.store(s_ptr + row, scale)
        for k0 in range(0, K, BLOCK):
            offs = k0 + offs0
            mask = offs < K
            v = _load_act(x_row + offs, K, mask, False, SILU_MUL)
            _quant_store(q_row, v, scale, offs, mask, FP8_MAX)


@triton.jit
def _per_group_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, stride_s,
                      SILU_MUL: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr,
                      FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs = g * GROUP + tl.arange(0, BLOCK)
    mask = (offs < K) & (tl.arange(0, BLOCK) < GROUP)
    v = _load_act(x_ptr + row * stride_x + offs, K, mask, False, SILU_MUL).to(tl.float32)
    amax = tl.max(tl.where(mask, tl.abs(v), 0.0), axis=0)
    scale = tl.maximum(tl.math.div_rn(amax, FP8_MAX), MIN_SCALE)
    tl.store(s_ptr + row * stride_s + g, scale)
    _quant_store(q_ptr + row * stride_q, v, scale, offs, mask, FP8_MAX)


def _rows(x: torch.Tensor, silu_mul: bool) -> tuple[torch.Tensor, int]:
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    k = rows.shape[1] // 2 if silu_mul else rows.shape[1]
    if silu_mul and rows.shape[1] % 2:
        raise ValueError(f"silu_mul needs an even last dimension, got {rows.shape[1]}")
    return rows, k


def quant_per_token(
    x: torch.Tensor, static_scale: torch.Tensor | None = None, silu_mul: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [..., K]` (or `silu_and_mul` of `x [..., 2K]`) -> e4m3 `q [M, K]` and float32 `scale
    [M, 1]` per row; with `static_scale` (a float32 one-element tensor), `q` with that scale,
    which is returned as it is."""
    rows, k = _rows(x, silu_mul)
    m = rows.shape[0]
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    if static_scale is not None:
        scale = static_scale.reshape(()).float()
    else:
        scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    # NOTE: a row of up to ONE_PASS_MAX_K inputs in one tile (16 warps: 32 a thread at most).
    one_pass = k <= ONE_PASS_MAX_K
    block = triton.next_power_of_2(max(k, 16)) if one_pass else 2048
    _per_token_kernel[(m,)](
        rows, q, scale, k, rows.stride(0), q.stride(0), SILU_MUL=silu_mul,
        STATIC=static_scale is not None, ONE_PASS=one_pass, BLOCK=block, FP8_MAX=FP8_MAX,
        MIN_SCALE=MIN_SCALE, num_warps=4 if block <= 1024 else (8 if block <= 4096 else 16),
    )  # fmt: skip
    return q, scale


def quant_per_group(
    x: torch.Tensor, group: int, silu_mul: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [..., K]` (or `silu_and_mul` of `x [..., 2K]`) -> e4m3 `q [M, K]` and float32 `scale
    [M, ceil(K / group)]`, one per row and group of `group` features (the last may be shorter)."""
    rows, k = _rows(x, silu_mul)
    m = rows.shape[0]
    groups = triton.cdiv(k, group)
    q = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    _per_group_kernel[(m, groups)](
        rows, q, scale, k, rows.stride(0), q.stride(0), scale.stride(0), SILU_MUL=silu_mul,
        GROUP=group, BLOCK=triton.next_power_of_2(group), FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE,
        num_warps=1 if group <= 128 else 4,
    )  # fmt: skip
    return q, scale
