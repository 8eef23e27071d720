"""compressed-tensors and FP8 checkpoints, and FP8 at load (pagedllm/layers/quantization/
compressed_tensors.py, fp8.py), on the CPU.

The compressed-tensors checkpoints are written by the `compressed-tensors` package itself
(`apply_quantization_config`, qparams from `calculate_qparams`, `ModelCompressor.compress_model`,
`update_config`); the test's reference weights are the package's own `fake_quantize` of the float
weights. The block-wise FP8 checkpoint (`weight_scale_inv`) is packed by the test. The references
run the same math in an fp32 HF model: dequantized weights, and for W8A8 every linear replaced by
the test's `ActQuantLinear` (activations quantized per token / group / static scale, written
here). Greedy tokens through `LLM` must equal the reference's. Unknown schemes are ValueErrors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from pagedllm import LLM, SamplingParams
from pagedllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear
from pagedllm.layers.quantization import UnquantizedLinearMethod, quantization_config_from_hf
from pagedllm.layers.quantization.compressed_tensors import (
    CompressedTensorsConfig,
    CTPackedLinearMethod,
)
from pagedllm.layers.quantization.fp8 import ActQuantLinearMethod, Fp8Config

ct = pytest.importorskip("compressed_tensors")

FP8 = torch.float8_e4m3fn

# NOTE: odd-ish shapes: head_dim 48, 2 KV heads of 8; inputs 256 and 384 (3 groups of 128).
LLAMA = dict(
    vocab_size=384,
    hidden_size=256,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=48,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
PROMPTS = [[(7 * i + 3) % 381 + 3 for i in range(n)] for n in (1, 9, 30)]
MAX_TOKENS = [10, 8, 6]


def _hf_llama(llama: dict[str, Any] = LLAMA) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(**llama, architectures=["LlamaForCausalLM"])
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n
    }


def _llm(path: Path, **kw: Any) -> LLM:
    return LLM(
        str(path),
        dtype="float32",
        max_model_len=64,
        kv_cache_memory="16MiB",
        skip_tokenizer_init=True,
        max_num_batched_tokens=16,
        max_num_seqs=4,
        **kw,
    )


def _greedy(llm: LLM) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def ref_greedy(model: nn.Module) -> list[list[int]]:
    """The reference's greedy tokens, a full forward per step (no KV cache). NOTE: quantized
    activations turn summation-order noise into whole e4m3/int8 steps; HF's cached decode then
    flips near ties that a cacheless forward (and our engine) agree on."""
    outs = []
    with torch.no_grad():
        for prompt, n in zip(PROMPTS, MAX_TOKENS, strict=True):
            seq = list(prompt)
            for _ in range(n):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            outs.append(seq[len(prompt) :])
    return outs


def _model_of(llm: LLM) -> nn.Module:
    return llm.llm_engine.engine_core.executor.worker.model


# --- the test's activation quantization (the reference) ------------------------------------


def ref_act(x: torch.Tensor, mode: str, kind: str, arg: Any = None) -> torch.Tensor:
    """Per token ("token"), per token and `arg` features ("group", e4m3), or with the static
    scale `arg` ("static"): quantize, dequantize, float32."""
    qmax = 448.0 if kind == "fp8" else 127.0
    if mode == "group":
        k = x.shape[-1]
        out = torch.empty_like(x)
        for start in range(0, k, arg):
            out[..., start : start + arg] = ref_act(x[..., start : start + arg], "token", kind)
        return out
    if mode == "token":
        scale = (x.abs().amax(-1, keepdim=True) / qmax).clamp(min=1 / (448 * 512))
    else:
        scale = torch.as_tensor(arg, dtype=torch.float32)
    y = (x / scale).clamp(-qmax - (kind == "int8"), qmax)
    q = y.to(FP8).float() if kind == "fp8" else torch.round(y)
    return q * scale


class ActQuantLinear(nn.Module):
    """The reference W8A8 linear: quantized activations times the dequantized weight, fp32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act: tuple) -> None:
        super().__init__()
        self.weight, self.bias, self.act = weight.float(), bias, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(ref_act(x.float(), *self.act), self.weight, self.bias)


# --- compressed-tensors checkpoints written by the package --------------------------------


def _ct_checkpoint(
    tmp: Path, preset: str, group_size: int | None = None, input_scale: float | None = None
) -> tuple[Path, nn.Module, dict[str, torch.Tensor]]:
    """A random Llama quantized by compressed-tensors with `preset` (all linears but lm_head and
    layer 1's down_proj), saved compressed; the reference HF model holds the package's
    fake-quantized (dequantized) weights. Returns (folder, reference, dequantized weights)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    model = _hf_llama()
    ref = _hf_llama()
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if group_size is not None:
        scheme.weights.group_size = group_size
        scheme.weights.strategy = "group" if group_size > 0 else "channel"
        if group_size < 0:
            scheme.weights.group_size = None
    ignore = ["lm_head", "model.layers.1.mlp.down_proj"]
    apply_quantization_config(
        model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore)
    )
    deq: dict[str, torch.Tensor] = {}
    for name, mod in _linears(model).items():
        if not hasattr(mod, "weight_scale"):
            continue
        args = mod.quantization_scheme.weights
        w = mod.weight.data
        if args.strategy == "group":
            view = w.unflatten(1, (-1, args.group_size))
            lo, hi = view.amin(-1), view.amax(-1)
        elif args.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        else:
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        scale, zp = calculate_qparams(lo, hi, args)
        mod.weight_scale.data.copy_(scale.reshape(mod.weight_scale.shape))
        if hasattr(mod, "weight_zero_point"):
            mod.weight_zero_point.data.copy_(zp.reshape(mod.weight_zero_point.shape))
        zero = getattr(mod, "weight_zero_point", None)
        deq[name] = fake_quantize(w, mod.weight_scale, zero, args).float()
        if input_scale is not None and hasattr(mod, "input_scale"):
            mod.input_scale.data.fill_(input_scale)
    comp = ModelCompressor.from_pretrained_model(model)
    comp.compress_model(model)
    folder = tmp / preset
    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "rotary" not in k}
    save_file(state, str(folder / "model.safetensors"))
    comp.update_config(str(folder))
    with torch.no_grad():
        for name, mod in _linears(ref).items():
            if name in deq:
                mod.weight.copy_(deq[name])
            else:
                mod.weight.copy_(dict(_linears(_hf_llama()))[name].weight)
    return folder, ref, deq


def _swap_act_quant(ref: nn.Module, names: set[str], act: tuple) -> None:
    for name, mod in list(_linears(ref).items()):
        if name in names:
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, ActQuantLinear(mod.weight, mod.bias, act))


CT_CASES = [
    # (preset, group size (-1: channel), static input scale, activation reference)
    ("W4A16", 128, None, None),
    ("W4A16", 32, None, None),
    ("W4A16_ASYM", 64, None, None),
    ("W4A16_ASYM", -1, None, None),
    ("W8A16", 32, None, None),
    ("FP8_DYNAMIC", None, None, ("token", "fp8")),
    # NOTE: at 0.02 the reference itself flips a near tie (0.02 in logprob) between a forward
    # of 11 and of 13 tokens: static e4m3 steps amplify summation-order noise.
    ("FP8", None, 0.03, ("static", "fp8", 0.03)),
    ("W8A8", None, None, ("token", "int8")),
]


@pytest.mark.parametrize(
    ("preset", "group", "input_scale", "act"),
    CT_CASES,
    ids=[f"{c[0]}-g{c[1]}" for c in CT_CASES],
)
def test_compressed_tensors_llama_matches_reference(
    tmp_path: Path, preset: str, group: int | None, input_scale: float | None, act: tuple | None
) -> None:
    folder, ref, deq = _ct_checkpoint(tmp_path, preset, group, input_scale)
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    if act is not None:
        _swap_act_quant(ref, set(deq), act)
    expected = ref_greedy(ref)
    llm = _llm(folder)
    model = _model_of(llm)
    # the loaded weights are exactly the package's dequantization
    layer0 = model.model.layers[0]
    qkv = torch.cat([deq[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv"])
    assert torch.equal(layer0.self_attn.qkv_proj.weight.float(), qkv)
    down1 = model.model.layers[1].mlp.down_proj
    assert type(down1.quant_method) is UnquantizedLinearMethod
    is_w8a8 = isinstance(layer0.self_attn.qkv_proj.quant_method, ActQuantLinearMethod)
    assert is_w8a8 == (act is not None)
    assert _greedy(llm) == expected


# --- fp8 block-wise checkpoints, packed by the test ----------------------------------------


def pack_fp8_blocks(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 `q [out, in]` and `scale_inv [ceil(out / bn), ceil(in / bk)]` (amax / 448 per
    block, partial edge blocks included); and nothing else."""
    out, k = w.shape
    rows, cols = -(-out // bn), -(-k // bk)
    scale = torch.empty(rows, cols)
    q = torch.empty(out, k, dtype=FP8)
    for r in range(rows):
        for c in range(cols):
            block = w[r * bn : (r + 1) * bn, c * bk : (c + 1) * bk]
            s = block.abs().amax() / 448.0
            scale[r, c] = s
            q[r * bn : (r + 1) * bn, c * bk : (c + 1) * bk] = (block / s).to(FP8)
    return q, scale


def unpack_fp8_blocks(q: torch.Tensor, scale: torch.Tensor, bn: int, bk: int) -> torch.Tensor:
    w = q.float()
    for r in range(scale.shape[0]):
        for c in range(scale.shape[1]):
            w[r * bn : (r + 1) * bn, c * bk : (c + 1) * bk] *= scale[r, c]
    return w


def test_fp8_block_checkpoint_matches_reference(tmp_path: Path) -> None:
    # NOTE: [128, 128] blocks need fused parts of whole row blocks: head_dim 64 (kv 128).
    llama = dict(LLAMA, head_dim=64)
    model, ref = _hf_llama(llama), _hf_llama(llama)
    bn, bk = 128, 128
    skip = {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"}
    state: dict[str, torch.Tensor] = {}
    deq: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        layer = name.removesuffix(".weight")
        if layer in _linears(model) and layer not in skip:
            q, s = pack_fp8_blocks(tensor, bn, bk)
            state[name], state[f"{layer}.weight_scale_inv"] = q, s
            deq[layer] = unpack_fp8_blocks(q, s, bn, bk)
        else:
            state[name] = tensor.contiguous()
    folder = tmp_path / "fp8"
    model.config.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": [bn, bk],
        "modules_to_not_convert": ["lm_head", *sorted(skip)],
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "model.safetensors"))
    with torch.no_grad():
        for name, mod in _linears(ref).items():
            if name in deq:
                mod.weight.copy_(deq[name])
    _swap_act_quant(ref, set(deq), ("group", "fp8", bk))
    expected = ref_greedy(ref)
    llm = _llm(folder)
    m = _model_of(llm)
    assert torch.equal(m.model.layers[0].mlp.down_proj.weight, deq["model.layers.0.mlp.down_proj"])
    assert type(m.model.layers[1].mlp.gate_up_proj.quant_method) is UnquantizedLinearMethod
    assert isinstance(m.model.layers[1].mlp.down_proj.quant_method, ActQuantLinearMethod)
    assert _greedy(llm) == expected


def test_online_fp8_matches_reference(tmp_path: Path) -> None:
    """`quantization="fp8"` on a float checkpoint: one scale per (fused) weight tensor, amax /
    448, and activations per token."""
    model, ref = _hf_llama(), _hf_llama()
    folder = tmp_path / "float"
    model.save_pretrained(folder)
    # NOTE: a fused layer is one tensor at load: q/k/v (and gate/up) share one scale.
    with torch.no_grad():
        for i in range(LLAMA["num_hidden_layers"]):
            src, dst = model.model.layers[i], ref.model.layers[i]
            fused = (
                ("self_attn", "qkv"),
                ("self_attn", "o"),
                ("mlp", ("gate", "up")),
                ("mlp", ("down",)),
            )
            for parent, parts in fused:
                ws = [src.get_submodule(f"{parent}.{p}_proj").weight for p in parts]
                s = torch.cat(ws).abs().amax() / 448.0
                for p, w in zip(parts, ws, strict=True):
                    deq = (w / s).to(FP8).float() * s
                    dst.get_submodule(f"{parent}.{p}_proj").weight.copy_(deq)
    _swap_act_quant(ref, set(_linears(ref)), ("token", "fp8"))
    llm = _llm(folder, quantization="fp8")
    m = _model_of(llm)
    attn = ref.model.layers[1].self_attn
    expected_qkv = torch.cat([attn.get_submodule(f"{p}_proj").weight for p in "qkv"])
    assert torch.equal(m.model.layers[1].self_attn.qkv_proj.weight, expected_qkv)
    assert _greedy(llm) == ref_greedy(ref)


# --- config errors -------------------------------------------------------------------------


def _ct(weights: dict, acts: dict | None = None, fmt: str = "pack-quantized") -> dict:
    group = {"targets": ["Linear"], "weights": weights, "input_activations": acts, "format": fmt}
    return {"quant_method": "compressed-tensors", "config_groups": {"g": group}, "format": fmt}


def test_unknown_schemes_are_clear_errors() -> None:
    hf = type("HF", (), {})()
    hf.quantization_config = _ct(
        {"num_bits": 3, "type": "int", "strategy": "group", "group_size": 128}
    )
    with pytest.raises(
        ValueError, match=r"weights=int3 group/128 sym .*pack-quantized.* not supported"
    ):
        quantization_config_from_hf(hf)
    w8 = {"num_bits": 8, "type": "float", "strategy": "channel"}
    asym = {
        "num_bits": 8,
        "type": "float",
        "strategy": "token",
        "dynamic": True,
        "symmetric": False,
    }
    hf.quantization_config = _ct(w8, asym, "float-quantized")
    with pytest.raises(ValueError, match=r"input_activations=float8 token asym dynamic"):
        quantization_config_from_hf(hf)
    with pytest.raises(ValueError, match="block-wise quantization at load"):
        Fp8Config(weight_block_size=[128, 128])
    hf.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    with pytest.raises(
        ValueError, match=r"quantization='fp8', but the checkpoint is quantized with 'gptq'"
    ):
        quantization_config_from_hf(hf, "fp8")
    plain = type("HF", (), {})()
    with pytest.raises(ValueError, match="cannot quantize an unquantized checkpoint"):
        quantization_config_from_hf(plain, "gptq")
    assert isinstance(quantization_config_from_hf(plain, "fp8"), Fp8Config)
    # a fused layer whose parts are quantized differently
    cfg = CompressedTensorsConfig.from_config(
        dict(
            _ct({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32}),
            ignore=["re:.*k_proj$"],
        )
    )
    with pytest.raises(ValueError, match="not quantized alike"):
        QKVParallelLinear(
            64, 16, 4, 2, quant_config=cfg, prefix="model.layers.0.self_attn.qkv_proj"
        )
    merged = MergedColumnParallelLinear(64, [32, 32], quant_config=cfg, prefix="x.mlp.gate_up_proj")
    assert isinstance(merged.quant_method, CTPackedLinearMethod)


# --- perplexity of the real default model --------------------------------------------------

PPL_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press into a system that "
    "could produce books far faster than any scribe. Before his invention, most books in Europe "
    "were copied by hand, a slow and expensive process that kept literacy the privilege of a "
    "small elite. Within a few decades, printing shops had spread to more than two hundred "
    "cities, and millions of volumes were in circulation. The effects were profound. Scholars "
    "could compare identical copies of a text, which encouraged the careful correction of errors "
    "and the growth of scientific communities. Religious reformers used pamphlets to spread "
    "their ideas quickly, and governments learned to use print for laws, maps and news. "
    "Merchants benefited from printed price lists and manuals of arithmetic, while ordinary "
    "people gained access to almanacs, stories and songs. Historians still debate how quickly "
    "reading spread among farmers and workers, but it is clear that the press changed the way "
    "knowledge was stored, shared and challenged. Today, digital networks play a similar role, "
    "and many of the questions raised in the age of print, about authority, accuracy and access, "
    "are being asked again with new urgency. Libraries, schools and publishers now face the "
    "task of deciding which records to keep, how to make them searchable, and how to protect "
    "them from loss, just as the first printers had to decide which texts deserved the cost "
    "of paper and type."
)


def _perplexity(llm: LLM, ids: list[int]) -> float:
    params = SamplingParams(prompt_logprobs=0, max_tokens=1)
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    logprobs = [d[tok].logprob for d, tok in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
    return float(torch.tensor(logprobs).neg().mean().exp())


@pytest.mark.slow
def test_default_model_perplexity(tmp_path: Path) -> None:
    """SmolLM2-135M on a fixed ~300-token text: FP8 at load within 2% of the unquantized
    perplexity; compressed-tensors W4A16 (asymmetric, group 32, round to nearest) within 30%.

    Measured (287 tokens): fp32 24.456, fp8 24.607 (+0.6%), W4A16 asym g32 31.116 (+27%; sym
    g64: 35.04, +43%). The W4A16 figure equals HF's own model on compressed-tensors'
    `fake_quantize`d weights to 5 digits: the loss is round-to-nearest 4-bit on a 135M model
    (GPTQ/AWQ calibration would recover most of it), not our math. NOTE: no group 128: the
    model's 576-wide inputs hold no whole number of 128-groups, which compressed-tensors requires.
    """
    from transformers import AutoModelForCausalLM

    from pagedllm.models.default import DefaultModelNotInstalledError, default_model_path

    try:
        default_model_path()
    except DefaultModelNotInstalledError as e:
        pytest.skip(f"default model not installed: {e}")
    kw: dict[str, Any] = dict(max_model_len=512, kv_cache_memory="256MiB", dtype="float32")
    base = LLM(**kw)
    ids = base.get_tokenizer().encode(PPL_TEXT)
    assert 250 <= len(ids) <= 400
    folder = Path(base.llm_engine.config.model_config.model)
    ppl = {"fp32": _perplexity(base, ids)}
    del base
    ppl["fp8"] = _perplexity(LLM(**kw, quantization="fp8"), ids)

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    scheme = preset_name_to_scheme("W4A16_ASYM", ["Linear"])
    scheme.weights.group_size = 32
    cfg = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    apply_quantization_config(hf, cfg)
    for mod in _linears(hf).values():
        view = mod.weight.data.unflatten(1, (-1, 32))
        scale, zero = calculate_qparams(view.amin(-1), view.amax(-1), scheme.weights)
        mod.weight_scale.data.copy_(scale)
        mod.weight_zero_point.data.copy_(zero)
    comp = ModelCompressor.from_pretrained_model(hf)
    comp.compress_model(hf)
    w4 = tmp_path / "w4a16"
    hf.config.save_pretrained(w4)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(w4 / "model.safetensors"))
    comp.update_config(str(w4))
    ppl["w4a16"] = _perplexity(LLM(str(w4), skip_tokenizer_init=True, **kw), ids)
    print(f"perplexity on {len(ids)} tokens: {ppl}")
    assert ppl["fp8"] <= ppl["fp32"] * 1.02, ppl
    assert ppl["w4a16"] <= ppl["fp32"] * 1.30, ppl
