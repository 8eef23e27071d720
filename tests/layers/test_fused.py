"""The fused Triton kernels (pagedllm/layers/fused_kernels.py) against the layers' torch ops.

Without a GPU they run on CPU tensors under Triton's interpreter (set before triton is imported),
in fp32 and fp16; on a GPU also in bf16 at serving shapes. The torch ops are the reference: the
eager path of `RMSNorm`, `SiluAndMul` and `RotaryEmbedding` (which the layers take on the CPU).
Half-precision results may differ by one rounding step, from the order of the fp32 sum of squares
(RMSNorm) or of SiLU's fp32 math; the rotary kernel is written to repeat HF's roundings and is
bit-equal under the interpreter (compiled on a GPU: within one rounding step).
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import kernel_test_device

DEVICE = kernel_test_device()  # NOTE: before triton is first imported

from pagedllm.layers import fused_kernels  # noqa: E402
from pagedllm.layers.activation import SiluAndMul  # noqa: E402
from pagedllm.layers.layernorm import RMSNorm  # noqa: E402
from pagedllm.layers.rotary import get_rope  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# One rounding step of the dtype, relative: the most two implementations may differ by.
ULP = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _reference(fn, *args):
    """The layer's torch path, run on the CPU in the input dtype (as the layers do there)."""
    cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    return fn(*cpu)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = ULP[dtype]
    torch.testing.assert_close(actual.cpu().float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "hidden"), [(1, 64), (7, 576), (33, 4096)])
def test_rms_norm(dtype: torch.dtype, rows: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(rows + hidden)
    norm = RMSNorm(hidden, eps=1e-5)
    norm.weight.data = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    x = (3 * torch.randn(rows, hidden, generator=gen)).to(dtype)
    residual = torch.randn(rows, hidden, generator=gen).to(dtype)
    expected = _reference(norm, x)
    expected_out, expected_res = _reference(norm, x, residual)
    w = norm.weight.data.to(DEVICE)
    _close(fused_kernels.rms_norm(x.to(DEVICE), w, 1e-5), expected, dtype)
    out, new_res = fused_kernels.fused_add_rms_norm(x.to(DEVICE), residual.to(DEVICE), w, 1e-5)
    _close(out, expected_out, dtype)
    assert torch.equal(new_res.cpu(), expected_res), "the residual sum rounds as torch's add"


def test_rms_norm_per_head_rows() -> None:
    """Qwen3's q/k norm: a [T, H, D] view of a wider projection, normalized per head."""
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(6, 3 * 4 * 32, generator=gen)
    q = qkv[:, : 4 * 32].reshape(6, 4, 32)
    norm = RMSNorm(32, eps=1e-6)
    norm.weight.data = torch.rand(32, generator=gen) + 0.5
    out = fused_kernels.rms_norm(q.to(DEVICE), norm.weight.data.to(DEVICE), 1e-6)
    assert out.shape == q.shape
    _close(out, norm(q), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "inter"), [(1, 64), (9, 1536), (17, 3000)])
def test_silu_and_mul(dtype: torch.dtype, rows: int, inter: int) -> None:
    gen = torch.Generator().manual_seed(rows * inter)
    x = (2 * torch.randn(rows, 2 * inter, generator=gen)).to(dtype)
    expected = _reference(SiluAndMul(), x.float()).to(dtype) if dtype != torch.float32 else None
    if expected is None:
        expected = _reference(SiluAndMul(), x)
    _close(fused_kernels.silu_and_mul(x.to(DEVICE)), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("head_dim", "num_heads", "num_kv_heads", "rope"),
    [
        (64, 9, 3, {"rope_type": "default", "rope_theta": 100000.0}),
        (128, 32, 8, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}),
        (128, 16, 8, {"rope_type": "default", "rope_theta": 1000000.0}),
    ],
)  # fmt: skip
def test_rotary_in_place_on_qkv_views(
    dtype: torch.dtype, head_dim: int, num_heads: int, num_kv_heads: int, rope: dict
) -> None:
    """q and k are column views of one fused qkv projection (rows strided), rotated in place;
    the torch path's result is the reference."""
    check_rotary_in_place(head_dim, num_heads, num_kv_heads, rope, dtype, head_dim + num_heads)


def check_rotary_in_place(
    head_dim: int, num_heads: int, num_kv_heads: int, rope: dict, dtype: torch.dtype, seed: int
) -> None:
    """`rotary_embedding_` on views of one qkv against the torch path; v untouched. Shared with
    the head-dim tests."""
    gen = torch.Generator().manual_seed(seed)
    rotary = get_rope(head_dim, 4096, rope)
    tokens = 13
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=gen).to(dtype)
    positions = torch.randint(0, 4096, (tokens,), generator=gen)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    expected_q, expected_k = rotary(positions, q, k)
    dev_qkv = qkv.to(DEVICE)
    dq, dk, dv = dev_qkv.split([q_size, kv_size, kv_size], dim=-1)
    fused_kernels.rotary_embedding_(
        positions.to(DEVICE), dq, dk,
        rotary.cos_cache.to(DEVICE), rotary.sin_cache.to(DEVICE), head_dim,
    )  # fmt: skip
    if DEVICE == "cuda":
        # NOTE: compiled, the kernel differs from torch's ops by one rounding step in about a
        # fifth of the elements (fp32: products and sums contract into FMAs; fp16/bf16: the
        # casts between ops that repeat HF's roundings are not all kept). The interpreter runs
        # the kernel as written, and there it is bit-equal.
        _close(dq, expected_q, dtype)
        _close(dk, expected_k, dtype)
    else:
        assert torch.equal(dq.cpu(), expected_q) and torch.equal(dk.cpu(), expected_k)
    assert torch.equal(dv.cpu(), qkv[:, q_size + kv_size :]), "v is untouched"
