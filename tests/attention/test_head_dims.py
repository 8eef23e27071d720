"""Head dims that are not powers of two through the Triton kernels, beside the powers of two.

Real models have such heads (Phi-2 80, Phi-3-mini 96, DeepSeek MLA's 192 q/k heads, the tiny
test models 24); the kernels pad their head tile to a power of two and mask the lanes past the
head (`kernels.padded_head_dim`, `fused_kernels._in_half`); no tensor is padded. Each test runs over
`HEAD_DIMS` on fresh random inputs against a pure-PyTorch reference:
- `reshape_and_cache` against `torch_ref.write_to_kv_cache` (bit for bit, whole cache: a lane
  past the head written would land in the next head or slot);
- attention against `TorchRefAttention`: a prompt chunk after a cached prefix beside a full
  prompt (the varlen launch), decode rows of several requests of different lengths (the decode
  launch, with and without KV splits, with and without a sliding window), GQA with 2 query heads
  per KV head; the cache written by the kernel is compared too;
- the fused prologue `rope_norm_and_cache_` (per-head q/k RMSNorm, rotary, K/V store) and the
  fused rotary `rotary_embedding_` against the eager `RMSNorm` and `RotaryEmbedding`, and the
  fused `rms_norm` of per-head rows.

Tolerances:
- attention, fp32: `FP32_ATOL` absolute (measured under the interpreter: below 2e-6 at every
  head dim; the online softmax sums in another order than SDPA);
- attention, bf16/fp16: `HALF_TOL`, as tests/attention/test_triton.py (P rounds to the input
  dtype before P @ V, the output rounds);
- prologue and rotary: in rounding steps (ulps) of the dtype at each head's largest value, as
  tests/layers/test_prologue.py: without the q/k norm the interpreter repeats the eager ops'
  roundings bit for bit; with it the fp32 sum of squares adds in another order, within
  `MAX_ULPS`.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (tests/
triton_interpreter.py), at small shapes (the file takes about a minute on 2 cores); with a GPU
the same tests run compiled.
"""

from __future__ import annotations

import pytest
import torch

from tests.triton_interpreter import kernel_test_device

DEVICE = kernel_test_device()  # NOTE: before triton is first imported

from pagedllm.attention.torch_ref import TorchRefAttention, write_to_kv_cache  # noqa: E402
from pagedllm.attention.triton import kernels  # noqa: E402
from pagedllm.layers import fused, fused_kernels  # noqa: E402
from pagedllm.layers.layernorm import RMSNorm  # noqa: E402
from tests.attention.test_torch_ref import NUM_KV_HEADS, Case, make_case  # noqa: E402
from tests.attention.test_triton import to_device  # noqa: E402
from tests.layers.test_fused import check_rotary_in_place  # noqa: E402
from tests.layers.test_prologue import check_prologue  # noqa: E402
from tests.triton_interpreter import one_thread, patch_interpreter  # noqa: E402, F401

HEAD_DIMS = [24, 64, 80, 96, 128, 192, 256]
# The rotary's half heads: also 16 (half 8, admitted by `rotary_supported` since the halves are
# masked) and 40 (half 20).
ROTARY_HEAD_DIMS = [16, 24, 40, 64, 80, 96, 128, 192, 256]
GQA = 2
NUM_HEADS = NUM_KV_HEADS * GQA

FP32_ATOL = 1e-5
HALF_TOL = {torch.bfloat16: (3e-2, 2e-2), torch.float16: (5e-3, 5e-3)}  # (atol, rtol)
MAX_ULPS = {torch.float32: 4, torch.float16: 1, torch.bfloat16: 1}
MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
ROPE = {"rope_type": "default", "rope_theta": 10000.0}

if DEVICE == "cpu":
    patch_interpreter()


def _case(specs: list[tuple[int, int]], head_dim: int, dtype: torch.dtype, seed: int) -> Case:
    """`make_case` (shuffled blocks of 16, finite garbage in unused slots) on `DEVICE`."""
    return to_device(make_case(specs, NUM_HEADS, head_dim, 16, dtype, seed), DEVICE)


def _check_attention(
    case: Case,
    sliding_window: int | None,
    num_splits: int | None = None,
    use_decode_launch: bool = True,
) -> None:
    """The kernels' cache write and attention against `TorchRefAttention` in fp32."""
    head_dim = case.query.shape[-1]
    scale = head_dim**-0.5
    ref = TorchRefAttention(NUM_HEADS, head_dim, scale, NUM_KV_HEADS, sliding_window)
    expected_cache = case.kv_cache.float().clone()
    expected = ref.forward(
        case.query.float(), case.key.float(), case.value.float(), expected_cache, case.metadata
    )
    md = case.metadata
    kernels.reshape_and_cache(
        case.key, case.value, case.kv_cache, md.slot_mapping, md.num_actual_tokens
    )
    out = torch.full_like(case.query, float("nan"))
    kernels.paged_attention(
        case.query, case.kv_cache, md, out, scale, sliding_window,
        num_splits=num_splits, use_decode_launch=use_decode_launch,
    )  # fmt: skip
    assert torch.equal(case.kv_cache.float(), expected_cache)
    dtype = case.query.dtype
    atol, rtol = HALF_TOL.get(dtype, (FP32_ATOL, 0.0))
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------
# Attention: the cache write, prefill, decode
# ----------------------------------------------------------------------------------------------


def test_padded_head_dim() -> None:
    assert [kernels.padded_head_dim(d) for d in (8, 16, 24, 80, 96, 128, 192, 256)] == [
        16, 16, 32, 128, 128, 128, 256, 256,
    ]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_reshape_and_cache(head_dim: int, dtype: torch.dtype) -> None:
    """Real rows land in their slots bit for bit; padding rows (slot -1, rows past `num_tokens`)
    and every other slot and lane stay as they were. K/V are column views of one projection."""
    gen = torch.Generator().manual_seed(head_dim)
    total, num_tokens, num_blocks, block_size = 12, 10, 4, 16
    kv_size = NUM_KV_HEADS * head_dim
    proj = torch.randn(total, 3 * kv_size, generator=gen).to(dtype)
    key = proj[:, kv_size : 2 * kv_size].view(total, NUM_KV_HEADS, head_dim)
    value = proj[:, 2 * kv_size :].view(total, NUM_KV_HEADS, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[3, 7]] = -1
    cache = torch.randn(2, num_blocks, block_size, NUM_KV_HEADS, head_dim, generator=gen)
    cache = cache.to(dtype)
    expected = cache.clone()
    real = slots >= 0
    write_to_kv_cache(key[:num_tokens][real], value[:num_tokens][real], expected, slots[real])

    dev_proj, dev_cache = proj.to(DEVICE), cache.to(DEVICE)
    dev_key = dev_proj[:, kv_size : 2 * kv_size].view(total, NUM_KV_HEADS, head_dim)
    dev_value = dev_proj[:, 2 * kv_size :].view(total, NUM_KV_HEADS, head_dim)
    kernels.reshape_and_cache(dev_key, dev_value, dev_cache, slots.to(DEVICE), num_tokens)
    assert torch.equal(dev_cache.cpu(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_prefill_chunk_after_prefix(head_dim: int, dtype: torch.dtype) -> None:
    """A 12-token chunk after 45 cached tokens beside a 20-token prompt: the varlen launch."""
    case = _case([(45, 12), (0, 20)], head_dim, dtype, seed=head_dim + 1)
    assert case.metadata.max_query_len > kernels.decode_config(GQA, head_dim, dtype).block_m // GQA
    _check_attention(case, sliding_window=None)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_prefill_sliding_window_varlen_only(head_dim: int) -> None:
    """Prompt chunks and a decode row, all through the varlen launch, with a window of 19."""
    case = _case([(30, 9), (0, 1), (50, 14)], head_dim, torch.float32, seed=head_dim + 2)
    _check_attention(case, sliding_window=19, use_decode_launch=False)


@pytest.mark.parametrize("sliding_window", [None, 29])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_decode(head_dim: int, num_splits: int, sliding_window: int | None) -> None:
    """One query row per request, contexts of 0 to 130 tokens, split over the KV axis or not."""
    specs = [(c, 1) for c in (70, 0, 33, 130)]
    case = _case(specs, head_dim, torch.float32, seed=head_dim + 3 * num_splits)
    _check_attention(case, sliding_window, num_splits=num_splits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [24, 80, 96, 192])
def test_decode_half(head_dim: int, dtype: torch.dtype) -> None:
    """Half-precision decode through the split path (partials and their reduce)."""
    specs = [(c, 1) for c in (90, 5, 140)]
    case = _case(specs, head_dim, dtype, seed=head_dim + 4)
    _check_attention(case, sliding_window=None, num_splits=2)


# ----------------------------------------------------------------------------------------------
# The fused prologue, rotary and per-head RMSNorm
# ----------------------------------------------------------------------------------------------


def _max_ulps(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| over `[T, H, D]` heads, in ulps of the dtype at the head's
    largest |expected| value."""
    scale = expected.float().abs().amax(-1, keepdim=True)
    step = torch.exp2(torch.floor(torch.log2(scale)) - MANTISSA_BITS[expected.dtype])
    return ((actual.float() - expected.float()).abs() / step).max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("head_dim", ROTARY_HEAD_DIMS)
def test_prologue(head_dim: int, qk_norm: bool, dtype: torch.dtype) -> None:
    """The fused prologue at every head dim: test_prologue's check, GQA 2."""
    assert fused.rotary_supported(head_dim, head_dim)
    check_prologue(head_dim, NUM_HEADS, NUM_KV_HEADS, qk_norm, ROPE, dtype, head_dim + qk_norm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", ROTARY_HEAD_DIMS)
def test_rotary_in_place(head_dim: int, dtype: torch.dtype) -> None:
    """`rotary_embedding_` at every head dim: test_fused's check, GQA 2."""
    check_rotary_in_place(head_dim, NUM_HEADS, NUM_KV_HEADS, ROPE, dtype, head_dim + 5)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_rms_norm_per_head(head_dim: int) -> None:
    """The fused `rms_norm` of `[T, H, D]` heads (the q/k norm off the prologue) against
    `RMSNorm`'s torch path: the row tile is padded to a power of two and masked."""
    gen = torch.Generator().manual_seed(head_dim + 6)
    x = 3 * torch.randn(5, NUM_HEADS, head_dim, generator=gen)
    norm = RMSNorm(head_dim, eps=1e-6)
    norm.weight.data = 1 + 0.2 * torch.randn(head_dim, generator=gen)
    out = fused_kernels.rms_norm(x.to(DEVICE), norm.weight.data.to(DEVICE), 1e-6)
    assert _max_ulps(out.cpu(), norm(x)) <= MAX_ULPS[torch.float32]


def test_rotary_supported() -> None:
    """Whole heads of any even size; partial rotary and odd heads take the eager path."""
    assert all(fused.rotary_supported(d, d) for d in (2, 16, 24, 80, 96, 128, 192, 256))
    assert not fused.rotary_supported(80, 32)  # Phi-2: partial_rotary_factor 0.4
    assert not fused.rotary_supported(25, 25)
