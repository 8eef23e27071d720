"""The quantization kernels (pagedllm/layers/quantization/kernels/) against the torch path of the
methods (the oracle), and dummy quantized checkpoints end to end.

Without a GPU the Triton kernels run under Triton's interpreter (tests/triton_interpreter.py also
fixes its e4m3 casts and e4m3 `tl.dot`), at small odd shapes; `torch._scaled_mm` runs on the CPU
too. `gpu`-marked tests: llama3-8b shapes (4096 -> 6144 / 28672, 14336 -> 4096) on CUDA.

- Activation quantization (per token, static, per 1 x 128 group): `q` and its scales are
  bit-identical to the reference's (`fp8.fake_quant_*`, rewritten here as a plain formula); fused
  with SiLU-and-mul within one e4m3 step (the SiLU's exp may round its bf16 input differently).
- GEMMs against a reference written here from the unpacked integers / e4m3 values and scales:
  fp32 within 1e-5 of the largest output (the order of the sums); bf16 within `BF16_TOL` of it
  (the kernels round the same bf16 weight, sum in fp32 in another order, and round once; split-K
  adds partial sums). On the GPU the FP8 tensor cores accumulate a K block in reduced precision:
  `FP8_GPU_TOL`.
- Each method's layer (dummy weights, `loader/dummy.py`) on the kernel path against the same
  weights on its torch path, and dummy checkpoints of the packaged quantized configs through `LLM`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.triton_interpreter import kernel_test_device

DEVICE = kernel_test_device()  # NOTE: before triton is first imported

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.layers.linear import (  # noqa: E402
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedllm.layers.quantization import fp8, kernels  # noqa: E402
from pagedllm.layers.quantization.awq import AWQConfig  # noqa: E402
from pagedllm.layers.quantization.compressed_tensors import CompressedTensorsConfig  # noqa: E402
from pagedllm.layers.quantization.gptq import GPTQConfig  # noqa: E402
from pagedllm.layers.quantization.kernels import fp8_gemm, fp8_quant, w4a16  # noqa: E402
from pagedllm.layers.quantization.packed import (  # noqa: E402
    CHANNEL_GROUP,
    pack_int_weights,
    unpack_int32,
)
from pagedllm.loader.dummy import load_dummy_weights  # noqa: E402
from tests.triton_interpreter import one_thread, patch_interpreter  # noqa: E402, F401

if DEVICE == "cpu":
    patch_interpreter()

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FP8 = torch.float8_e4m3fn
BF16_TOL = 2**-7  # one to two bf16 rounding steps, relative to the largest |output|
# NOTE: an activation that rounds the other way at a tie on the GPU (its division against the
# reference's) moves an output by one E4M3 step of that activation times its weights: seen at
# 1.01x of 2^-7 on one element of 25M at M = 4096 on an H200.
FP8_GPU_TOL = 2**-6
CONFIGS = Path(__file__).resolve().parents[2] / "pagedllm" / "configs"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=tol * scale)


def _tol(dtype: torch.dtype, fp8: bool = False) -> float:
    if fp8 and DEVICE == "cuda":
        return FP8_GPU_TOL  # NOTE: the FP8 tensor cores' reduced-precision accumulation
    return 1e-5 if dtype == torch.float32 else BF16_TOL


# --- activation quantization -------------------------------------------------------------------


def ref_scale(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x.abs().amax(-1, keepdim=True) / 448.0, min=1.0 / (448.0 * 512.0))


def ref_q(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x / scale, -448.0, 448.0).to(FP8)


def test_min_scale_matches_the_torch_path() -> None:
    assert fp8_quant.MIN_SCALE == fp8.MIN_SCALE and fp8_quant.FP8_MAX == fp8.FP8_MAX


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 77, 2500])
def test_quant_per_token_is_exact(dtype: torch.dtype, k: int) -> None:
    x = (torch.randn(5, k, generator=_gen(k)) * 3).to(dtype)
    x[1] = 0  # an all-zero token: the smallest scale, zeros
    x[2, 0] = 1000.0  # an outlier
    x = x.to(DEVICE)
    q, scale = fp8_quant.quant_per_token(x)
    x32 = x.float().cpu()
    assert torch.equal(scale.cpu(), ref_scale(x32))
    assert torch.equal(q.cpu().view(torch.uint8), ref_q(x32, ref_scale(x32)).view(torch.uint8))


def test_quant_per_token_static_is_exact() -> None:
    x = (torch.randn(3, 4, 40, generator=_gen(1)) * 4).to(torch.bfloat16).to(DEVICE)
    s = torch.tensor([0.01], device=DEVICE)
    q, scale = fp8_quant.quant_per_token(x, s)  # saturates: |x| / 0.01 > 448
    assert q.shape == (12, 40) and float(scale) == pytest.approx(0.01)
    ref = ref_q(x.float().cpu().reshape(12, 40), s.cpu())
    assert torch.equal(q.cpu().view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("k", [128, 300])
def test_quant_per_group_is_exact(k: int) -> None:
    x = (torch.randn(4, k, generator=_gen(k)) * 2).to(torch.bfloat16)
    x[0, :128] = 0
    q, scale = fp8_quant.quant_per_group(x.to(DEVICE), 128)
    groups = -(-k // 128)
    assert scale.shape == (4, groups)
    for g in range(groups):
        part = x.float()[:, g * 128 : (g + 1) * 128]
        assert torch.equal(scale.cpu()[:, g : g + 1], ref_scale(part))
        ref = ref_q(part, ref_scale(part)).view(torch.uint8)
        assert torch.equal(q.cpu()[:, g * 128 : (g + 1) * 128].view(torch.uint8), ref)


@pytest.mark.parametrize("group", [None, 64])
def test_quant_fused_silu_mul(group: int | None) -> None:
    d = 192
    gate_up = (torch.randn(3, 2 * d, generator=_gen(5)) * 3).to(torch.bfloat16)
    act = (torch.nn.functional.silu(gate_up[:, :d]) * gate_up[:, d:]).float()
    if group is None:
        q, scale = fp8_quant.quant_per_token(gate_up.to(DEVICE), silu_mul=True)
        ref = fp8.fake_quant_per_token(act, "fp8")
        scale_cols = scale.cpu()
    else:
        q, scale = fp8_quant.quant_per_group(gate_up.to(DEVICE), group, silu_mul=True)
        ref = fp8.fake_quant_per_group(act, group)
        scale_cols = scale.cpu().repeat_interleave(group, 1)
    got = q.cpu().float() * scale_cols
    # NOTE: one e4m3 step: 2^-3 of a normal value, 2^-9 * scale in the subnormals.
    torch.testing.assert_close(got, ref, rtol=2**-3, atol=float(scale.max()) * 2**-9)


# --- FP8 GEMMs ---------------------------------------------------------------------------------


def _fp8_weight(n: int, k: int, seed: int) -> torch.Tensor:
    return (torch.randn(n, k, generator=_gen(seed)) * 100).clamp(-448, 448).to(FP8)


@pytest.mark.parametrize(
    "per_token, per_channel, dtype",
    [
        (False, False, torch.bfloat16),
        (True, True, torch.bfloat16),
        (True, False, torch.bfloat16),
        (True, True, torch.float32),
        (False, True, torch.float16),
    ],
)
def test_scaled_mm(per_token: bool, per_channel: bool, dtype: torch.dtype) -> None:
    m, n, k = 7, 48, 80
    x = torch.randn(m, k, generator=_gen(2)).to(dtype)
    w = _fp8_weight(n, k, 3)
    sb = torch.rand(1, n, generator=_gen(4)) * 1e-2 + 1e-3
    sb = sb if per_channel else sb[:, :1]
    if per_token:
        q, sa = fp8_quant.quant_per_token(x.to(DEVICE))
    else:
        sa = torch.tensor([0.01])
        q, sa = fp8_quant.quant_per_token(x.to(DEVICE), sa.to(DEVICE))
    bias = torch.randn(n, generator=_gen(5)).to(dtype)
    y = fp8_gemm.scaled_mm(q, sa, w.to(DEVICE), sb.to(DEVICE), dtype, bias.to(DEVICE))
    ref = (q.cpu().float() * sa.cpu().reshape(-1, 1)) @ (w.float() * sb.reshape(-1, 1)).t()
    assert y.dtype == dtype
    _close(y.cpu(), ref + bias.float(), 2 * _tol(dtype, fp8=True))


def _block_ref(x, w, ws, bn, bk):
    n, k = w.shape
    wd = w.float() * ws.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return fp8.fake_quant_per_group(x.float(), bk) @ wd.t()


@pytest.mark.parametrize("m", [1, 19, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_scaled_mm(m: int, dtype: torch.dtype) -> None:
    n, k, bn, bk = 200, 300, 128, 128  # partial blocks on both sides
    x = torch.randn(m, k, generator=_gen(m)).to(dtype)
    w = _fp8_weight(n, k, 7)
    ws = torch.rand(2, 3, generator=_gen(8)) * 1e-2
    bias = torch.randn(n, generator=_gen(9)).to(dtype)
    q, s = fp8_quant.quant_per_group(x.to(DEVICE), bk)
    y = fp8_gemm.block_scaled_mm(
        q, s, w.to(DEVICE), ws.to(DEVICE), (bn, bk), dtype, bias.to(DEVICE)
    )
    _close(y.cpu(), _block_ref(x, w, ws, bn, bk) + bias.float(), _tol(dtype, fp8=True))


# --- the integer weight-only GEMM ----------------------------------------------------------------


def _int_case(n: int, k: int, bits: int, group: int, asym: bool, seed: int, device: str = "cpu"):
    """Random unsigned `q [K, N]`, scales and zeros; the kernel layout and the `[N, K]` float32
    reference weight, dequantized here (on `device`) independently of the kernels' code."""
    gen = _gen(seed)
    q = torch.randint(0, 1 << bits, (k, n), generator=gen, dtype=torch.uint8).to(device)
    groups = 1 if group == -1 else -(-k // group)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 1e-3).to(device)
    zeros = None
    if asym:
        zeros = torch.randint(0, 1 << bits, (groups, n), generator=gen, dtype=torch.uint8)
        zeros = zeros.to(device)
    g = torch.arange(k, device=device) // (k if group == -1 else group)
    z = zeros[g].float() if zeros is not None else float(1 << (bits - 1))
    ref_w = ((q.float() - z) * scales[g]).t()
    packed = pack_int_weights(q, scales, zeros, bits, CHANNEL_GROUP if group == -1 else group)
    return packed, ref_w


def test_pack_int_weights_round_trips() -> None:
    for bits in (4, 8):
        q = torch.randint(0, 1 << bits, (64, 24), generator=_gen(bits))
        packed = pack_int_weights(q, torch.ones(1, 24), None, bits, CHANNEL_GROUP)
        assert packed.qweight.dtype == torch.int32 and packed.qweight.shape == (64 * bits // 32, 24)
        assert torch.equal(unpack_int32(packed.qweight, bits, dim=0), q)


@pytest.mark.parametrize(
    "bits, group, asym, m, dtype",
    [
        (4, 128, False, 1, torch.bfloat16),  # GEMV, split-K
        (4, 32, True, 5, torch.float32),
        (4, -1, False, 3, torch.float16),
        (8, 64, True, 1, torch.float32),
        (4, 64, True, 40, torch.bfloat16),  # tiled
        (8, -1, False, 70, torch.float32),
    ],
)
def test_int_gemm(bits: int, group: int, asym: bool, m: int, dtype: torch.dtype) -> None:
    n, k = 72, 320  # N not a multiple of the tile, K a partial last group of 128
    packed, ref_w = _int_case(n, k, bits, group, asym, seed=bits + m)
    packed = _to_device(packed)
    x = torch.randn(m, k, generator=_gen(m)).to(dtype)
    bias = torch.randn(n, generator=_gen(n)).to(dtype) if m % 2 else None
    ref = x.float() @ ref_w.to(dtype).float().t()
    ref = ref if bias is None else ref + bias.float()
    default = w4a16.default_config(m, n, k, packed.group_size)
    bk = min(128, packed.group_size)
    configs = [
        None,  # the default
        w4a16.IntGemmConfig(16, 32, bk, split_k=3, split_dot=bk * bits >= 512),
        w4a16.IntGemmConfig(32, 64, min(64, bk), split_k=1, split_dot=False),
    ]
    for cfg in configs:
        y = w4a16.int_gemm(x.to(DEVICE), packed, None if bias is None else bias.to(DEVICE), cfg)
        assert y.dtype == dtype and y.shape == (m, n)
        _close(y.cpu(), ref, _tol(dtype))
    assert default.split_k > 1 or m > w4a16.GEMV_MAX_M


def _to_device(packed: Any) -> Any:
    from dataclasses import replace

    zeros = None if packed.zeros is None else packed.zeros.to(DEVICE)
    return replace(
        packed, qweight=packed.qweight.to(DEVICE), scales=packed.scales.to(DEVICE), zeros=zeros
    )


# --- every method's layer: the kernel path against the torch path --------------------------------


def _ct(weights: dict, acts: dict | None = None, fmt: str = "pack-quantized") -> Any:
    group = {"targets": ["Linear"], "weights": weights, "input_activations": acts, "format": fmt}
    return CompressedTensorsConfig.from_config(
        {"quant_method": "compressed-tensors", "config_groups": {"g": group}, "format": fmt}
    )


def _w(**kw: Any) -> dict:
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", **kw}


TOKEN_FP8 = _w(type="float", strategy="token", dynamic=True)
METHODS = {
    "ct-w4a16-g128": (_ct(_w(num_bits=4, strategy="group", group_size=128)), "int"),
    "ct-w4a16-asym-g32": (
        _ct(_w(num_bits=4, strategy="group", group_size=32, symmetric=False)),
        "int",
    ),
    "ct-w8a16-channel": (_ct(_w(strategy="channel")), "int"),
    "gptq-4bit-g32": (GPTQConfig(bits=4, group_size=32, sym=False), "int"),
    "gptq-8bit-channel": (GPTQConfig(bits=8, group_size=-1), "int"),
    "awq-g32": (AWQConfig(group_size=32), "int"),
    "ct-fp8-channel-token": (
        _ct(_w(type="float", strategy="channel"), TOKEN_FP8, "float-quantized"),
        "scaled_mm",
    ),
    "ct-fp8-tensor-static": (
        _ct(_w(type="float"), _w(type="float"), "float-quantized"),
        "scaled_mm",
    ),
    "fp8-tensor-token": (fp8.Fp8Config(is_checkpoint_fp8_serialized=True), "scaled_mm"),
    "fp8-block": (
        fp8.Fp8Config(is_checkpoint_fp8_serialized=True, weight_block_size=[32, 32]),
        "block",
    ),
    "fp8-online-channel": (fp8.Fp8Config(weight_strategy="channel"), "scaled_mm"),
}


SMALL = (160, 96, 32)  # hidden, intermediate, head_dim (3 heads, 1 KV head)
LLAMA = (4096, 14336, 128)  # 32 heads, 8 KV heads


def _layers(cfg: Any, dtype: torch.dtype, device: str, shape: tuple[int, int, int]) -> list[Any]:
    hidden, inter, head = shape
    heads, kv_heads = hidden // head, max(1, hidden // head // 4)
    kw = dict(params_dtype=dtype, quant_config=cfg)
    with torch.device(device):
        return [
            QKVParallelLinear(
                hidden,
                head,
                heads,
                kv_heads,
                bias=True,
                prefix="model.layers.0.self_attn.qkv_proj",
                **kw,
            ),
            MergedColumnParallelLinear(
                hidden, [inter, inter], prefix="model.layers.0.mlp.gate_up_proj", **kw
            ),
            RowParallelLinear(inter, hidden, prefix="model.layers.0.mlp.down_proj", **kw),
        ]


def _processed_pair(cfg: Any, dtype: torch.dtype, device: str, monkeypatch, seed: int,
                    shape: tuple[int, int, int] = SMALL):  # fmt: skip
    """The same dummy weights processed for the kernels and for the torch path."""
    kernel_layers = _layers(cfg, dtype, device, shape)
    torch_layers = _layers(cfg, dtype, device, shape)
    for i, (a, b) in enumerate(zip(kernel_layers, torch_layers, strict=True)):
        load_dummy_weights(a, SimpleNamespace(seed=seed + i))  # type: ignore[arg-type]
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            pb.data.copy_(pa.data)
    with torch.no_grad():
        monkeypatch.setattr(kernels, "use_kernels", lambda device: True)
        for layer in kernel_layers:
            layer.quant_method.process_weights_after_loading(layer)
        monkeypatch.setattr(kernels, "use_kernels", lambda device: False)
        for layer in torch_layers:
            layer.quant_method.process_weights_after_loading(layer)
    return kernel_layers, torch_layers


def _kernel_of(layer: Any) -> str | None:
    if layer.__dict__.get("int_weights") is not None:
        return "int"
    return layer.__dict__.get("quant_kernel")


def _check_layers(kernel_layers, torch_layers, path: str, m: int, dtype, tol: float,
                  device: str = DEVICE) -> None:  # fmt: skip
    for a, b in zip(kernel_layers, torch_layers, strict=True):
        assert _kernel_of(a) == path and _kernel_of(b) is None, a.prefix
        k = a.input_size_per_partition
        x = torch.randn(m, k, generator=_gen(m + k)).to(dtype).to(device)
        with torch.no_grad():
            _close(a(x).cpu(), b(x).cpu(), tol)
            if isinstance(a, RowParallelLinear):
                gate_up = torch.randn(m, 2 * k, generator=_gen(m)).to(dtype).to(device)
                _close(a.forward_silu_mul(gate_up).cpu(), b.forward_silu_mul(gate_up).cpu(), tol)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_kernel_path_matches_torch_path(name: str, monkeypatch) -> None:
    cfg, path = METHODS[name]
    dtype = torch.bfloat16
    kernel_layers, torch_layers = _processed_pair(cfg, dtype, DEVICE, monkeypatch, seed=3)
    # NOTE: FP8 activations: a bf16 rounding of the input may move one e4m3 step of one element.
    tol = BF16_TOL if path == "int" else 4 * BF16_TOL
    _check_layers(kernel_layers, torch_layers, path, 3, dtype, tol)


def test_unsupported_fall_back_to_the_torch_path(monkeypatch) -> None:
    cases = [
        GPTQConfig(bits=4, group_size=32, desc_act=True),  # act order
        _ct(_w(), _w(strategy="token", dynamic=True), "int-quantized"),  # int8 W8A8
    ]
    for cfg in cases:
        layers, _ = _processed_pair(cfg, torch.bfloat16, DEVICE, monkeypatch, seed=1)
        assert all(_kernel_of(layer) is None for layer in layers)
        assert all(layer.weight.dtype.is_floating_point for layer in layers)


# --- dummy checkpoints of the packaged quantized configs -----------------------------------------

TINY = dict(
    hidden_size=256,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=512,
    max_position_embeddings=256,
)


def _tiny_config(tmp_path: Path, shape: str) -> str:
    config = json.loads((CONFIGS / f"{shape}.json").read_text())
    config.update(TINY)
    path = tmp_path / f"tiny-{shape}.json"
    path.write_text(json.dumps(config))
    return str(path)


def _prompt_logprobs(model: str, dtype: str, path: str | None) -> list[float]:
    """The prompt log-probabilities of a dummy `model`, whose linears take `path` (a kernel,
    None: the torch path)."""
    llm = LLM(
        model,
        load_format="dummy",
        dtype=dtype,
        max_model_len=64,
        kv_cache_memory="16MiB",
        skip_tokenizer_init=True,
        max_num_seqs=2,
    )
    prompt = [(11 * i + 5) % 500 + 3 for i in range(12)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=0)
    (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4
    assert all(0 <= t < TINY["vocab_size"] for t in out.outputs[0].token_ids)
    values = [lp[tok].logprob for lp, tok in zip(out.prompt_logprobs[1:], prompt[1:], strict=True)]
    assert all(v == v and v > -1e4 for v in values)  # finite
    model_ = llm.llm_engine.engine_core.executor.worker.model
    linears = [m for m in model_.modules() if hasattr(m, "quant_method") and m.prefix]
    assert linears and all(_kernel_of(m) == path for m in linears if "lm_head" not in m.prefix)
    return values


@pytest.mark.parametrize("shape", ["llama3-8b-fp8", "llama3-8b-w4a16"])
def test_dummy_quantized_config_generates(shape: str, tmp_path: Path, monkeypatch) -> None:
    """A tiny model with the packaged config's quantization runs end to end on dummy weights,
    on the torch path and (on a GPU, or under the interpreter) on the kernel path, and both give
    the same prompt log-probabilities."""
    model = _tiny_config(tmp_path, shape)
    monkeypatch.setattr(kernels, "use_kernels", lambda device: False)
    reference = _prompt_logprobs(model, "bfloat16", None)
    if DEVICE == "cpu":
        from pagedllm.layers import fused

        monkeypatch.setattr(fused, "enabled", lambda x, switch=None: True)
        monkeypatch.setattr(fused, "gemv_enabled", lambda: False, raising=False)
    monkeypatch.setattr(kernels, "use_kernels", lambda device: True)
    got = _prompt_logprobs(model, "bfloat16", "int" if "w4a16" in shape else "scaled_mm")
    # NOTE: dummy weights give near-uniform logits (log(1/512) = -6.24): a few hundredths.
    torch.testing.assert_close(torch.tensor(got), torch.tensor(reference), rtol=0, atol=0.05)


def test_weight_bytes_of_quantized_configs() -> None:
    """The benchmarks' batch-1 bound reads the quantized layers at their bytes per parameter."""
    from pagedllm.benchmarks.ceilings import model_shape, weight_bytes
    from pagedllm.engine_args import EngineArgs

    def model_config(name: str) -> Any:
        args = EngineArgs(model=name, load_format="dummy", dtype="bfloat16")
        return args.create_engine_config().model_config

    bf16 = model_config("llama3-8b")
    params, head = model_shape(bf16).params_read(1), 4096 * 128256
    assert weight_bytes(bf16) == 2 * params
    assert weight_bytes(model_config("llama3-8b-fp8")) == (params - head) + 2 * head
    w4 = (params - head) * (0.5 + 4 / 128) + 2 * head  # int4 and a float32 scale per 128
    assert weight_bytes(model_config("llama3-8b-w4a16")) == pytest.approx(w4)


def test_bench_quant_gemm_runs(capsys) -> None:
    """`pagedllm bench quant-gemm` (the CPU smoke test of the script; on a GPU, its real
    shapes are the lead's to run)."""
    from pagedllm.entrypoints.cli import build_parser

    device = ["--device", "cpu", "--tiny"] if DEVICE == "cpu" else ["--m", "1", "--shapes", "o"]
    ns = build_parser().parse_args(["bench", "quant-gemm", *device])
    ns.func(ns)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("shape") and len(lines) >= 2


# --- GPU: llama3-8b shapes ------------------------------------------------------------------------

LLAMA3_8B = [(4096, 6144), (4096, 28672), (14336, 4096)]  # (K, N): qkv, gate_up, down


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("k, n", LLAMA3_8B)
@pytest.mark.parametrize("m", [1, 16, 256, 4096])
def test_gpu_int_gemm_llama3_8b(k: int, n: int, m: int) -> None:
    packed, ref_w = _int_case(n, k, 4, 128, False, seed=k + n, device="cuda")
    x = torch.randn(m, k, generator=_gen(m)).to(torch.bfloat16).cuda()
    y = w4a16.int_gemm(x, packed)
    ref = x.float() @ ref_w.to(torch.bfloat16).float().t()
    _close(y, ref, BF16_TOL)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("k, n", LLAMA3_8B)
@pytest.mark.parametrize("m", [1, 16, 256, 4096])
def test_gpu_fp8_gemms_llama3_8b(k: int, n: int, m: int) -> None:
    x = torch.randn(m, k, generator=_gen(m)).to(torch.bfloat16).cuda()
    w = _fp8_weight(n, k, 1).cuda()
    sb = (torch.rand(1, n, generator=_gen(2)) * 1e-2 + 1e-3).cuda()
    q, sa = fp8_quant.quant_per_token(x)
    y = fp8_gemm.scaled_mm(q, sa, w, sb, torch.bfloat16)
    ref = (q.float() * sa) @ (w.float() * sb.reshape(-1, 1)).t()
    _close(y, ref, FP8_GPU_TOL)
    ws = (torch.rand(-(-n // 128), -(-k // 128), generator=_gen(3)) * 1e-2).cuda()
    qg, sg = fp8_quant.quant_per_group(x, 128)
    y = fp8_gemm.block_scaled_mm(qg, sg, w, ws, (128, 128), torch.bfloat16)
    _close(y, _block_ref(x, w, ws, 128, 128), FP8_GPU_TOL)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", sorted(METHODS))
def test_gpu_method_kernel_path_at_llama_width(name: str, monkeypatch) -> None:
    """Every method's qkv / gate_up / down at llama3-8b's sizes on CUDA, decode and prefill."""
    cfg, path = METHODS[name]
    kernel_layers, torch_layers = _processed_pair(
        cfg, torch.bfloat16, "cuda", monkeypatch, 7, LLAMA
    )
    tol = BF16_TOL if path == "int" else 4 * BF16_TOL
    for m in (1, 300):
        _check_layers(kernel_layers, torch_layers, path, m, torch.bfloat16, tol, "cuda")
