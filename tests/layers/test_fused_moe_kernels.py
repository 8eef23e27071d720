"""The fused-MoE Triton kernels (pagedllm/layers/fused_moe/kernels.py) against the torch
reference `FusedMoE.forward_torch`, their token alignment, launch configs and dispatch.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (set before triton is
imported; tests/triton_interpreter.py fixes its scalar loop bounds, bf16 `tl.dot` and bf16
rounding), at tiny odd shapes: H and I not multiples of any block, several row blocks per
expert, experts without tokens, top-k 1 to 3. fp32 agrees to the fp32 summation order (1e-5).
bf16 rounds where the reference rounds (each projection, SiLU, the product) but the weighted
slot rows are rounded to bf16 before their sum, and a different fp32 order inside a GEMM can
flip one rounding of gate / up, so a result may differ by about two bf16 steps of the largest
output (`BF16_TOL`, relative to max |out|). `gpu`-marked tests: serving shapes, a CUDA graph.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.triton_interpreter import kernel_test_device

DEVICE = kernel_test_device()  # NOTE: before triton is first imported

from pagedllm.benchmarks import moe as moe_bench  # noqa: E402
from pagedllm.layers.fused_moe import FusedMoE  # noqa: E402
from pagedllm.layers.fused_moe import kernels as K  # noqa: E402
from tests.triton_interpreter import one_thread, patch_interpreter  # noqa: E402, F401

if DEVICE == "cpu":
    patch_interpreter()

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BF16_TOL = 2**-7  # one to two bf16 rounding steps, relative to the largest |output|
SMALL = K.MoEConfig(16, K.GemmConfig(16, 16), K.GemmConfig(32, 16))  # many blocks, K tails


def _moe(E, H, I, k, dtype, seed, **options) -> FusedMoE:  # noqa: E741
    """A layer with random weights scaled for O(1) outputs (biases O(1) too), on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    moe = FusedMoE(E, k, H, I, params_dtype=torch.float32, **options)
    for p in moe.parameters():
        scale = p.shape[-1] ** -0.5 if p.dim() == 3 else 0.5
        p.data = torch.randn(p.shape, generator=gen) * scale
    return moe.to(device=DEVICE, dtype=dtype)


def _inputs(T, H, E, dtype, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, H, generator=gen).to(dtype).to(DEVICE)
    logits = torch.randn(T, E, generator=gen).to(DEVICE)
    return x, logits


def _check(moe: FusedMoE, x: torch.Tensor, logits: torch.Tensor, config=None) -> None:
    weights, ids = moe.route(logits)
    expected = moe.forward_torch(x, weights, ids)
    if config is None:  # the layer's dispatch, the default config
        got = moe(x, logits, use_kernel=True)
    else:
        got = _fused(moe, x, weights, ids, config)
    assert got.dtype == x.dtype and got.shape == x.shape
    if x.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:
        scale = expected.float().abs().max().item()
        torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=BF16_TOL * scale)


def _fused(moe, x, weights, ids, config):
    return K.fused_moe(
        x, moe.w13_weight, moe.w2_weight, weights, ids, w13_bias=moe.w13_bias,
        w2_bias=moe.w2_bias, activation=moe.activation, alpha=moe.swiglu_alpha,
        limit=moe.swiglu_limit, config=config,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Alignment
# ----------------------------------------------------------------------------------------------


def _check_aligned(a: K.AlignedTokens, ids: torch.Tensor, num_experts: int) -> None:
    """Every slot once; each block one expert's slots, in slot order; each expert's run its
    count padded up to whole blocks; the padding is the id `T k`; nothing past `total`."""
    flat = ids.reshape(-1).cpu()
    num_slots, bm = flat.numel(), a.block_m
    sorted_ids, block_expert = a.sorted_ids.cpu().long(), a.block_expert.cpu().long()
    total = int(a.total.item())
    counts = torch.bincount(flat, minlength=num_experts)
    assert total == int(((counts + bm - 1) // bm * bm).sum())
    assert sorted_ids.numel() == K.max_padded(num_slots, num_experts, bm) >= total
    assert a.num_blocks * bm == sorted_ids.numel()
    assert (sorted_ids[total:] == num_slots).all()
    real = sorted_ids[:total][sorted_ids[:total] < num_slots]
    assert torch.equal(real.sort().values, torch.arange(num_slots))
    assert ((block_expert >= 0) & (block_expert < num_experts)).all()
    for e in range(num_experts):
        blocks = (block_expert[: total // bm] == e).nonzero().flatten()
        assert blocks.numel() == -(-int(counts[e]) // bm)
        if blocks.numel():  # contiguous blocks, holding exactly e's slots in order
            assert torch.equal(blocks, torch.arange(int(blocks[0]), int(blocks[0]) + len(blocks)))
            rows = sorted_ids[int(blocks[0]) * bm : (int(blocks[-1]) + 1) * bm]
            assert torch.equal(rows[rows < num_slots], (flat == e).nonzero().flatten())


@pytest.mark.parametrize(
    ("num_tokens", "top_k", "num_experts", "block_m"),
    [
        (1, 1, 4, 16),
        (1, 3, 8, 16),
        (37, 2, 6, 16),
        (70, 3, 8, 32),
        (5, 2, 128, 16),
        (300, 4, 5, 64),
    ],
)
def test_align_tokens_invariants(num_tokens, top_k, num_experts, block_m) -> None:
    """The one-program kernel (all slots in one chunk), the three-launch path (chunks of 16:
    several, the last partial) and the torch oracle: the invariants, and all three equal;
    routes that leave experts empty and fill one past several blocks."""
    gen = torch.Generator().manual_seed(num_tokens * top_k + num_experts)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    logits[:, 0] += 2.0  # expert 0 takes most tokens, so several blocks
    ids = torch.topk(logits, top_k, dim=-1).indices.to(DEVICE)
    one = K.align_tokens(ids, num_experts, block_m, chunk=1024)
    chunked = K.align_tokens(ids, num_experts, block_m, chunk=16)
    oracle = K.align_tokens_torch(ids, num_experts, block_m)
    for a in (one, chunked, oracle):
        _check_aligned(a, ids, num_experts)
    for field in ("sorted_ids", "block_expert", "total"):
        assert torch.equal(getattr(one, field), getattr(oracle, field)), field
        assert torch.equal(getattr(chunked, field), getattr(oracle, field)), field


def test_align_tokens_default_chunks() -> None:
    """The default chunking (three launches here: 1206 slots, chunks of 1024 for 8 experts);
    int32 ids work too."""
    ids = torch.randint(0, 7, (603, 2), dtype=torch.int32).to(DEVICE)
    _check_aligned(K.align_tokens(ids, 7, 16), ids.long(), 7)


# ----------------------------------------------------------------------------------------------
# The kernels vs forward_torch (interpreter-sized)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("E", "H", "I", "k", "T", "config"),
    [
        (4, 40, 24, 1, 1, None),  # one token, top-1 (no slot sum), the layer's dispatch
        (8, 72, 40, 3, 70, SMALL),  # several blocks per expert, tails in N and K
        (6, 33, 20, 2, 17, None),  # the default config: one K step, masked
        (5, 48, 32, 2, 9, SMALL),  # H and I multiples of BLOCK_K (EVEN_K)
    ],
)
def test_fused_moe_fp32(E, H, I, k, T, config) -> None:  # noqa: E741
    moe = _moe(E, H, I, k, torch.float32, seed=E + H + T)
    _check(moe, *_inputs(T, H, E, torch.float32, seed=T), config=config)


def test_fused_moe_strided_hidden_states() -> None:
    """A column slice of a wider tensor (rows strided) reads as its copy does."""
    moe = _moe(4, 36, 20, 2, torch.float32, seed=3)
    wide, logits = _inputs(11, 50, 4, torch.float32, seed=4)
    _check(moe, wide[:, 7:43], logits, config=SMALL)


@pytest.mark.parametrize("activation", ["silu", "swigluoai"])
def test_fused_moe_bf16(activation: str) -> None:
    """bf16 within `BF16_TOL`; swigluoai with a small limit so that the clamps bite."""
    options = {"activation": activation, "swiglu_limit": 0.75} if activation != "silu" else {}
    moe = _moe(6, 40, 24, 2, torch.bfloat16, seed=11, **options)
    _check(moe, *_inputs(23, 40, 6, torch.bfloat16, seed=12), config=SMALL)


def test_fused_moe_gpt_oss_options_fp32() -> None:
    """Biases, swigluoai with its clamps active, top-k-then-softmax routing, top-k 3."""
    moe = _moe(5, 44, 28, 3, torch.float32, seed=21, bias=True, activation="swigluoai",
               swiglu_alpha=1.3, swiglu_limit=0.8, routing="topk_softmax")  # fmt: skip
    x, logits = _inputs(19, 44, 5, torch.float32, seed=22)
    gate_up = torch.einsum("th,enh->etn", x, moe.w13_weight) + moe.w13_bias[:, None]
    assert (gate_up[..., :28] > 0.8).any() and (gate_up[..., 28:] < -0.8).any(), "clamps bite"
    _check(moe, x, logits, config=SMALL)


def test_fused_moe_float16_and_no_tokens() -> None:
    moe = _moe(4, 40, 24, 2, torch.float16, seed=31)
    _check(moe, *_inputs(6, 40, 4, torch.float16, seed=32), config=SMALL)
    x, logits = _inputs(0, 40, 4, torch.float16, seed=33)
    assert moe(x, logits, use_kernel=True).shape == (0, 40)


# ----------------------------------------------------------------------------------------------
# Dispatch and configs
# ----------------------------------------------------------------------------------------------


def test_forward_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """use_kernel=True runs the kernels, False the reference, None the kernels on CUDA only."""
    moe = _moe(4, 16, 8, 2, torch.float32, seed=41)
    x, logits = _inputs(3, 16, 4, torch.float32, seed=42)
    calls = []
    monkeypatch.setattr(K, "forward_layer", lambda *a: calls.append(a) or a[1])
    moe(x, logits, use_kernel=True)
    moe(x, logits, use_kernel=False)
    assert len(calls) == 1
    moe(x, logits)
    assert len(calls) == (2 if DEVICE == "cuda" else 1)
    monkeypatch.setattr(K, "supports", lambda layer: False)
    weights, ids = moe.route(logits)
    assert torch.equal(moe(x, logits, use_kernel=True), moe.forward_torch(x, weights, ids))


def test_config_table_lookup(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The table's nearest swept token count (log scale, ties to the smaller); the default
    heuristic without a table; the JSON round trip the sweep writes."""
    from pagedllm.layers.fused_moe import tuning

    a = K.MoEConfig(16, K.GemmConfig(32, 128, 1, 4, 4), K.GemmConfig(64, 64, 1, 4, 3))
    b = K.MoEConfig(64, K.GemmConfig(128, 64, 16, 8, 3), K.GemmConfig(256, 64, 1, 8, 4))
    name = K.config_file_name(8, 24, 40, torch.bfloat16, "Some_GPU")
    assert name == "E8-I24-H40-bfloat16-Some_GPU.json"
    moe_bench.write_table(tmp_path / name, {1: a, 64: b}, top_k=2)
    monkeypatch.setattr(tuning, "configs_dir", lambda: tmp_path)
    K.load_table.cache_clear()
    try:
        get = lambda t: K.get_config(t, 8, 24, 40, torch.bfloat16, "Some_GPU")  # noqa: E731
        assert [get(t) for t in (1, 7, 8, 9, 64, 4096)] == [a, a, a, b, b, b]
        other = K.get_config(8, 8, 24, 40, torch.bfloat16, "Other_GPU")
        assert other == K.default_config(8, 8, 24, 40, torch.bfloat16)
    finally:
        K.load_table.cache_clear()


def test_shipped_tables_parse() -> None:
    """Every table in the package's configs/ is named as `config_file_name` names them and
    holds valid configs (power-of-two tiles, BLOCK_M >= 16 for tl.dot)."""
    for path in K.configs_dir().iterdir():
        if not path.name.endswith(".json"):
            continue
        parts = path.name.removesuffix(".json").split("-", 4)
        assert [p[0] for p in parts[:3]] == ["E", "I", "H"] and parts[3] in moe_bench.DTYPES
        for key, entry in json.loads(path.read_text()).items():
            if key.startswith("_"):
                continue
            cfg = K.MoEConfig.from_json(entry)
            for size in (cfg.block_m, *cfg.w13[:2], *cfg.w2[:2]):
                assert size >= 16 and size & (size - 1) == 0, (path.name, key)


def test_default_config_grows_blocks_with_tokens() -> None:
    sizes = [K.default_config(t, 64, 768, 2048, torch.bfloat16).block_m for t in (1, 64, 256, 4096)]
    assert sizes == sorted(sizes) and sizes[0] == 16 and sizes[-1] >= 64


@pytest.mark.slow
def test_bench_sweep_writes_a_table_get_config_reads(tmp_path, monkeypatch) -> None:
    """`pagedllm bench moe --tiny --sweep` (interpreter-sized) writes the JSON that
    `get_config` then reads for that shape."""
    from pagedllm.entrypoints import cli

    out = tmp_path / "table.json"
    argv = ["bench", "moe", "--tiny", "--sweep", "--tokens", "3", "--output", str(out)]
    if DEVICE == "cpu":
        argv += ["--device", "cpu"]
    assert cli.main(argv) == 0
    raw = json.loads(out.read_text())
    assert raw["_swept_top_k"] == 2 and set(raw) == {"_swept_top_k", "3"}
    K.MoEConfig.from_json(raw["3"])


# ----------------------------------------------------------------------------------------------
# Serving shapes: GPU only
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 600, 2048])
@pytest.mark.parametrize(
    ("E", "H", "I", "k", "options"),
    [
        (128, 2048, 768, 8, {}),  # Qwen3-30B-A3B
        (8, 4096, 14336, 2, {}),  # Mixtral 8x7B
        (32, 2880, 2880, 4, {"bias": True, "activation": "swigluoai", "routing": "topk_softmax"}),
    ],
)
def test_gpu_serving_shapes_bf16(E, H, I, k, options, num_tokens) -> None:  # noqa: E741
    moe = _moe(E, H, I, k, torch.bfloat16, seed=E + num_tokens, **options)
    _check(moe, *_inputs(num_tokens, H, E, torch.bfloat16, seed=num_tokens))


@pytest.mark.gpu
@gpu
def test_gpu_fp32_and_cuda_graph() -> None:
    """fp32 (ieee dots, not tf32) at a real shape; a captured call replays to the eager result
    with new inputs copied into its buffers (no host sync in the path)."""
    moe = _moe(64, 1024, 384, 6, torch.float32, seed=51)
    _check(moe, *_inputs(300, 1024, 64, torch.float32, seed=52))
    moe = _moe(64, 1024, 384, 6, torch.bfloat16, seed=53)
    x, logits = _inputs(40, 1024, 64, torch.bfloat16, seed=54)
    static_x, static_logits = x.clone(), logits.clone()
    moe(static_x, static_logits)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = moe(static_x, static_logits)
    x2, logits2 = _inputs(40, 1024, 64, torch.bfloat16, seed=55)
    static_x.copy_(x2)
    static_logits.copy_(logits2)
    graph.replay()
    torch.testing.assert_close(static_out, moe(x2, logits2), rtol=0, atol=0)
