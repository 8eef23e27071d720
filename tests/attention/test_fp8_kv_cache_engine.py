"""The FP8 KV cache (`kv_cache_dtype="fp8"`) end to end, the checkpoint's scales, and the
configuration's checks.

Tiny random models (tests/tiny_models.py) on the CPU: the oracle is HF transformers with its
attention's K/V (after rotary) passed through the independent E4M3 rounding of
test_fp8_kv_cache (`fake_quant`): the same math as the engine's FP8 cache, so the prompt
logprobs agree to fp32 noise; against the unquantized cache (fp32 or bf16) they agree to the
stated `FP8_VS_FULL_*` tolerance.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.triton_interpreter import kernel_test_device

DEVICE = kernel_test_device()  # NOTE: before triton is first imported

from pagedllm.attention import fp8_kv  # noqa: E402
from pagedllm.attention.kv_scale_names import check_kv_cache_scheme, kv_scale_target  # noqa: E402
from pagedllm.attention.triton.backend import TritonAttention  # noqa: E402
from pagedllm.config import CacheConfig  # noqa: E402
from pagedllm.engine.kv_cache_spec import KVCacheSpec  # noqa: E402
from tests.attention.test_fp8_kv_cache import FP8, fake_quant  # noqa: E402
from tests.triton_interpreter import patch_interpreter  # noqa: E402

if DEVICE == "cpu":
    patch_interpreter()

# ----------------------------------------------------------------------------------------------
# End to end: tiny random models (tests/tiny_models.py) on the CPU in fp32
# ----------------------------------------------------------------------------------------------

PROMPT_LENS = [3, 40, 100]
# NOTE: measured on these tiny models (a wide init: sharp logits, so small K/V errors show),
# FP8 against the unquantized cache: |delta logprob| per prompt token ~0.1-0.2 on average, up
# to ~1 (fp32 and bf16 models alike). The engine against HF with the same quantized K/V: ~3e-7
# on average, ~3e-6 at most (CPU, fp32 noise). The bounds leave room for FP8 rounding ties that
# fall the other way (an element an E4M3 step off, ~1e-5 of them when the fp32 math differs in
# its last bits: on a GPU) and still sit far below what a wrong scale or rounding gives (~0.1).
FP8_VS_FULL_MEAN, FP8_VS_FULL_MAX = 0.35, 2.0
FP8_VS_HF_FP8_MEAN, FP8_VS_HF_FP8_MAX = 2e-3, 0.1


def _prompts(seed: int) -> list[list[int]]:
    from tests.tiny_models import VOCAB_SIZE

    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in PROMPT_LENS]


def _engine_prompt_logprobs(llm, prompts: list[list[int]]) -> list[np.ndarray]:
    from pagedllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [
        np.array([d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:], strict=True)])
        for o, p in zip(outs, prompts, strict=True)
    ]


def _hf_prompt_logprobs(path: str, prompts, scales: dict[int, tuple[float, float]] | None):
    """HF's prompt logprobs; with `scales` (layer -> (k, v)), every attention's K/V (after
    rotary) replaced by `fake_quant` first."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    from tests.tiny_models import load_hf

    def fp8_attention(module, query, key, value, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
        assert scales is not None
        k_s, v_s = scales[module.layer_idx]
        key, value = fake_quant(key, k_s).float(), fake_quant(value, v_s).float()
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    model = load_hf(Path(path))
    if scales is not None:
        AttentionInterface.register("test_fp8_kv", fp8_attention)
        AttentionMaskInterface.register("test_fp8_kv", sdpa_mask)
        model.set_attn_implementation("test_fp8_kv")
    result = []
    with torch.no_grad():
        for p in prompts:
            logits = model(torch.tensor([p])).logits[0, :-1].double()
            lp = logits.log_softmax(-1).gather(1, torch.tensor(p[1:])[:, None])[:, 0]
            result.append(lp.numpy())
    return result


def _diffs(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float, float]:
    d = np.concatenate([np.abs(x - y) for x, y in zip(a, b, strict=True)])
    return float(d.mean()), float(d.max())


def _llm(path: str, **kw):  # type: ignore[no-untyped-def]
    from pagedllm import LLM

    return LLM(path, **{"dtype": "float32", "max_model_len": 256, "kv_cache_memory": "4MiB", **kw})


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_engine_fp8_prompt_logprobs(arch: str, tiny_model_dirs) -> None:
    path = tiny_model_dirs[arch]
    prompts = _prompts(11)
    fp8 = _engine_prompt_logprobs(_llm(path, kv_cache_dtype="fp8"), prompts)
    full = _engine_prompt_logprobs(_llm(path), prompts)
    num_layers = 2
    hf_fp8 = _hf_prompt_logprobs(path, prompts, {i: (1.0, 1.0) for i in range(num_layers)})
    mean, worst = _diffs(fp8, hf_fp8)
    assert mean < FP8_VS_HF_FP8_MEAN and worst < FP8_VS_HF_FP8_MAX, (mean, worst)
    mean, worst = _diffs(fp8, full)
    assert mean < FP8_VS_FULL_MEAN and worst < FP8_VS_FULL_MAX, (mean, worst)
    assert mean > 0, "the FP8 cache changes the numbers: it is in use"


def test_engine_fp8_vs_bf16_cache(tiny_model_dirs) -> None:
    """A bf16 model: the FP8 cache's prompt logprobs against the bf16 cache's."""
    path = tiny_model_dirs["llama"]
    prompts = _prompts(13)
    fp8 = _engine_prompt_logprobs(_llm(path, kv_cache_dtype="fp8", dtype="bfloat16"), prompts)
    bf16 = _engine_prompt_logprobs(_llm(path, dtype="bfloat16"), prompts)
    mean, worst = _diffs(fp8, bf16)
    assert 0 < mean < FP8_VS_FULL_MEAN and worst < FP8_VS_FULL_MAX, (mean, worst)


def test_engine_fp8_greedy_and_preemption(tiny_model_dirs) -> None:
    """Greedy decoding with an FP8 cache runs every request to its length, and gives the same
    tokens with prefix-cache hits and preemption (16 blocks for a batch that needs ~40) as in
    a cache that holds everything."""
    from pagedllm import SamplingParams

    prompts = _prompts(12) * 2
    lengths = [40, 60, 60, 5, 33, 50]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    runs = []
    for kw in ({"enable_prefix_caching": False}, {"num_gpu_blocks_override": 16}):
        llm = _llm(tiny_model_dirs["llama"], kv_cache_dtype="fp8", **kw)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        runs.append([o.outputs[0].token_ids for o in outs])
    assert [len(t) for t in runs[0]] == lengths
    assert runs[1] == runs[0]
    assert llm.llm_engine.get_stats().num_preemptions > 0
    assert llm.llm_engine.prefix_cache_stats.hits > 0


@pytest.mark.parametrize(("dtype", "ratio"), [("bfloat16", 2), ("float32", 4)])
def test_fp8_holds_more_blocks(dtype: str, ratio: int, tiny_model_dirs) -> None:
    """The same budget holds `ratio` times the blocks (1 byte a value instead of 2 or 4)."""
    from pagedllm import LLM

    common = dict(dtype=dtype, max_model_len=256, kv_cache_memory="4MiB")
    path = tiny_model_dirs["llama"]
    full, fp8 = LLM(path, **common), LLM(path, kv_cache_dtype="fp8", **common)
    n_full, n_fp8 = full.llm_engine.engine_core.num_blocks, fp8.llm_engine.engine_core.num_blocks
    assert n_fp8 == ratio * n_full == 4 * 2**20 // (2 * 2 * 16 * 2 * 16)
    worker = fp8.llm_engine.engine_core.executor.worker
    layer = next(iter(worker.attention_layers.values()))
    assert layer.kv_cache.dtype == FP8 and layer.kv_cache.shape[1] == n_fp8


@pytest.mark.parametrize("prologue", [True, False])
def test_engine_triton_fp8(prologue: bool, tiny_model_dirs, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The engine on the Triton backend with an FP8 cache (the fused prologue's write or the
    backend's), Qwen3 (q/k norm): prompt logprobs as HF's with the same quantized K/V."""
    from pagedllm.layers import fused

    monkeypatch.setattr(fused, "enabled", lambda x, switch=None: True)
    monkeypatch.setattr(fused, "gemv_enabled", lambda: False, raising=False)
    if not prologue:
        monkeypatch.setattr(TritonAttention, "accepts_prewritten_kv", False)
    path = tiny_model_dirs["qwen3"]
    prompts = [p[:n] for p, n in zip(_prompts(15), (3, 21, 40), strict=True)]
    llm = _llm(path, kv_cache_dtype="fp8", attention_backend="triton", max_num_seqs=4,
               max_num_batched_tokens=32)  # fmt: skip
    got = _engine_prompt_logprobs(llm, prompts)
    mean, worst = _diffs(got, _hf_prompt_logprobs(path, prompts, {0: (1.0, 1.0), 1: (1.0, 1.0)}))
    assert mean < FP8_VS_HF_FP8_MEAN and worst < FP8_VS_HF_FP8_MAX, (mean, worst)


# ----------------------------------------------------------------------------------------------
# Scales from the checkpoint
# ----------------------------------------------------------------------------------------------

# Per layer: (K name, V name) under `model.layers.{i}.self_attn`, and the scales written.
CHECKPOINT_SCALES = {
    0: ((".k_scale", ".v_scale"), (0.011, 0.0047)),  # llm-compressor's kv_cache_scheme
    1: ((".k_proj.output_scale", ".v_proj.output_scale"), (0.023, 0.0031)),  # older format
}


def _with_scales(src: str, dst: Path) -> str:
    """A copy of the model folder whose checkpoint also holds per-layer K/V scales, and whose
    config says so (compressed-tensors' `kv_cache_scheme`)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for i, ((k_name, v_name), (k_s, v_s)) in CHECKPOINT_SCALES.items():
        tensors[f"model.layers.{i}.self_attn{k_name}"] = torch.tensor([k_s])
        tensors[f"model.layers.{i}.self_attn{v_name}"] = torch.tensor(v_s)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


@pytest.mark.parametrize("model_impl", ["auto", "transformers"])
def test_checkpoint_scales_loaded_and_used(model_impl: str, tiny_model_dirs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Scales under both naming schemes reach their layers (native model file, and the
    Transformers fallback, whose layers' names differ), and the engine's FP8 logprobs then
    equal HF's with K/V quantized by those scales (and differ from the 1.0 scales')."""
    path = _with_scales(tiny_model_dirs["llama"], tmp_path / "scaled")
    llm = _llm(path, kv_cache_dtype="fp8", model_impl=model_impl)
    layers = llm.llm_engine.engine_core.executor.worker.attention_layers.values()
    for i, (_, (k_s, v_s)) in CHECKPOINT_SCALES.items():
        (layer,) = [m for m in layers if f".layers.{i}.self_attn" in m.prefix]
        assert (layer.k_scale.item(), layer.v_scale.item()) == pytest.approx((k_s, v_s))
    prompts = _prompts(14)
    got = _engine_prompt_logprobs(llm, prompts)
    scales = {i: s for i, (_, s) in CHECKPOINT_SCALES.items()}
    mean, worst = _diffs(got, _hf_prompt_logprobs(path, prompts, scales))
    assert mean < FP8_VS_HF_FP8_MEAN and worst < FP8_VS_HF_FP8_MAX, (mean, worst)
    unit = _hf_prompt_logprobs(path, prompts, {i: (1.0, 1.0) for i in CHECKPOINT_SCALES})
    assert _diffs(got, unit)[0] > 10 * FP8_VS_HF_FP8_MEAN, "the scales change the cache"
    # With the model dtype's cache the scales are read but unused: the unquantized numbers.
    plain = _engine_prompt_logprobs(_llm(path), prompts)
    assert _diffs(plain, _hf_prompt_logprobs(path, prompts, None))[1] < 1e-4


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("model.layers.3.self_attn.k_scale", ("model.layers.3.self_attn", "k")),
        ("model.layers.3.self_attn.attn.v_scale", ("model.layers.3.self_attn.attn", "v")),
        ("model.layers.3.self_attn.k_proj.k_scale", ("model.layers.3.self_attn", "k")),
        ("model.layers.3.self_attn.v_proj.v_scale", ("model.layers.3.self_attn", "v")),
        ("model.layers.3.self_attn.k_proj.output_scale", ("model.layers.3.self_attn", "k")),
        ("model.layers.3.self_attn.v_proj.output_scale", ("model.layers.3.self_attn", "v")),
        ("model.layers.3.self_attn.kv_scale", ("model.layers.3.self_attn", "kv")),
        ("model.layers.3.self_attn.q_scale", ("model.layers.3.self_attn", "")),
        ("model.layers.3.self_attn.q_proj.output_scale", ("model.layers.3.self_attn", "")),
        ("model.layers.3.self_attn.k_proj.weight_scale", None),
        ("model.layers.3.self_attn.k_proj.input_scale", None),
        ("model.layers.3.mlp.down_proj.weight", None),
    ],
)
def test_kv_scale_names(name: str, target) -> None:  # type: ignore[no-untyped-def]
    assert kv_scale_target(name) == target


def test_load_kv_scales_errors() -> None:
    from pagedllm.attention.backend import get_attention_backend
    from pagedllm.attention.layer import Attention

    model = torch.nn.Module()
    model.a = Attention(4, 16, 0.25, 2, get_attention_backend("torch", "cpu"),
                        prefix="model.layers.0.self_attn.attn")  # fmt: skip
    fp8_kv.load_kv_scales(model, {"model.layers.0.self_attn.kv_scale": torch.tensor(0.5)})
    assert model.a.k_scale.item() == model.a.v_scale.item() == 0.5
    with pytest.raises(ValueError, match="matches no attention layer"):
        fp8_kv.load_kv_scales(model, {"model.layers.1.self_attn.k_scale": torch.tensor(0.5)})
    with pytest.raises(ValueError, match="only one scale per tensor"):
        fp8_kv.load_kv_scales(model, {"model.layers.0.self_attn.k_scale": torch.ones(2)})
    with pytest.raises(ValueError, match="must be positive"):
        fp8_kv.load_kv_scales(model, {"model.layers.0.self_attn.v_scale": torch.tensor(0.0)})


# ----------------------------------------------------------------------------------------------
# Configuration and refusals
# ----------------------------------------------------------------------------------------------


def test_cache_config_names() -> None:
    assert CacheConfig().kv_cache_dtype("bfloat16") == "bfloat16"
    assert CacheConfig(cache_dtype="fp8").cache_dtype == "fp8_e4m3"
    assert CacheConfig(cache_dtype="fp8_e4m3").kv_cache_dtype("float32") == "fp8_e4m3"
    spec = KVCacheSpec(16, 8, 128, "fp8_e4m3")
    assert spec.page_size_bytes * 2 == KVCacheSpec(16, 8, 128, "bfloat16").page_size_bytes
    for bad in ("int8", "fp8_e5m2", "float16", ""):
        with pytest.raises(ValueError, match="kv_cache_dtype"):
            CacheConfig(cache_dtype=bad)


def test_cli_flag() -> None:
    import argparse

    from pagedllm.engine_args import EngineArgs

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = EngineArgs.from_cli_args(parser.parse_args(["--kv-cache-dtype", "fp8"]))
    assert args.kv_cache_dtype == "fp8"


def test_engine_rejects_bad_values(tiny_model_dirs) -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        _llm(tiny_model_dirs["llama"], kv_cache_dtype="int4")


def test_torch_without_float8(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch, "float8_e4m3fn")
    fp8_kv._torch_dtype.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8_e4m3' needs torch\.float8"):
            fp8_kv.kv_cache_torch_dtype("fp8_e4m3")
    finally:
        monkeypatch.undo()
        fp8_kv._torch_dtype.cache_clear()
    assert fp8_kv.kv_cache_torch_dtype("fp8_e4m3") == FP8
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8_e5m2' is not a cache dtype"):
        fp8_kv.kv_cache_torch_dtype("fp8_e5m2")


def test_kv_cache_scheme_check() -> None:
    good = {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False,
            "symmetric": True}  # fmt: skip
    config = SimpleNamespace(quantization_config={"kv_cache_scheme": good})
    check_kv_cache_scheme(config, "fp8_e4m3")
    for key, value in [("num_bits", 4), ("type", "int"), ("strategy", "attn_head"),
                       ("dynamic", True), ("symmetric", False)]:  # fmt: skip
        config = SimpleNamespace(quantization_config={"kv_cache_scheme": {**good, key: value}})
        check_kv_cache_scheme(config, "bfloat16")  # not read without an FP8 cache
        with pytest.raises(ValueError, match=f"kv_cache_dtype=.fp8_e4m3.*{key}="):
            check_kv_cache_scheme(config, "fp8_e4m3")


def test_mla_refuses_fp8() -> None:
    from pagedllm.attention.mla import MLAAttention
    from pagedllm.layers.rotary import get_rope

    rope = get_rope(16, 64, {"rope_type": "default", "rope_theta": 10000.0})
    mla = MLAAttention(4, 32, 16, 32, 64, 0.1, torch.nn.Linear(64, 4 * 64), rope)
    assert mla.kv_cache_spec(16, "bfloat16").page_size_bytes == 16 * 80 * 2
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8_e4m3' is not supported for MLA"):
        mla.kv_cache_spec(16, "fp8_e4m3")


def test_throughput_bench_fp8_kv_backend(capsys, caplog) -> None:  # type: ignore[no-untyped-def]
    """`pagedllm bench throughput --backend pagedllm-fp8-kv,pagedllm`: both caches in one run,
    the same work, the FP8 engine with 4x the blocks of an fp32 cache (CPU), to the floor."""
    import argparse
    import logging

    from pagedllm.benchmarks import throughput

    parser = argparse.ArgumentParser()
    throughput.add_cli_args(parser)
    args = ("--model smollm2-135m --load-format dummy --max-model-len 64 --num-prompts 3 "
            "--input-len 8 8 --output-len 4 4 --kv-cache-memory 32MiB")  # fmt: skip
    ns = parser.parse_args([*args.split(), "--backend", "pagedllm-fp8-kv,pagedllm"])
    caplog.set_level(logging.INFO, logger="pagedllm.worker.worker")
    fp8, full = throughput.main(ns)
    assert (fp8.backend, full.backend) == ("pagedllm-fp8-kv", "pagedllm")
    assert fp8.output_tokens == full.output_tokens == 3 * 4
    assert "ratio pagedllm-fp8-kv/pagedllm" in capsys.readouterr().out
    blocks = [int(m.split()[2]) for m in caplog.messages if m.startswith("KV cache: ")]
    fp8_block = 30 * 2 * 16 * 3 * 64  # layers x (K, V) x tokens x KV heads x head dim, 1 byte
    full_bytes = 2 if torch.cuda.is_available() else 4  # the bench's model dtype: bf16 / fp32
    assert blocks == [32 * 2**20 // fp8_block, 32 * 2**20 // (full_bytes * fp8_block)]
