"""FP8 W8A8 GEMMs: `scaled_mm` (cuBLASLt through `torch._scaled_mm`) for per-tensor and
per-channel weight scales with per-tensor or per-token activation scales, and a Triton GEMM for
block-scaled weights (`block_scaled_mm`: 128 x 128 weight blocks, 1 x 128 activation groups, the
DeepSeek-V3 / Qwen3-FP8 format).

`torch._scaled_mm(a [M, K], b [K, N] column-major, scale_a, scale_b, out_dtype)` (torch 2.11, on
Hopper) takes either two one-element float32 scales (tensor-wise, any `out_dtype`) or `scale_a
[M, 1]` and `scale_b [1, N]` float32 (row-wise, bf16 out only); K and N must be multiples of 16.
`scaled_mm` picks: tensor-wise when both scales are per tensor; row-wise for a bf16 output
otherwise; for other output dtypes the unit-scaled float32 product, scaled in torch. The bias
is added after the product (in the output dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SCALED_MM_ALIGN = 16


def scaled_mm_supported(n: int, k: int) -> bool:
    """Whether `torch._scaled_mm` takes a weight of `n` outputs and `k` inputs."""
    return n % SCALED_MM_ALIGN == 0 and k % SCALED_MM_ALIGN == 0


def scaled_mm(
    q: torch.Tensor,
    scale_a: torch.Tensor,
    weight: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(q * scale_a) @ (weight * scale_b).T + bias` for e4m3 `q [M, K]` and `weight [N, K]`;
    `scale_a`: one element or `[M, 1]`; `scale_b`: one element or `[1, N]` (float32)."""
    b = weight.t()  # NOTE: [K, N] column-major, as cuBLASLt wants the second operand
    tensorwise = scale_a.numel() == 1 and scale_b.numel() == 1
    if tensorwise:
        y = torch._scaled_mm(q, b, scale_a.reshape(()), scale_b.reshape(()), out_dtype=out_dtype)
    elif out_dtype == torch.bfloat16:
        sa = scale_a.reshape(-1, 1).expand(q.shape[0], 1).contiguous()
        sb = scale_b.reshape(1, -1).expand(1, weight.shape[0]).contiguous()
        y = torch._scaled_mm(q, b, sa, sb, out_dtype=out_dtype)
    else:
        one = torch.ones((), dtype=torch.float32, device=q.device)
        y32 = torch._scaled_mm(q, b, one, one, out_dtype=torch.float32)
        y = (y32 * scale_a.reshape(-1, 1) * scale_b.reshape(1, -1)).to(out_dtype)
    if bias is not None:
        y = y + bias
    return y


@triton.jit
def _block_mm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, bias_ptr, M, N, K,
                     stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
                     SCALE_N: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):  # fmt: skip
    # NOTE: BLOCK_K is the scale block along K: one activation and one weight scale per K tile.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn
    as_rows = as_ptr + offs_m * stride_asm
    bs_cols = bs_ptr + (offs_n // SCALE_N) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + offs_k
        k_ok = k < K
        a = tl.load(a_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        sa = tl.load(as_rows + kb, mask=m_ok, other=0.0)
        sb = tl.load(bs_cols + kb, mask=n_ok, other=0.0)
        acc += tl.dot(a, b, out_dtype=tl.float32) * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _block_config(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by rows (vLLM's defaults for the format)."""
    if m <= 16:
        return 16, 64, 4, 3
    if m <= 64:
        return 64, 64, 4, 3
    return 64, 128, 4, 3


def block_scaled_mm(
    q: torch.Tensor,
    scale_a: torch.Tensor,
    weight: torch.Tensor,
    scale_b: torch.Tensor,
    block: tuple[int, int],
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """`sum_g (q_g * scale_a[:, g]) @ (weight_g * scale_b[n // bn, g]).T + bias`: e4m3 `q [M, K]`
    with `scale_a [M, ceil(K / bk)]`, e4m3 `weight [N, K]` with `scale_b [ceil(N / bn), ceil(K /
    bk)]` (float32; `block = (bn, bk)`, bk a power of two of at least 16)."""
    bn, bk = block
    m, k = q.shape
    n = weight.shape[0]
    if bk < 16 or bk & (bk - 1):
        raise ValueError(f"the block-scaled GEMM needs a power-of-two K block >= 16, got {bk}")
    c = torch.empty(m, n, dtype=out_dtype, device=q.device)
    if m == 0:
        return c
    bm, bn_tile, warps, stages = config or _block_config(m)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn_tile),)
    _block_mm_kernel[grid](
        q, scale_a, weight, scale_b, c, bias if bias is not None else c, m, n, k,
        q.stride(0), scale_a.stride(0), weight.stride(0), scale_b.stride(0), c.stride(0),
        SCALE_N=bn, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn_tile, BLOCK_K=bk,
        GROUP_M=8, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return c
