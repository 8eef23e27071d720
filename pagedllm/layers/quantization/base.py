"""The quantization interface of the layers, and the registry of quantization configs by name.

A `QuantizationConfig` (one per model: a checkpoint's quantization settings) picks the method of
every linear layer from the layer and its dotted name (`prefix`). A `LinearMethodBase` owns a
linear layer's weights and its product: `create_weights` registers the layer's parameters (named
as in the checkpoint, each carrying the layer's `weight_loader`), `process_weights_after_loading`
converts them once the checkpoint is loaded (repacking, transposing, scales), and `apply` computes
`x @ W^T + bias` from them. The layer keeps its tensor-parallel split, its bias and its
collectives, so a new quantization method is one file: a config and its linear method.

Configs are registered by name (`register_quantization_config`), as `module:Class` imported on
first use or as a class; `get_quantization_config(name)` returns the class.
`quantization_config_from_hf(hf_config)` builds the one a checkpoint's config.json names
(`quantization_config.quant_method`), through the class's `from_config`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar, overload

import torch
from torch import nn

from pagedllm.layers.activation import SiluAndMul


def set_weight_attrs(weight: torch.Tensor, weight_attrs: Mapping[str, Any] | None) -> None:
    """Sets each of `weight_attrs` (e.g. `weight_loader`) as an attribute of `weight`."""
    for key, value in (weight_attrs or {}).items():
        if hasattr(weight, key):
            raise ValueError(f"the parameter already has attribute {key!r}")
        setattr(weight, key, value)


class QuantizeMethodBase:
    """What the loader sees of a layer's method (linear now; MoE methods will derive from it)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Converts `layer`'s loaded weights for `apply`; called once, after the checkpoint is
        loaded (by `pagedllm.loader.model_loader.load_model`). Default: nothing to do."""


class LinearMethodBase(QuantizeMethodBase, ABC):
    """Creates a linear layer's weights and computes `apply(layer, x, bias) = x @ W^T + bias`."""

    # The activation `apply_silu_mul` runs when the method does not fold it into its kernel
    # (a method built with the engine's kernel switches gives it its own).
    silu_and_mul: SiluAndMul = SiluAndMul()

    @abstractmethod
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
        """Registers `layer`'s weight parameter(s) for this rank's part of the product.

        `output_partition_sizes` are this rank's output features of each fused part (one entry
        for an unfused layer); `input_size`/`output_size` are the whole layer's. `params_dtype`
        is the model's (activation) dtype. Every parameter a checkpoint fills gets
        `extra_weight_attrs` (`set_weight_attrs`): the layer passes its `weight_loader`.
        """

    @abstractmethod
    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`x [..., input_size_per_partition] -> [..., output_size_per_partition]`."""

    def apply_silu_mul(
        self, layer: nn.Module, gate_up: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`apply(layer, silu_and_mul(gate_up), bias)` for `gate_up [..., 2 * input]` (gate,
        then up). A method may fold the activation into its kernel."""
        return self.apply(layer, self.silu_and_mul(gate_up), bias)


class QuantizationConfig(ABC):
    """A checkpoint's quantization settings: which method each layer computes with."""

    # The name it is registered under (as `--quantization` will take it).
    name: ClassVar[str]
    # The engine's GEMV switch (`KernelConfig.gemv`), set by `models.utils.make_context` and
    # given to the layers' methods; None: the environment's (`PAGEDLLM_GEMV`).
    use_gemv: bool | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> QuantizationConfig:
        """The config of a checkpoint's `quantization_config` (config.json's dict)."""
        raise ValueError(f"quantization method {cls.name!r} is not read from checkpoints")

    @classmethod
    def for_unquantized_checkpoint(cls, hf_config: Any) -> QuantizationConfig:
        """The config that quantizes an unquantized checkpoint at load (`--quantization`)."""
        raise ValueError(
            f"quantization method {cls.name!r} needs a checkpoint quantized with it; it cannot "
            "quantize an unquantized checkpoint at load"
        )

    def weight_bytes_per_param(self, dtype_size: int) -> float:
        """Bytes a quantized linear's weight takes per parameter as its kernel reads it (scales
        and zeros included), for the benchmarks' memory bounds; `dtype_size`: the model dtype's."""
        return float(dtype_size)

    @abstractmethod
    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        """The method of `layer`, whose dotted name is `prefix` (e.g.
        "model.layers.0.self_attn.qkv_proj"); None leaves it unquantized."""


_C = TypeVar("_C", bound=type[QuantizationConfig])

# name -> "module:Class" (imported on first use) or the class itself.
_QUANTIZATION_CONFIGS: dict[str, str | type[QuantizationConfig]] = {
    "unquantized": "pagedllm.layers.quantization.unquantized:UnquantizedConfig",
    "gptq": "pagedllm.layers.quantization.gptq:GPTQConfig",
    "awq": "pagedllm.layers.quantization.awq:AWQConfig",
    "compressed-tensors": (
        "pagedllm.layers.quantization.compressed_tensors:CompressedTensorsConfig"
    ),
    "fp8": "pagedllm.layers.quantization.fp8:Fp8Config",
}


@overload
def register_quantization_config(name: str) -> Callable[[_C], _C]: ...
@overload
def register_quantization_config(name: str, target: str | type[QuantizationConfig]) -> None: ...


def register_quantization_config(
    name: str, target: str | type[QuantizationConfig] | None = None
) -> Callable[[_C], _C] | None:
    """Registers `target` (`module:Class`, imported lazily, or a class) as config `name`;
    without `target`, a class decorator that registers the class it decorates."""
    if target is None:

        def decorator(cls: _C) -> _C:
            register_quantization_config(name, cls)
            return cls

        return decorator
    if isinstance(target, str):
        if ":" not in target:
            raise ValueError(f"target must be 'module:Class', got {target!r}")
    elif not (isinstance(target, type) and issubclass(target, QuantizationConfig)):
        raise TypeError(f"{target!r} is not a QuantizationConfig subclass")
    _QUANTIZATION_CONFIGS[name] = target
    return None


def available_quantization_configs() -> list[str]:
    return sorted(_QUANTIZATION_CONFIGS)


def get_quantization_config(name: str) -> type[QuantizationConfig]:
    """The config class registered as `name`; a ValueError naming the known ones otherwise."""
    if name not in _QUANTIZATION_CONFIGS:
        raise ValueError(
            f"unknown quantization method {name!r}; available: "
            f"{', '.join(available_quantization_configs())}"
        )
    target = _QUANTIZATION_CONFIGS[name]
    if isinstance(target, str):
        module_name, cls_name = target.split(":")
        target = getattr(importlib.import_module(module_name), cls_name)
        assert isinstance(target, type) and issubclass(target, QuantizationConfig), target
    return target


def quantization_config_from_hf(
    hf_config: Any, quantization: str | None = None
) -> QuantizationConfig | None:
    """The config of the checkpoint's `quantization_config` (config.json), None without one.

    `quantization` (`--quantization`) names a method: the checkpoint's own (checked), or one that
    quantizes an unquantized checkpoint at load (`for_unquantized_checkpoint`, e.g. "fp8"); a
    checkpoint quantized with another method is a ValueError.

    transformers may keep it as a dict or as its own config object (`to_dict()`); its
    `quant_method` names the registered config, whose `from_config` reads the rest. An unknown
    method is a ValueError naming it and the registered ones.
    """
    raw = getattr(hf_config, "quantization_config", None)
    if quantization is not None:
        cls = get_quantization_config(quantization)
        if raw is None:
            return cls.for_unquantized_checkpoint(hf_config)
        checkpoint = quantization_config_from_hf(hf_config)
        if checkpoint is None or checkpoint.name != cls.name:
            name = getattr(checkpoint, "name", None)
            raise ValueError(
                f"quantization={quantization!r}, but the checkpoint is quantized with {name!r}"
            )
        return checkpoint
    if raw is None:
        return None
    config = raw if isinstance(raw, Mapping) else raw.to_dict()
    # NOTE: transformers' config objects hold str enums (QuantizationMethod.GPTQ): their value.
    method = getattr(config.get("quant_method"), "value", config.get("quant_method"))
    if not method:
        raise ValueError(f"the checkpoint's quantization_config has no quant_method: {config}")
    return get_quantization_config(str(method).lower()).from_config(config)
