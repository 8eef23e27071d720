"""GPTQ and AWQ checkpoints (pagedllm/layers/quantization/gptq.py, awq.py, packed.py), on the CPU.

The tensors are packed here by the test's own packers (written from the formats' definitions, not
from the code under test): GPTQ's `qweight [in / pack, out]`, `qzeros` stored minus one (v1) or
as is (v2), `g_idx`; AWQ's interleaved `[0, 2, 4, 6, 1, 3, 5, 7]` order. Checked:
- every linear kind (replicated, column, merged, q/k/v with KV replication, row) at tensor-parallel
  sizes 1, 2 and 4 (every rank, by faking the rank the layers read): the dequantized weight equals
  exactly this rank's slice of the test's reference dequantization, as the unquantized layer
  loads it;
- a tiny random Llama checkpoint whose linears are GPTQ (act order with a permuted g_idx and
  layers left unconverted; asymmetric 8 bits; per channel) or AWQ tensors, with the
  `quantization_config` in config.json, through `LLM`: greedy tokens equal an fp32 HF model
  holding the dequantized weights;
- the config reading: an unknown `quant_method` is a ValueError naming it and the known ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from pagedllm import LLM, SamplingParams
from pagedllm.layers import linear
from pagedllm.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from pagedllm.layers.quantization import (
    QuantizationConfig,
    UnquantizedLinearMethod,
    get_quantization_config,
    quantization_config_from_hf,
)
from pagedllm.layers.quantization.awq import AWQConfig
from pagedllm.layers.quantization.gptq import GPTQConfig
from pagedllm.layers.quantization.packed import PackedLinearMethod, is_layer_skipped
from tests.tiny_models import hf_greedy, load_hf

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]

# --- the test's own packers and reference --------------------------------------------------


def _as_int32(v: torch.Tensor) -> torch.Tensor:
    """int64 holding 32-bit patterns → int32 with the same bits (two's complement)."""
    v = v & 0xFFFFFFFF
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """`[n, m]` → `[n / pack, m]`: row `r * pack + j` at bits `j * bits` of row r (GPTQ qweight)."""
    pack = 32 // bits
    out = torch.zeros(values.shape[0] // pack, values.shape[1], dtype=torch.int64)
    for j in range(pack):
        out |= values[j::pack].long() << (bits * j)
    return _as_int32(out)


def pack_cols(values: torch.Tensor, bits: int, order: list[int] | None = None) -> torch.Tensor:
    """`[n, m]` → `[n, m / pack]`: slot j of column c holds column `c * pack + order[j]`."""
    pack = 32 // bits
    order = order or list(range(pack))
    out = torch.zeros(values.shape[0], values.shape[1] // pack, dtype=torch.int64)
    for slot, feature in enumerate(order):
        out |= values[:, feature::pack].long() << (bits * slot)
    return _as_int32(out)


def reference_dequant(
    q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """`[out, in]` float32: input column i is `(q[i] - z[g]) * s[g]`, g its group; group by
    group."""
    w = torch.empty(q.shape[1], q.shape[0])
    for g in range(s.shape[0]):
        cols = (g_idx == g).nonzero().flatten()
        w[:, cols] = ((q[cols] - z[g]).double() * s[g].double()).float().t()
    return w


def quantize(
    w: torch.Tensor, bits: int, group_size: int, sym: bool, desc_act: bool, min_zero: int, seed: int
) -> dict[str, torch.Tensor]:
    """Integer q `[in, out]`, zeros and fp16 scales `[groups, out]` and g_idx `[in]` of `w`
    `[out, in]` (round to nearest; with `desc_act`, groups over a random permutation)."""
    gen = torch.Generator().manual_seed(seed)
    n_in = w.shape[1]
    gs = n_in if group_size == -1 else group_size
    groups = -(-n_in // gs)
    g_idx = torch.arange(n_in) // gs
    if desc_act:
        g_idx = g_idx[torch.randperm(n_in, generator=gen)]
    maxq = 2**bits - 1
    wt = w.t().float()
    q = torch.empty(wt.shape, dtype=torch.int64)
    z = torch.empty(groups, w.shape[0], dtype=torch.int64)
    s = torch.empty(groups, w.shape[0], dtype=torch.float16)
    for g in range(groups):
        rows = g_idx == g
        block = wt[rows]
        lo, hi = block.amin(0).clamp(max=0), block.amax(0).clamp(min=0)
        if sym:
            scale = (2 * torch.maximum(-lo, hi) / maxq).clamp(min=1e-4)
            zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int64)
        else:
            scale = ((hi - lo) / maxq).clamp(min=1e-4)
            zero = (-lo / scale).round().long().clamp(min_zero, maxq)
        s[g] = scale.half()
        z[g] = zero
        q[rows] = (block / s[g].float() + zero).round().long().clamp(0, maxq)
    return {"q": q, "z": z, "s": s, "g_idx": g_idx.to(torch.int32)}


def gptq_tensors(parts: dict[str, torch.Tensor], bits: int, v2: bool) -> dict[str, torch.Tensor]:
    mask = 2**bits - 1
    zeros = parts["z"] if v2 else (parts["z"] - 1) & mask  # NOTE: v1 stores zero - 1
    return {
        "qweight": pack_rows(parts["q"], bits),
        "qzeros": pack_cols(zeros, bits),
        "scales": parts["s"],
        "g_idx": parts["g_idx"],
    }


def awq_tensors(parts: dict[str, torch.Tensor], zero_point: bool) -> dict[str, torch.Tensor]:
    out = {"qweight": pack_cols(parts["q"], 4, AWQ_ORDER), "scales": parts["s"]}
    if zero_point:
        out["qzeros"] = pack_cols(parts["z"], 4, AWQ_ORDER)
    return out


# (name, config, quantize keywords, checkpoint tensors of the quantized parts)
Case = tuple[str, QuantizationConfig, dict[str, Any], Callable[[dict], dict]]


def _gptq(bits: int, gs: int, sym: bool, desc_act: bool, v2: bool = False) -> Case:
    fmt = "gptq_v2" if v2 else "gptq"
    cfg = GPTQConfig(bits, gs, desc_act=desc_act, sym=sym, checkpoint_format=fmt)
    name = f"gptq{bits}-g{gs}-{'sym' if sym else 'asym'}{'-act' if desc_act else ''}-{fmt}"
    kw = dict(bits=bits, group_size=gs, sym=sym, desc_act=desc_act, min_zero=0 if v2 else 1)
    return name, cfg, kw, lambda p: gptq_tensors(p, bits, v2)


def _awq(gs: int, zero_point: bool) -> Case:
    cfg = AWQConfig(group_size=gs, zero_point=zero_point)
    kw = dict(bits=4, group_size=gs, sym=not zero_point, desc_act=False, min_zero=0)
    return f"awq-g{gs}-zp{int(zero_point)}", cfg, kw, lambda p: awq_tensors(p, zero_point)


CASES = [
    _gptq(4, 32, sym=True, desc_act=False),
    _gptq(4, 32, sym=False, desc_act=True),
    _gptq(8, 64, sym=False, desc_act=False),
    _gptq(8, 32, sym=True, desc_act=True),
    _gptq(4, -1, sym=True, desc_act=False),
    _gptq(4, 32, sym=False, desc_act=False, v2=True),
    _awq(32, zero_point=True),
    _awq(64, zero_point=False),
    _awq(-1, zero_point=True),
]


def test_packers_round_trip_known_values() -> None:
    """The test's packers on hand-checked values (so the reference itself is pinned)."""
    values = torch.arange(8).reshape(8, 1)
    assert pack_rows(values, 4).item() == 0x76543210
    assert pack_cols(values.t(), 4, AWQ_ORDER).item() == 0x75316420
    assert pack_rows(torch.tensor([[255], [0], [0], [128]]), 8).item() == _as_int32(
        torch.tensor(0x800000FF)
    )


# --- every layer kind, every rank --------------------------------------------------------

# (kind, builder(config), output parts: (shard id, size)), inputs are 128 features
LAYERS: list[tuple[str, Callable[[Any], LinearBase], list[tuple[object, int]]]] = [
    ("replicated", lambda c: ReplicatedLinear(128, 48, quant_config=c), [(None, 48)]),
    ("column", lambda c: ColumnParallelLinear(128, 64, True, quant_config=c), [(None, 64)]),
    (
        "merged",
        lambda c: MergedColumnParallelLinear(128, [32, 64], quant_config=c),
        [(0, 32), (1, 64)],
    ),
    (
        "qkv",
        lambda c: QKVParallelLinear(128, 16, 4, 2, True, quant_config=c),
        [("q", 64), ("k", 32), ("v", 32)],
    ),
    ("row", lambda c: RowParallelLinear(128, 48, True, quant_config=c), [(None, 48)]),
]


@pytest.fixture
def fake_tp(monkeypatch: pytest.MonkeyPatch) -> Callable[[int, int], None]:
    """Sets the tensor-parallel size and rank the layers read when they are built."""

    def set_tp(size: int, rank: int) -> None:
        monkeypatch.setattr(linear, "get_tp_size", lambda: size)
        monkeypatch.setattr(linear, "get_tp_rank", lambda: rank)

    return set_tp


def _shard(shard_id: object) -> tuple[object, ...]:
    return () if shard_id is None else (shard_id,)


def _load(layer: LinearBase, tensors: dict[str, torch.Tensor], shard_id: object) -> None:
    """The checkpoint tensors of one part through each parameter's own loader."""
    params = dict(layer.named_parameters())
    for name, tensor in tensors.items():
        params[name].weight_loader(params[name], tensor, *_shard(shard_id))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_layer_dequantizes_its_shard_exactly(
    case: Case, tp: int, fake_tp: Callable[[int, int], None]
) -> None:
    name, config, kw, to_tensors = case
    if kw["group_size"] == 64 and tp == 4:
        pytest.skip("a row split of 32 features holds no whole group of 64")
    for kind, build, parts in LAYERS:
        gen = torch.Generator().manual_seed(len(kind))
        full = {sid: torch.randn(size, 128, generator=gen) for sid, size in parts}
        quantized = {sid: quantize(w, seed=i, **kw) for i, (sid, w) in enumerate(full.items())}
        dequant = {
            sid: reference_dequant(p["q"], p["z"], p["s"], p["g_idx"])
            for sid, p in quantized.items()
        }
        for rank in range(tp):
            fake_tp(tp, rank)
            layer, plain = build(config), build(None)
            assert isinstance(layer.quant_method, PackedLinearMethod)
            for sid, p in quantized.items():
                _load(layer, to_tensors(p), sid)
                plain.weight.weight_loader(plain.weight, dequant[sid], *_shard(sid))
            if plain.bias is not None:  # not under test: the same values in both
                plain.bias.data.normal_(generator=gen)
                layer.bias.data.copy_(plain.bias)
            layer.quant_method.process_weights_after_loading(layer)
            assert {n for n, _ in layer.named_parameters()} <= {"weight", "bias"}
            assert torch.equal(layer.weight, plain.weight), f"{name} {kind} tp={tp} rank={rank}"
            if tp == 1:
                expected = torch.cat(list(dequant.values()))
                assert torch.equal(layer.weight, expected), f"{name} {kind}"
            x = torch.randn(3, layer.input_size_per_partition)
            bias_here = None if (kind == "row" and rank > 0) else plain.bias
            assert torch.equal(
                layer.quant_method.apply(layer, x, bias_here), F.linear(x, plain.weight, bias_here)
            )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_gets_the_rounded_dequantized_weight(dtype: torch.dtype) -> None:
    """Scales are held in float32 whatever the model dtype: the weight is the float32
    dequantization rounded once to the model dtype (fp16 scales in a bf16 model included)."""
    kw = dict(bits=4, group_size=32, sym=False, desc_act=True, min_zero=1)
    p = quantize(torch.randn(48, 128, generator=torch.Generator().manual_seed(1)), seed=2, **kw)
    layer = ReplicatedLinear(
        128, 48, params_dtype=dtype, quant_config=GPTQConfig(4, 32, desc_act=True, sym=False)
    )
    assert layer.scales.dtype == torch.float32
    _load(layer, gptq_tensors(p, 4, v2=False), None)
    layer.quant_method.process_weights_after_loading(layer)
    expected = reference_dequant(p["q"], p["z"], p["s"], p["g_idx"]).to(dtype)
    assert layer.weight.dtype == dtype and torch.equal(layer.weight, expected)


def test_fused_checkpoint_tensor_loads_part_by_part(fake_tp: Callable[[int, int], None]) -> None:
    """An already-fused checkpoint tensor (shard_id None) into a merged layer, at tp 2."""
    config = GPTQConfig(4, 32, desc_act=True, sym=False)
    kw = dict(bits=4, group_size=32, sym=False, desc_act=True, min_zero=1)
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    p = quantize(w, seed=3, **kw)
    tensors = gptq_tensors(p, 4, v2=False)
    deq = reference_dequant(p["q"], p["z"], p["s"], p["g_idx"])
    for rank in range(2):
        fake_tp(2, rank)
        layer = MergedColumnParallelLinear(128, [32, 64], quant_config=config)
        plain = MergedColumnParallelLinear(128, [32, 64])
        _load(layer, tensors, None)
        plain.weight.weight_loader(plain.weight, deq)
        layer.quant_method.process_weights_after_loading(layer)
        assert torch.equal(layer.weight, plain.weight)


def test_shape_errors_are_clear() -> None:
    layer = ColumnParallelLinear(128, 64, quant_config=GPTQConfig(4, 32))
    with pytest.raises(ValueError, match="does not match"):
        layer.qweight.weight_loader(layer.qweight, torch.zeros(16, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="shard_id must be one of"):
        qkv = QKVParallelLinear(128, 16, 4, 2, quant_config=AWQConfig(group_size=32))
        qkv.qweight.weight_loader(qkv.qweight, torch.zeros(128, 8, dtype=torch.int32), "x")
    with pytest.raises(ValueError, match="not supported"):
        GPTQConfig(3, 128)
    with pytest.raises(ValueError, match="version 'gemv'"):
        AWQConfig.from_config({"quant_method": "awq", "version": "gemv"})


# --- reading the checkpoint's config -----------------------------------------------------


class _ObjConfig:
    def __init__(self, d: dict[str, Any]) -> None:
        self.d = d

    def to_dict(self) -> dict[str, Any]:
        return dict(self.d)


def test_quantization_config_from_hf() -> None:
    ns = type("HF", (), {})
    hf = ns()
    assert quantization_config_from_hf(hf) is None
    hf.quantization_config = {"quant_method": "gptq", "bits": 8, "group_size": 64, "desc_act": True}
    cfg = quantization_config_from_hf(hf)
    assert isinstance(cfg, GPTQConfig)
    assert (cfg.bits, cfg.group_size, cfg.desc_act, cfg.sym) == (8, 64, True, True)
    hf.quantization_config = _ObjConfig(
        {
            "quant_method": "AWQ",
            "w_bit": 4,
            "q_group_size": 32,
            "zero_point": False,
            "modules_to_not_convert": ["visual"],
        }
    )
    cfg = quantization_config_from_hf(hf)
    assert isinstance(cfg, AWQConfig)
    assert (cfg.group_size, cfg.zero_point, cfg.modules_to_not_convert) == (32, False, ["visual"])
    assert get_quantization_config("gptq") is GPTQConfig


def test_quantization_config_from_transformers_objects() -> None:
    """transformers' own config objects (their `quant_method`/`version` are str enums)."""
    import transformers

    hf = type("HF", (), {})()
    hf.quantization_config = transformers.GPTQConfig(bits=8, group_size=32, desc_act=True)
    cfg = quantization_config_from_hf(hf)
    assert isinstance(cfg, GPTQConfig) and (cfg.bits, cfg.group_size, cfg.desc_act) == (8, 32, True)
    hf.quantization_config = transformers.AwqConfig(bits=4, group_size=64, zero_point=False)
    cfg = quantization_config_from_hf(hf)
    assert isinstance(cfg, AWQConfig) and (cfg.group_size, cfg.zero_point) == (64, False)


def test_unknown_quant_method_is_a_clear_error() -> None:
    hf = type("HF", (), {"quantization_config": {"quant_method": "bitsandbytes"}})()
    with pytest.raises(ValueError, match=r"'bitsandbytes'.*available: .*awq.*gptq.*unquantized"):
        quantization_config_from_hf(hf)
    hf.quantization_config = {"bits": 4}
    with pytest.raises(ValueError, match="no quant_method"):
        quantization_config_from_hf(hf)


def test_modules_to_not_convert() -> None:
    skip = ["model.layers.1.mlp", "lm_head", "self_attn.k_proj"]
    assert is_layer_skipped("model.layers.1.mlp.gate_up_proj", skip)
    assert is_layer_skipped("model.layers.1.mlp.down_proj", skip)
    assert not is_layer_skipped("model.layers.11.mlp.down_proj", skip), "whole components only"
    assert not is_layer_skipped("model.layers.0.mlp.down_proj", skip)
    with pytest.raises(ValueError, match="modules_to_not_convert names only part of the fused"):
        is_layer_skipped("model.layers.0.self_attn.qkv_proj", skip)
    assert not is_layer_skipped("model.layers.0.self_attn.o_proj", [])
    layer = ReplicatedLinear(
        128, 48, quant_config=GPTQConfig(4, 32, modules_to_not_convert=skip), prefix="a.lm_head"
    )
    assert type(layer.quant_method) is UnquantizedLinearMethod


# --- a quantized Llama checkpoint through LLM ---------------------------------------------

# NOTE: odd shapes: head_dim 24, 2 KV heads of 4, intermediate 160 (5 groups of 32).
LLAMA = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.25,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
_LINEAR = re.compile(r"(model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj)\.weight$")


def _write_quantized_llama(
    tmp: Path, case: Case, quant_config: dict[str, Any], skip: list[str]
) -> tuple[Path, Path]:
    """A random Llama whose linears (but those of `skip`) are quantized by the test: the quantized
    checkpoint (config.json with `quant_config`) and an fp32 one of the dequantized weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    _, _, kw, to_tensors = case
    config = LlamaConfig(**LLAMA)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    quantized: dict[str, torch.Tensor] = {}
    for i, (name, tensor) in enumerate(sorted(state.items())):
        match = _LINEAR.match(name)
        if match is None or any(f".{s}." in f".{name}." for s in skip):
            quantized[name] = tensor
            continue
        parts = quantize(tensor, seed=i, **kw)
        state[name] = reference_dequant(parts["q"], parts["z"], parts["s"], parts["g_idx"])
        for key, value in to_tensors(parts).items():
            quantized[f"{match.group(1)}.{key}"] = value.contiguous()
    model.load_state_dict(state)
    ref, qdir = tmp / "dequantized", tmp / "quantized"
    model.save_pretrained(ref)
    qdir.mkdir()
    save_file(quantized, str(qdir / "model.safetensors"))
    data = json.loads((ref / "config.json").read_text())
    data["quantization_config"] = quant_config
    (qdir / "config.json").write_text(json.dumps(data))
    (qdir / "generation_config.json").write_text((ref / "generation_config.json").read_text())
    return qdir, ref


def _greedy(llm: LLM, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


E2E = [
    (
        _gptq(4, 32, sym=False, desc_act=True),
        {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": 32,
            "desc_act": True,
            "sym": False,
            "modules_to_not_convert": ["model.layers.1.mlp"],
        },
        ["model.layers.1.mlp"],
    ),
    (
        _gptq(8, 32, sym=False, desc_act=False),
        {"quant_method": "gptq", "bits": 8, "group_size": 32, "desc_act": False, "sym": False},
        [],
    ),
    (
        _gptq(4, -1, sym=True, desc_act=False),
        {"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": False, "sym": True},
        [],
    ),
    (
        _awq(32, zero_point=True),
        {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"},
        [],
    ),
]


@pytest.mark.parametrize(("case", "quant_config", "skip"), E2E, ids=[c[0][0] for c in E2E])
def test_quantized_llama_matches_hf_on_dequantized_weights(
    tmp_path: Path, case: Case, quant_config: dict[str, Any], skip: list[str]
) -> None:
    qdir, ref = _write_quantized_llama(tmp_path, case, quant_config, skip)
    prompts = [[(7 * i + 3) % 509 + 3 for i in range(n)] for n in (1, 9, 30)]
    max_tokens = [12, 10, 6]
    expected = hf_greedy(load_hf(ref), prompts, max_tokens)
    llm = LLM(
        str(qdir),
        dtype="float32",
        max_model_len=64,
        kv_cache_memory="16MiB",
        skip_tokenizer_init=True,
        max_num_batched_tokens=16,
        max_num_seqs=4,
    )
    assert _greedy(llm, prompts, max_tokens) == expected
    model = llm.llm_engine.engine_core.executor.worker.model
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert type(qkv.quant_method) is not UnquantizedLinearMethod
    down1 = model.model.layers[1].mlp.down_proj
    assert (type(down1.quant_method) is UnquantizedLinearMethod) == bool(skip)


def test_modules_in_block_to_quantize() -> None:
    """Optimum's list of lists: only the linears it names are quantized."""
    cfg = GPTQConfig.from_config(
        {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": 32,
            "modules_in_block_to_quantize": [
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                ["mlp.down_proj"],
            ],
        }
    )
    qkv = QKVParallelLinear(
        128, 16, 4, 2, quant_config=cfg, prefix="model.layers.0.self_attn.qkv_proj"
    )
    down = RowParallelLinear(128, 48, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
    o = RowParallelLinear(128, 48, quant_config=cfg, prefix="model.layers.0.self_attn.o_proj")
    assert isinstance(qkv.quant_method, PackedLinearMethod)
    assert isinstance(down.quant_method, PackedLinearMethod)
    assert type(o.quant_method) is UnquantizedLinearMethod
    partial = GPTQConfig(4, 32, modules_in_block_to_quantize=["mlp.gate_proj"])
    with pytest.raises(ValueError, match="modules_in_block_to_quantize names only part"):
        MergedColumnParallelLinear(128, [32, 64], quant_config=partial, prefix="l.mlp.gate_up_proj")
