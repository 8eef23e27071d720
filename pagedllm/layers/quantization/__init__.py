"""Quantization methods of the layers: the interface and registry (`base`) and one module per
method (`unquantized`: F.linear and the GEMV; `gptq`, `awq`: packed integer weights, with
`packed` their shared loading and dequantization; `compressed_tensors`: the compressed-tensors
schemes; `fp8`: FP8 checkpoints, FP8 at load, and the exact W8A8 activation quantization).
Further methods are imported on first use."""

from pagedllm.layers.quantization.base import (
    LinearMethodBase,
    QuantizationConfig,
    QuantizeMethodBase,
    available_quantization_configs,
    get_quantization_config,
    quantization_config_from_hf,
    register_quantization_config,
    set_weight_attrs,
)
from pagedllm.layers.quantization.unquantized import UnquantizedConfig, UnquantizedLinearMethod

__all__ = [
    "LinearMethodBase",
    "QuantizationConfig",
    "QuantizeMethodBase",
    "UnquantizedConfig",
    "UnquantizedLinearMethod",
    "available_quantization_configs",
    "get_quantization_config",
    "quantization_config_from_hf",
    "register_quantization_config",
    "set_weight_attrs",
]
