"""The FP8 KV cache (`kv_cache_dtype="fp8"`) at the kernel level: quantization, the torch write
and reads, the Triton cache write, attention kernels and fused prologue.

Oracles:
- `e4m3`: E4M3 rounding written here from the format (3 mantissa bits, exponent bias 7,
  subnormal step 2^-9, saturation at 448, ties to even), in numpy float64, independent of
  torch's float8 cast; a cache row is `e4m3(fp32(x) / fp32(scale))`, read back `* scale`;
- dense float64 attention over those dequantized K/V (`dense_attention` of test_torch_ref);
- for the Triton kernels, `TorchRefAttention` over the same FP8 cache (under Triton's
  interpreter without a GPU: small shapes only; `gpu` tests at serving shapes), and for the
  fused prologue the eager norm and rotary with the torch write.
The engine end to end: test_fp8_kv_cache_engine.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.triton_interpreter import kernel_test_device

DEVICE = kernel_test_device()  # NOTE: before triton is first imported

from pagedllm.attention import fp8_kv  # noqa: E402
from pagedllm.attention.torch_ref import TorchRefAttention, gather_kv, write_to_kv_cache  # noqa: E402
from pagedllm.attention.triton import kernels  # noqa: E402
from pagedllm.attention.triton.backend import TritonAttention  # noqa: E402
from tests.attention.test_torch_ref import NUM_KV_HEADS, dense_attention, make_case  # noqa: E402
from tests.attention.test_triton import to_device  # noqa: E402
from tests.triton_interpreter import one_thread, patch_interpreter  # noqa: E402, F401

if not hasattr(torch, "float8_e4m3fn"):
    pytest.skip("this torch build has no float8_e4m3fn", allow_module_level=True)
FP8 = torch.float8_e4m3fn
FP32_ATOL = 2e-5
HALF_TOL = {torch.bfloat16: (3e-2, 2e-2), torch.float16: (5e-3, 5e-3)}
SMALL_MIXED = [(0, 37), (45, 12), (99, 1), (0, 1), (70, 1), (30, 5), (63, 1)]

if DEVICE == "cpu":
    patch_interpreter()


def e4m3(x: np.ndarray) -> np.ndarray:
    """Values rounded to E4M3 (the `fn` variant: no infinities), saturating, ties to even."""
    x = np.asarray(x, dtype=np.float64)
    a = np.minimum(np.abs(x), 448.0)
    # The binade's exponent; subnormals (below 2^-6) share the step of 2^-6's binade.
    exponent = np.floor(np.log2(np.maximum(a, 2.0**-6)))
    step = 2.0 ** (exponent - 3)
    return np.sign(x) * np.minimum(np.round(a / step) * step, 448.0)  # np.round: half to even


def fake_quant(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`x` as an FP8 cache gives it back (float64): e4m3(fp32(x) / fp32(scale)) * scale."""
    ratio = x.float().cpu().numpy() / np.float32(scale)  # NOTE: fp32 division, as the writers
    return torch.from_numpy(e4m3(ratio) * np.float32(scale)).to(x.device)


def random_values(n: int, seed: int) -> torch.Tensor:
    """Values over E4M3's whole range: subnormals, normals, beyond 448, signs, exact zeros."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * 2.0 ** torch.randint(-12, 10, (n,), generator=gen)
    x[:4] = torch.tensor([0.0, 448.0, 465.0, -1e6])
    return x


# ----------------------------------------------------------------------------------------------
# Quantization and the torch write / read
# ----------------------------------------------------------------------------------------------


def test_oracle_agrees_with_torch_cast() -> None:
    x = random_values(20000, 0)
    got = x.clamp(-448, 448).to(FP8).double()
    assert torch.equal(got, torch.from_numpy(e4m3(x.numpy())))


@pytest.mark.parametrize("scale", [1.0, 0.0173, 3.7])
def test_quantize_dequantize(scale: float) -> None:
    x = random_values(5000, 1)
    s = torch.tensor(scale)
    q = fp8_kv.quantize_kv(x, s, FP8)
    assert q.dtype == FP8 and not q.float().isnan().any()
    out = fp8_kv.dequantize_kv(q, s, torch.float32)
    torch.testing.assert_close(out.double(), fake_quant(x, scale), atol=0, rtol=1e-7)
    # Other cache dtypes: a plain cast, scale unused.
    assert torch.equal(fp8_kv.quantize_kv(x, s, torch.bfloat16), x.to(torch.bfloat16))


def _fp8_cache(case, k_scale: float, v_scale: float) -> torch.Tensor:
    """The case's cache (context rows and garbage) as an FP8 cache would hold it."""
    cache = torch.empty(case.kv_cache.shape, dtype=FP8, device=case.kv_cache.device)
    cache[0] = fp8_kv.quantize_kv(case.kv_cache[0], torch.tensor(k_scale), FP8)
    cache[1] = fp8_kv.quantize_kv(case.kv_cache[1], torch.tensor(v_scale), FP8)
    return cache


def test_torch_write_and_gather_round_trip() -> None:
    case = make_case(SMALL_MIXED, 4, 32, 16, seed=2)
    k_scale, v_scale = torch.tensor(0.05), torch.tensor(0.3)
    cache = torch.zeros(case.kv_cache.shape, dtype=FP8)
    md = case.metadata
    write_to_kv_cache(case.key, case.value, cache, md.slot_mapping, k_scale, v_scale)
    flat = cache.view(2, -1, *cache.shape[3:])
    written = flat[:, md.slot_mapping].double()
    torch.testing.assert_close(written[0] * 0.05, fake_quant(case.key, 0.05), atol=0, rtol=1e-6)
    torch.testing.assert_close(written[1] * 0.3, fake_quant(case.value, 0.3), atol=0, rtol=1e-6)
    others = torch.ones(flat.shape[1], dtype=torch.bool)
    others[md.slot_mapping] = False
    assert not flat[:, others].float().any(), "only the step's slots are written"
    # gather: blocks end to end, dequantized into the asked dtype.
    ids = md.block_table[:2, :3]
    key, value = gather_kv(cache, ids, torch.float32, k_scale, v_scale)
    blocks = cache[:, ids.reshape(-1).long()].float()
    assert key.dtype == torch.float32 and key.shape == (2, 48, NUM_KV_HEADS, 32)
    torch.testing.assert_close(key.reshape(-1, NUM_KV_HEADS, 32), blocks[0].flatten(0, 1) * 0.05)
    torch.testing.assert_close(value.reshape(-1, NUM_KV_HEADS, 32), blocks[1].flatten(0, 1) * 0.3)


@pytest.mark.parametrize("sliding_window", [None, 29])
def test_torch_ref_attention_fp8_matches_dense(sliding_window: int | None) -> None:
    """The reference over an FP8 cache equals dense attention over the oracle's dequantized
    K/V (context and this step's rows alike)."""
    num_heads, head_dim, k_s, v_s = 4, 32, 0.02, 0.4
    case = make_case(SMALL_MIXED, num_heads, head_dim, 16, seed=3)
    cache = _fp8_cache(case, k_s, v_s)
    impl = TorchRefAttention(num_heads, head_dim, head_dim**-0.5, NUM_KV_HEADS, sliding_window)
    out = impl.forward(
        case.query, case.key, case.value, cache, case.metadata,
        k_scale=torch.tensor(k_s), v_scale=torch.tensor(v_s),
    )  # fmt: skip
    start = 0
    for (_, q), k, v in zip(case.specs, case.full_keys, case.full_values, strict=True):
        want = dense_attention(
            case.query[start : start + q], fake_quant(k, k_s), fake_quant(v, v_s),
            head_dim**-0.5, sliding_window,
        )  # fmt: skip
        torch.testing.assert_close(out[start : start + q].double(), want, atol=1e-5, rtol=0)
        start += q


# ----------------------------------------------------------------------------------------------
# Triton: the cache write and the attention kernels against the reference
# ----------------------------------------------------------------------------------------------


def check_triton(
    specs: list[tuple[int, int]],
    num_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    sliding_window: int | None = None,
    num_kv_splits: int | None = None,
    use_decode_launch: bool = True,
    seed: int = 0,
    scales: tuple[float, float] = (0.03, 0.5),
    **options: object,
) -> None:
    """`TritonAttention` over an FP8 cache against `TorchRefAttention` over a copy of it: the
    caches after the write byte for byte, the outputs at the query dtype's tolerance."""
    case = to_device(make_case(specs, num_heads, head_dim, block_size, dtype, seed), DEVICE)
    k_scale, v_scale = (torch.tensor(s, device=DEVICE) for s in scales)
    cache = _fp8_cache(case, *scales)
    ref_cache = cache.clone()
    scale = head_dim**-0.5
    ref = TorchRefAttention(num_heads, head_dim, scale, NUM_KV_HEADS, sliding_window, **options)
    expected = ref.forward(
        case.query.float(), case.key, case.value, ref_cache, case.metadata,
        k_scale=k_scale, v_scale=v_scale,
    )  # fmt: skip
    impl = TritonAttention(num_heads, head_dim, scale, NUM_KV_HEADS, sliding_window, **options)
    impl.num_kv_splits = num_kv_splits
    impl.use_decode_launch = use_decode_launch
    out = impl.forward(
        case.query, case.key, case.value, cache, case.metadata, k_scale=k_scale, v_scale=v_scale
    )
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    atol, rtol = HALF_TOL.get(dtype, (FP32_ATOL, 0.0))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


def test_triton_cache_write_matches_torch() -> None:
    case = to_device(make_case(SMALL_MIXED, 4, 48, 16, torch.bfloat16, seed=5), DEVICE)
    k_scale, v_scale = torch.tensor(0.011, device=DEVICE), torch.tensor(2.5, device=DEVICE)
    cache = torch.zeros(case.kv_cache.shape, dtype=FP8, device=DEVICE)
    expected = cache.clone()
    # Values past E4M3's range at these scales: both saturate.
    key, value = case.key * 8, case.value * 300
    md = case.metadata
    kernels.reshape_and_cache(key, value, cache, md.slot_mapping, len(key), k_scale, v_scale)
    write_to_kv_cache(key, value, expected, md.slot_mapping, k_scale, v_scale)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))
    assert cache.float().abs().max() == 448.0


@pytest.mark.parametrize(
    ("dtype", "head_dim", "gqa", "block_size", "window"),
    [
        (torch.float32, 64, 2, 16, None),
        (torch.float32, 32, 4, 32, 29),
        (torch.bfloat16, 64, 1, 16, 29),
        (torch.float16, 64, 8, 32, None),
    ],
)
def test_triton_mixed_batch_fp8(
    dtype: torch.dtype, head_dim: int, gqa: int, block_size: int, window: int | None
) -> None:
    check_triton(SMALL_MIXED, NUM_KV_HEADS * gqa, head_dim, block_size, dtype, window, seed=7)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_triton_decode_splits_fp8(num_kv_splits: int) -> None:
    """Flash-decoding: `v_scale` goes into each split's partial, then the reduction."""
    specs = [(c, 1) for c in (200, 0, 77, 130)]
    check_triton(specs, 8, 64, 16, num_kv_splits=num_kv_splits, seed=8, scales=(0.2, 0.007))


def test_triton_varlen_only_fp8() -> None:
    check_triton(SMALL_MIXED, 4, 64, 16, use_decode_launch=False, seed=9)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("num_kv_splits", [1, 2])
def test_triton_soft_cap_and_sinks_fp8(num_kv_splits: int) -> None:
    """The softmax options with an FP8 cache: `k_scale` before the cap's tanh, the sink apart
    from `v_scale` (a mixed batch; and a pure-decode one in splits, the sink added once in the
    reduction)."""
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    specs = SMALL_MIXED if num_kv_splits == 1 else [(c, 1) for c in (90, 0, 41, 130)]
    check_triton(specs, 4, 64, 16, sliding_window=29, num_kv_splits=num_kv_splits, seed=10,
                 logits_soft_cap=5.0, sinks=sinks)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_prologue_writes_fp8(qk_norm: bool, dtype: torch.dtype) -> None:
    """`rope_norm_and_cache_` into an FP8 cache against the eager norm and rotary and the torch
    write: V byte for byte; K too under the interpreter without the q/k norm, else (the norm's
    fp32 `rstd` may differ in its last bit, a compiled kernel may keep fewer casts: see
    tests/layers/test_prologue.py) at most one E4M3 step apart."""
    from pagedllm.layers import fused_kernels
    from pagedllm.layers.layernorm import RMSNorm
    from pagedllm.layers.rotary import get_rope

    gen = torch.Generator().manual_seed(31 + qk_norm)
    heads, kv_heads, head_dim, tokens = 8, 2, 64, 9
    rotary = get_rope(head_dim, 4096, {"rope_type": "default", "rope_theta": 1e6})
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = (2 * torch.randn(tokens, q_size + 2 * kv_size, generator=gen)).to(dtype)
    positions = torch.randint(0, 4096, (tokens,), generator=gen)
    slots = torch.randperm(4 * 16, generator=gen)[:tokens]
    k_norm = RMSNorm(head_dim, 1e-6)
    k_norm.weight.data = (1 + 0.2 * torch.randn(head_dim, generator=gen)).to(dtype)
    k_scale, v_scale = torch.tensor(0.013), torch.tensor(0.004)
    _, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    ref_k = k_norm(k.reshape(tokens, kv_heads, head_dim)).flatten(1) if qk_norm else k
    _, ref_k = rotary(positions, qkv[:, :q_size].clone(), ref_k.clone())
    expected = torch.zeros(2, 4, 16, kv_heads, head_dim, dtype=FP8)
    write_to_kv_cache(ref_k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim),
                      expected, slots, k_scale, v_scale)  # fmt: skip
    dev = [t.to(DEVICE) for t in (qkv, positions, rotary.cos_cache, rotary.sin_cache, slots)]
    cache = torch.zeros(expected.shape, dtype=FP8, device=DEVICE)
    dq, dk, dv = dev[0].split([q_size, kv_size, kv_size], dim=-1)
    weight = k_norm.weight.data.to(DEVICE) if qk_norm else None
    fused_kernels.rope_norm_and_cache_(
        dev[1], dq, dk, dv, dev[2], dev[3], cache, dev[4], tokens,
        q_norm_weight=weight, k_norm_weight=weight, eps=1e-6,
        k_scale=k_scale.to(DEVICE), v_scale=v_scale.to(DEVICE),
    )  # fmt: skip
    cache = cache.cpu()
    assert torch.equal(cache[1].view(torch.uint8), expected[1].view(torch.uint8))
    if DEVICE == "cpu" and not qk_norm:
        assert torch.equal(cache[0].view(torch.uint8), expected[0].view(torch.uint8))
    got, want = cache[0].double(), expected[0].double()
    step = torch.exp2(torch.floor(torch.log2(want.abs().clamp(min=2.0**-6))) - 3)
    assert ((got - want).abs() <= step).all()


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("sliding_window", [None, 1000])
@pytest.mark.parametrize("num_kv_splits", [1, None])
@pytest.mark.parametrize(("head_dim", "gqa"), [(64, 4), (128, 2), (128, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fp8_serving_shapes(
    dtype: torch.dtype, head_dim: int, gqa: int, num_kv_splits: int | None, sliding_window
) -> None:
    gen = torch.Generator().manual_seed(head_dim + gqa)
    decodes = [(int(c), 1) for c in torch.randint(0, 4096, (96,), generator=gen)]
    specs = [(0, 1000), (3000, 512), *decodes[:48], (8000, 190), *decodes[48:], (8191, 1)]
    check_triton(
        specs, NUM_KV_HEADS * gqa, head_dim, 16, dtype, sliding_window, seed=gqa,
        scales=(0.04, 0.02),
    )  # fmt: skip
    pure_decode = [(8191, 1), *decodes[:63]]
    check_triton(pure_decode, NUM_KV_HEADS * gqa, head_dim, 16, dtype, num_kv_splits=num_kv_splits)
