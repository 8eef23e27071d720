"""The linear layers (pagedllm/layers/linear.py) and their quantization methods
(pagedllm/layers/quantization/) at tensor-parallel size 1, on the CPU.

Every layer against `F.linear` on fresh random inputs in fp32; the fused layers' weight loaders
(q/k/v and gate/up shards); the size attributes callers read instead of `weight.shape`; the
quantization-config registry; a test-defined method (a transposed weight, `x @ w`) used by the
layers and through `load_model`, which calls `process_weights_after_loading` once per layer after
the weights are loaded; and the GEMV switch of `UnquantizedLinearMethod`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.config import ModelConfig
from pagedllm.layers import fused, linear
from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from pagedllm.layers.quantization import (
    LinearMethodBase,
    QuantizationConfig,
    UnquantizedConfig,
    UnquantizedLinearMethod,
    available_quantization_configs,
    base,
    get_quantization_config,
    register_quantization_config,
    set_weight_attrs,
)
from pagedllm.loader import model_loader
from pagedllm.models import registry


def _fill(layer: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in layer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen))


def _x(rows: Sequence[int], cols: int, seed: int) -> torch.Tensor:
    return torch.randn(*rows, cols, generator=torch.Generator().manual_seed(seed))


def _layers(bias: bool) -> list[LinearBase]:
    return [
        ReplicatedLinear(24, 40, bias=bias),
        ColumnParallelLinear(24, 40, bias=bias),
        ColumnParallelLinear(24, 40, bias=bias, gather_output=True),
        MergedColumnParallelLinear(24, [16, 24], bias=bias),
        QKVParallelLinear(24, 8, 4, 2, bias=bias),
        RowParallelLinear(24, 40, bias=bias),
        RowParallelLinear(24, 40, bias=bias, reduce_results=False),
    ]


# --- every layer is F.linear ------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [(1,), (3,), (2, 5), (17,)])
def test_every_layer_is_f_linear(bias: bool, rows: tuple[int, ...]) -> None:
    for i, layer in enumerate(_layers(bias)):
        _fill(layer, seed=i)
        x = _x(rows, layer.input_size_per_partition, seed=100 + i + len(rows))
        y = layer(x)
        assert y.shape == (*rows, layer.output_size_per_partition)
        assert torch.equal(y, F.linear(x, layer.weight, layer.bias)), type(layer).__name__
        assert isinstance(layer.quant_method, UnquantizedLinearMethod)


@pytest.mark.parametrize("bias", [False, True])
def test_forward_silu_mul_is_silu_and_mul_then_linear(bias: bool) -> None:
    layer = RowParallelLinear(24, 40, bias=bias)
    _fill(layer, seed=3)
    gate_up = _x((5,), 48, seed=4)
    expected = F.linear(SiluAndMul()(gate_up), layer.weight, layer.bias)
    assert torch.equal(layer.forward_silu_mul(gate_up), expected)
    assert torch.equal(layer.forward_silu_mul(gate_up), layer(SiluAndMul()(gate_up)))


def test_sizes_without_weight_shape() -> None:
    """The attributes warm-up and callers read; at tp 1 the partition is the whole layer."""
    cases: list[tuple[LinearBase, list[int]]] = [
        (ReplicatedLinear(24, 40), [40]),
        (ColumnParallelLinear(24, 40), [40]),
        (MergedColumnParallelLinear(24, [16, 24]), [16, 24]),
        (QKVParallelLinear(24, 8, 4, 2), [32, 16, 16]),
        (RowParallelLinear(24, 40), [40]),
    ]
    for layer, parts in cases:
        assert (layer.input_size, layer.input_size_per_partition) == (24, 24)
        assert layer.output_partition_sizes == parts
        assert layer.output_size == layer.output_size_per_partition == sum(parts)
        assert layer.params_dtype == torch.get_default_dtype()
        assert layer.weight.shape == (sum(parts), 24)
        assert layer.prefix == ""
    layer = ReplicatedLinear(8, 4, bias=True, params_dtype=torch.bfloat16, prefix="a.b")
    assert layer.weight.dtype == layer.bias.dtype == layer.params_dtype == torch.bfloat16
    assert layer.prefix == "a.b"


def test_parameter_order_and_requires_grad() -> None:
    """Checkpoints load by name; the dummy loader fills in registration order (weight first)."""
    layer = QKVParallelLinear(24, 8, 4, 2, bias=True)
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    assert not any(p.requires_grad for p in layer.parameters())
    assert [name for name, _ in ReplicatedLinear(2, 3).named_parameters()] == ["weight"]


# --- weight loaders -------------------------------------------------------------------


def test_qkv_weight_loader_fills_shards() -> None:
    layer = QKVParallelLinear(24, 8, 4, 2, bias=True)  # q: 32 rows, k and v: 16 each
    q, k, v = _x((32,), 24, 1), _x((16,), 24, 2), _x((16,), 24, 3)
    qb, kb, vb = _x((), 32, 4), _x((), 16, 5), _x((), 16, 6)
    for sid, w, b in (("v", v, vb), ("q", q, qb), ("k", k, kb)):  # any order
        layer.weight.weight_loader(layer.weight, w, sid)
        layer.bias.weight_loader(layer.bias, b, sid)
    assert torch.equal(layer.weight, torch.cat([q, k, v]))
    assert torch.equal(layer.bias, torch.cat([qb, kb, vb]))
    fused_w = _x((64,), 24, 7)  # an already-fused checkpoint tensor
    layer.weight.weight_loader(layer.weight, fused_w)
    assert torch.equal(layer.weight, fused_w)
    with pytest.raises(ValueError, match="'q', 'k' or 'v'"):
        layer.weight.weight_loader(layer.weight, q, "x")
    with pytest.raises(ValueError, match="does not match"):
        layer.weight.weight_loader(layer.weight, k, "q")


def test_merged_weight_loader_fills_gate_and_up() -> None:
    layer = MergedColumnParallelLinear(24, [16, 24], bias=True)
    gate, up = _x((16,), 24, 1), _x((24,), 24, 2)
    layer.weight.weight_loader(layer.weight, up, 1)
    layer.weight.weight_loader(layer.weight, gate, 0)
    layer.bias.weight_loader(layer.bias, torch.arange(24.0), 1)
    layer.bias.weight_loader(layer.bias, -torch.arange(16.0), 0)
    assert torch.equal(layer.weight[:16], gate) and torch.equal(layer.weight[16:], up)
    assert torch.equal(layer.bias, torch.cat([-torch.arange(16.0), torch.arange(24.0)]))
    fused_w = _x((40,), 24, 3)
    layer.weight.weight_loader(layer.weight, fused_w)
    assert torch.equal(layer.weight, fused_w)
    with pytest.raises(ValueError, match="shard_id must index"):
        layer.weight.weight_loader(layer.weight, gate, 2)


def test_unfused_weight_loaders() -> None:
    for layer in (ReplicatedLinear(24, 40, True), ColumnParallelLinear(24, 40, True)):
        w, b = _x((40,), 24, 1), _x((), 40, 2)
        layer.weight.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        assert torch.equal(layer.weight, w) and torch.equal(layer.bias, b)
        with pytest.raises(ValueError, match="not fused"):
            layer.weight.weight_loader(layer.weight, w, 0)
    row = RowParallelLinear(24, 40, True)
    w, b = _x((40,), 24, 3), _x((), 40, 4)
    row.weight.weight_loader(row.weight, w)
    row.bias.weight_loader(row.bias, b)
    assert torch.equal(row.weight, w) and torch.equal(row.bias, b)
    with pytest.raises(ValueError, match="does not match"):
        row.weight.weight_loader(row.weight, w[:, :12])


# --- the registry ---------------------------------------------------------------------


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "_QUANTIZATION_CONFIGS", dict(base._QUANTIZATION_CONFIGS))


def test_registry_unknown_name_lists_the_known_ones(clean_registry: None) -> None:
    register_quantization_config("transposed", TransposedConfig)
    names = available_quantization_configs()
    assert {"transposed", "unquantized", "gptq", "awq"} <= set(names) and names == sorted(names)
    with pytest.raises(ValueError, match=rf"'nope'.*available: {', '.join(names)}$"):
        get_quantization_config("nope")


def test_registry_lazy_and_decorator(clean_registry: None) -> None:
    assert get_quantization_config("unquantized") is UnquantizedConfig
    register_quantization_config("lazy", "tests.layers.test_linear:TransposedConfig")
    assert get_quantization_config("lazy") is TransposedConfig

    @register_quantization_config("decorated")
    class Decorated(TransposedConfig):
        name: ClassVar[str] = "decorated"

    assert get_quantization_config("decorated") is Decorated
    with pytest.raises(ValueError, match="module:Class"):
        register_quantization_config("bad", "no_colon")
    with pytest.raises(TypeError, match="not a QuantizationConfig"):
        register_quantization_config("bad", int)  # type: ignore[arg-type]


def test_set_weight_attrs_refuses_to_overwrite() -> None:
    p = nn.Parameter(torch.empty(2), requires_grad=False)
    set_weight_attrs(p, {"weight_loader": print})
    with pytest.raises(ValueError, match="weight_loader"):
        set_weight_attrs(p, {"weight_loader": print})


# --- a new method is one class ----------------------------------------------------------


class TransposedLinearMethod(LinearMethodBase):
    """Loads `[out, in]` as the checkpoint has it, then keeps `weight [in, out]`: `x @ w + b`."""

    def __init__(self, calls: list[tuple[str, bool]]) -> None:
        self.calls = calls

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: Sequence[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        # NaN until loaded: `process_weights_after_loading` records whether the loader ran.
        shape = (sum(output_partition_sizes), input_size_per_partition)
        weight = nn.Parameter(torch.full(shape, torch.nan, dtype=params_dtype), False)
        set_weight_attrs(weight, extra_weight_attrs)
        layer.register_parameter("weight", weight)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        loaded = not bool(layer.weight.isnan().any())
        self.calls.append((layer.prefix, loaded))
        layer.weight = nn.Parameter(layer.weight.t().contiguous(), requires_grad=False)

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        y = x @ layer.weight
        return y if bias is None else y + bias


class TransposedConfig(QuantizationConfig):
    """Every layer transposed, except those whose prefix ends in ".skip" (unquantized)."""

    name: ClassVar[str] = "transposed"

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.prefixes: list[str] = []

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        self.prefixes.append(prefix)
        return None if prefix.endswith(".skip") else TransposedLinearMethod(self.calls)


@pytest.mark.parametrize("bias", [False, True])
def test_a_test_method_computes_every_layer(bias: bool) -> None:
    config = TransposedConfig()
    layers: list[LinearBase] = [
        ReplicatedLinear(24, 40, bias, quant_config=config, prefix="m.rep"),
        ColumnParallelLinear(24, 40, bias, quant_config=config, prefix="m.col"),
        MergedColumnParallelLinear(24, [16, 24], bias, quant_config=config, prefix="m.gate_up"),
        QKVParallelLinear(24, 8, 4, 2, bias, quant_config=config, prefix="m.qkv"),
        RowParallelLinear(24, 40, bias, quant_config=config, prefix="m.down"),
    ]
    assert config.prefixes == ["m.rep", "m.col", "m.gate_up", "m.qkv", "m.down"]
    for i, layer in enumerate(layers):
        assert isinstance(layer.quant_method, TransposedLinearMethod)
        full = _x((layer.output_size,), layer.input_size, seed=i)
        layer.weight.weight_loader(layer.weight, full)  # the fused layers split it by part
        if bias:
            layer.bias.weight_loader(layer.bias, _x((), layer.output_size, seed=50 + i))
        layer.quant_method.process_weights_after_loading(layer)
        assert layer.weight.shape == (layer.input_size, layer.output_size)
        x = _x((3,), layer.input_size, seed=20 + i)
        torch.testing.assert_close(layer(x), F.linear(x, full, layer.bias), rtol=1e-6, atol=1e-6)
    assert config.calls == [(p, True) for p in config.prefixes]
    gate_up = _x((2,), 48, seed=9)
    expected = F.linear(SiluAndMul()(gate_up), layers[-1].weight.t(), layers[-1].bias)
    torch.testing.assert_close(layers[-1].forward_silu_mul(gate_up), expected, rtol=1e-6, atol=1e-6)
    skipped = ReplicatedLinear(4, 4, quant_config=config, prefix="m.skip")
    assert isinstance(skipped.quant_method, UnquantizedLinearMethod)


class TinyQuantLM(nn.Module):
    """Two linears built with `TransposedConfig` (the load path needs nothing more)."""

    config = TransposedConfig()

    def __init__(self, *args: object) -> None:
        super().__init__()
        self.up = ColumnParallelLinear(8, 12, True, quant_config=self.config, prefix="up")
        self.down = RowParallelLinear(12, 8, quant_config=self.config, prefix="down")
        self.plain = ReplicatedLinear(8, 8, prefix="plain")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x))


def test_load_model_calls_process_weights_after_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._MODELS, "TinyQuantLM", "tests.layers.test_linear:TinyQuantLM")
    monkeypatch.setattr(TinyQuantLM, "config", TransposedConfig())
    plain_calls: list[str] = []

    def record(self: UnquantizedLinearMethod, layer: nn.Module) -> None:
        plain_calls.append(layer.prefix)

    monkeypatch.setattr(UnquantizedLinearMethod, "process_weights_after_loading", record)
    hf_config = SimpleNamespace(architectures=["TinyQuantLM"])
    model_config = ModelConfig(
        model="tiny",
        tokenizer=None,
        dtype="float32",
        max_model_len=16,
        seed=0,
        load_format="dummy",
        architecture="TinyQuantLM",
        vocab_size=1,
        hidden_size=8,
        num_layers=1,
        num_attention_heads=1,
        num_kv_heads=1,
        head_dim=8,
        hf_config=hf_config,
    )
    model = model_loader.load_model(model_config, "cpu", None)  # type: ignore[arg-type]
    assert isinstance(model, TinyQuantLM)
    assert TinyQuantLM.config.calls == [("up", True), ("down", True)], "once each, after loading"
    assert plain_calls == ["plain"]
    assert model.up.weight.shape == (8, 12) and model.down.weight.shape == (12, 8)
    x = _x((2,), 8, seed=0)
    expected = F.linear(F.linear(x, model.up.weight.t(), model.up.bias), model.down.weight.t())
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)


# --- the GEMV switch --------------------------------------------------------------------


def _silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


class _FakeGemv:
    """Stands in for `gemv_kernels` (no Triton here): accepts everything, counts launches."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def supports(self, x: torch.Tensor, w: torch.Tensor, b: object, *, silu_mul: bool) -> bool:
        return True

    def wins(self, m: int, n: int, k: int, act: str) -> bool:
        return True

    def gemv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        self.calls.append("gemv")
        return F.linear(x, w, b)

    def gemv_silu_mul(
        self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
    ) -> torch.Tensor:
        self.calls.append("gemv_silu_mul")
        return F.linear(_silu_and_mul(x), w, b)


@pytest.fixture
def fake_gemv(monkeypatch: pytest.MonkeyPatch) -> Iterator[_FakeGemv]:
    fake = _FakeGemv()
    monkeypatch.setattr(fused, "enabled", lambda x, switch=None: True)
    monkeypatch.setattr(fused, "gemv_kernels", lambda: fake)
    # `enabled` is also SiluAndMul's switch: its fused kernel becomes the eager op.
    monkeypatch.setattr(fused, "kernels", lambda: SimpleNamespace(silu_and_mul=_silu_and_mul))
    monkeypatch.setenv("PAGEDLLM_GEMV", "0")
    fused.gemv_enabled.cache_clear()
    yield fake
    fused.gemv_enabled.cache_clear()


@pytest.mark.parametrize(("use_gemv", "launches"), [(None, 0), (False, 0), (True, 2)])
def test_use_gemv_switch(fake_gemv: _FakeGemv, use_gemv: bool | None, launches: int) -> None:
    """None follows `PAGEDLLM_GEMV` (0 here); a bool overrides it."""
    config = UnquantizedConfig(use_gemv=use_gemv)
    layer = RowParallelLinear(24, 40, True, quant_config=config)
    _fill(layer, seed=1)
    assert layer.quant_method.use_gemv is use_gemv
    x, gate_up = _x((1,), 24, seed=2), _x((1,), 48, seed=3)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    expected = F.linear(_silu_and_mul(gate_up), layer.weight, layer.bias)
    assert torch.equal(layer.forward_silu_mul(gate_up), expected)
    assert fake_gemv.calls == ["gemv", "gemv_silu_mul"][:launches]
    big = _x((linear.GEMV_MAX_M + 1,), 24, seed=4)
    assert torch.equal(layer(big), F.linear(big, layer.weight, layer.bias))
    assert len(fake_gemv.calls) == launches, "more than GEMV_MAX_M rows: F.linear"


def test_use_gemv_none_follows_the_environment(
    fake_gemv: _FakeGemv, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = ReplicatedLinear(24, 40)
    _fill(layer, seed=1)
    monkeypatch.setenv("PAGEDLLM_GEMV", "1")
    fused.gemv_enabled.cache_clear()
    x = _x((1,), 24, seed=2)
    assert torch.equal(layer(x), F.linear(x, layer.weight))
    assert fake_gemv.calls == ["gemv"]


@pytest.mark.parametrize("gemv", [False, True])
def test_the_engines_gemv_switch_reaches_quantized_methods(gemv: bool) -> None:
    """`KernelConfig.gemv` (`--gemv` / PAGEDLLM_GEMV) decides for a quantized layer's method
    too, not only for unquantized ones."""
    from types import SimpleNamespace

    from pagedllm.attention.backend import get_attention_backend
    from pagedllm.config import KernelConfig
    from pagedllm.layers.linear import ColumnParallelLinear
    from pagedllm.layers.quantization import quantization_config_from_hf
    from pagedllm.models.utils import make_context

    quant = quantization_config_from_hf(SimpleNamespace(), "fp8")
    kernels = KernelConfig(fused_ops=True, gemv=gemv)
    ctx = make_context(
        SimpleNamespace(), get_attention_backend("torch", "cpu"), kernels, None, quant
    )
    layer = ColumnParallelLinear(64, 32, quant_config=ctx.quant_config, prefix="x")
    assert type(layer.quant_method).__name__ == "Fp8OnlineLinearMethod"
    assert layer.quant_method.use_gemv is gemv
