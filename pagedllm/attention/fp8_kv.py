"""The FP8 KV cache (`--kv-cache-dtype fp8`): the torch dtypes of the cache dtype names, the
quantization that the cache writes apply and the dequantization that the reads apply, and the
per-layer scales taken from a checkpoint.

A layer's K (and V) rows are stored as `e4m3(clamp(x / k_scale, -448, 448))`: one fp32 scale
per layer and tensor (`Attention.k_scale`, `Attention.v_scale`; 1.0 unless the checkpoint
gives one), a saturating cast (E4M3 has no infinity: an overflow would be NaN). A read gives
`e4m3 value * scale`. The torch functions here are the oracle of the Triton write
(`triton/cache.py`) and reads (`triton/kernels.py`), which fold the scales into the scores and
the output instead of dequantizing every element.

NOTE: CPU torch implements no indexing ops (`index_copy_`, `index_select`) for float8 tensors:
the torch path moves FP8 rows as their bytes (`as_bytes`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from pagedllm.attention.kv_scale_names import kv_scale_target

logger = logging.getLogger(__name__)

FP8_E4M3_MAX = 448.0
_MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FP8_DTYPES = {"fp8_e4m3": "float8_e4m3fn"}


def kv_cache_torch_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype of a KV cache dtype name (`CacheConfig.kv_cache_dtype`), checked against
    this torch build and device: a `ValueError` naming `kv_cache_dtype` when it cannot run."""
    return _torch_dtype(name, torch.device(device))


@functools.cache
def _torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name in _MODEL_DTYPES:
        return _MODEL_DTYPES[name]
    if name not in _FP8_DTYPES:
        known = ", ".join([*_MODEL_DTYPES, *_FP8_DTYPES])
        raise ValueError(f"kv_cache_dtype {name!r} is not a cache dtype (known: {known})")
    dtype = getattr(torch, _FP8_DTYPES[name], None)
    if dtype is None:
        raise ValueError(
            f"kv_cache_dtype={name!r} needs torch.{_FP8_DTYPES[name]}, which this torch build "
            f"({torch.__version__}) lacks; use kv_cache_dtype='auto'"
        )
    try:
        torch.ones(2, device=device).to(dtype).float()
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"kv_cache_dtype={name!r}: torch cannot convert to {dtype} on {device} ({e}); "
            "use kv_cache_dtype='auto'"
        ) from e
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(
            f"kv_cache_dtype={name!r} needs a GPU of compute capability 8.9 or newer (FP8 "
            f"conversions), this one is {torch.cuda.get_device_capability(device)}"
        )
    return dtype


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


def kernel_scales(
    kv_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    placeholder: torch.Tensor,
) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(is the cache FP8, its K scale, its V scale) for a cache-writing kernel: missing scales
    are 1.0 on the cache's device; without FP8, `placeholder` (a pointer the kernel ignores)."""
    if not is_fp8(kv_cache.dtype):
        return False, placeholder, placeholder
    one = torch.ones((), dtype=torch.float32, device=kv_cache.device)
    return True, one if k_scale is None else k_scale, one if v_scale is None else v_scale


def as_bytes(x: torch.Tensor) -> torch.Tensor:
    """An FP8 tensor's bytes (uint8, same shape), for the indexing ops CPU float8 lacks; any
    other tensor as it is."""
    return x.view(torch.uint8) if is_fp8(x.dtype) else x


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """`x` as the cache stores it: in FP8, `e4m3(clamp(x / scale, ±448))` in fp32 arithmetic;
    in any other cache dtype a plain cast (the scale is unused)."""
    if not is_fp8(dtype):
        return x.to(dtype)
    y = x.float() if scale is None else x.float() / scale.float()
    max_value = torch.finfo(dtype).max
    return y.clamp(-max_value, max_value).to(dtype)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows back in `dtype`: FP8 rows times their scale (in fp32, then cast)."""
    if not is_fp8(x.dtype):
        return x.to(dtype)
    y = x.float() if scale is None else x.float() * scale.float()
    return y.to(dtype)


def default_scale() -> torch.Tensor:
    """A layer's scale before a checkpoint sets it: 1.0, fp32, on the current default device."""
    return torch.ones((), dtype=torch.float32)


def split_kv_scales(
    weights: Iterable[tuple[str, torch.Tensor]], scales: dict[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors without its attention scales (`kv_scale_names`), which are put
    in `scales` by name as they pass (for `load_kv_scales` once the stream is consumed)."""
    for name, tensor in weights:
        if kv_scale_target(name) is None:
            yield name, tensor
        else:
            scales[name] = tensor


def load_kv_scales(model: nn.Module, scales: dict[str, torch.Tensor]) -> None:
    """Sets each attention layer's `k_scale` / `v_scale` from the checkpoint's scale tensors.

    A tensor's attention block prefix (`model.layers.3.self_attn`) names the layer whose own
    prefix, or its parent module's, equals it or ends with it (a wrapper's prefix may add a
    leading part). Scales must be one positive finite number per tensor (per-head scales are
    refused); a K/V scale that names no attention layer is a `ValueError`."""
    from pagedllm.attention.layer import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    for name, tensor in scales.items():
        target = kv_scale_target(name)
        assert target is not None
        block, which = target
        if not which:
            logger.debug("dropped %s: queries are not quantized", name)
            continue
        layer = _layer_for(layers, block, name)
        value = _scalar_scale(name, tensor)
        for part in which:
            getattr(layer, f"{part}_scale").fill_(value)


def _layer_for(layers: list, block: str, name: str):  # type: ignore[no-untyped-def]
    found = []
    for layer in layers:
        candidates = (layer.prefix, layer.prefix.rpartition(".")[0])
        if any(c == block or c.endswith("." + block) for c in candidates if c):
            found.append(layer)
    if len(found) != 1:
        what = "no attention layer" if not found else f"{len(found)} attention layers"
        raise ValueError(f"checkpoint KV-cache scale {name!r} matches {what} of the model")
    return found[0]


def _scalar_scale(name: str, tensor: torch.Tensor) -> float:
    if tensor.numel() != 1:
        raise ValueError(
            f"checkpoint KV-cache scale {name!r} has shape {tuple(tensor.shape)}: only one "
            "scale per tensor is supported (kv_cache_scheme strategy 'tensor')"
        )
    value = float(tensor.float().reshape(()))
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"checkpoint KV-cache scale {name!r} is {value}: it must be positive")
    return value
