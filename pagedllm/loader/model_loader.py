"""`load_model`: the model class from the registry, built in its dtype on the device, then
its weights filled by the loader of `model_config.load_format`, then each layer's quantization
method's `process_weights_after_loading`. The quantization config is the one the checkpoint's
config.json names (`quantization_config.quant_method`, see `quantization_config_from_hf`).

Load formats are registered by name as `module:function`, imported lazily; each function has
the signature `(model: nn.Module, model_config: ModelConfig) -> None` and fills every parameter.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn

from pagedllm.attention.backend import AttentionBackend
from pagedllm.config import KernelConfig, ModelConfig, ParallelConfig
from pagedllm.layers.quantization.base import QuantizeMethodBase, quantization_config_from_hf
from pagedllm.models.interface import CausalLM
from pagedllm.models.registry import resolve_model_cls
from pagedllm.models.utils import make_context

WeightsLoader = Callable[[nn.Module, ModelConfig], None]

_LOAD_FORMATS: dict[str, str] = {
    "auto": "pagedllm.loader.safetensors:load_safetensors_weights",
    "safetensors": "pagedllm.loader.safetensors:load_safetensors_weights",
    "dummy": "pagedllm.loader.dummy:load_dummy_weights",
    "gguf": "pagedllm.loader.gguf:load_gguf_weights",
}

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register_load_format(name: str, target: str) -> None:
    """Registers `module:function` (a `WeightsLoader`) as load format `name`."""
    if ":" not in target:
        raise ValueError(f"target must be 'module:function', got {target!r}")
    _LOAD_FORMATS[name] = target


def available_load_formats() -> list[str]:
    return sorted(_LOAD_FORMATS)


def get_weights_loader(load_format: str) -> WeightsLoader:
    if load_format not in _LOAD_FORMATS:
        raise ValueError(
            f"unknown load format {load_format!r}; available: {', '.join(available_load_formats())}"
        )
    module_name, fn_name = _LOAD_FORMATS[load_format].split(":")
    return getattr(importlib.import_module(module_name), fn_name)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(
    model_config: ModelConfig,
    device: str | torch.device,
    attn_backend: type[AttentionBackend],
    kernel_config: KernelConfig | None = None,
    parallel_config: ParallelConfig | None = None,
) -> CausalLM:
    """The model of `model_config`, weights loaded, on `device`, in eval mode, built with a
    `ModelContext` of the attention backend and the kernel switches."""
    hf_config = model_config.hf_config
    architectures = [model_config.architecture, *(getattr(hf_config, "architectures", None) or [])]
    model_cls = resolve_model_cls([a for a in architectures if a], model_config.model_impl)
    if model_config.dtype not in _TORCH_DTYPES:
        raise ValueError(
            f"unsupported dtype {model_config.dtype!r}; use one of {list(_TORCH_DTYPES)}"
        )
    weights_loader = get_weights_loader(model_config.load_format)
    # NOTE: read before anything is allocated, so an unknown method fails fast.
    quant_config = quantization_config_from_hf(hf_config, model_config.quantization)
    # NOTE: parameters are allocated directly on the device in the target dtype (no float32
    # copy on the host first); they hold garbage until the weights loader fills them.
    with torch.device(device), _default_dtype(_TORCH_DTYPES[model_config.dtype]):
        ctx = make_context(hf_config, attn_backend, kernel_config, parallel_config, quant_config)
        model = model_cls(ctx)
    with torch.no_grad():
        weights_loader(model, model_config)
        # NOTE: on the device, so tensors a method creates there land next to the weights.
        with torch.device(device):
            process_weights_after_loading(model)
    return cast(CausalLM, model.eval())


def process_weights_after_loading(model: nn.Module) -> None:
    """Lets every layer's quantization method convert its loaded weights (repack, transpose,
    scales): `quant_method.process_weights_after_loading(module)`, once per module."""
    for module in model.modules():
        quant_method = getattr(module, "quant_method", None)
        if isinstance(quant_method, QuantizeMethodBase):
            quant_method.process_weights_after_loading(module)


def load_and_check_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """`model.load_weights(weights)`, then an error if any parameter was left unfilled. The
    checkpoint's KV-cache scales (`k_scale`, `v_scale`, ...) go to the attention layers
    (`attention.fp8_kv.load_kv_scales`), not to the model's `load_weights`."""
    from pagedllm.attention.fp8_kv import load_kv_scales, split_kv_scales
    from pagedllm.models.utils import pp_filter

    scales: dict[str, torch.Tensor] = {}
    weights = pp_filter(model, weights)  # NOTE: another pipeline stage's tensors are skipped
    loaded = cast(CausalLM, model).load_weights(split_kv_scales(weights, scales))
    load_kv_scales(model, scales)
    missing = sorted(name for name, _ in model.named_parameters() if name not in loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (", …" if len(missing) > 8 else "")
        raise ValueError(f"the checkpoint lacks {len(missing)} parameter(s) of the model: {shown}")
