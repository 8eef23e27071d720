"""compressed-tensors checkpoints (`quant_method: "compressed-tensors"`, as the `compressed-tensors`
package / llm-compressor writes them).

The config's `config_groups` each name `targets` ("Linear", a layer name, or "re:<regex>" over the
checkpoint's layer names), `weights` and `input_activations` (QuantizationArgs: `num_bits`,
`type` int/float, `symmetric`, `strategy` tensor/channel/group/token, `group_size`, `dynamic`)
and a `format` (else the config's). `ignore` lists layers left unquantized (names or "re:").
Schemes read, per linear:
- W4A16 / W8A16 int, "pack-quantized": `weight_packed` int32 `[output, input * bits / 32]` (input
  feature `j` of a word at bits `j * bits`, stored as `q + 2 ** (bits - 1)`), `weight_scale
  [output, groups]` (channel: `[output, 1]`), `weight_shape`, and when asymmetric
  `weight_zero_point` packed the same way along the output `[output * bits / 32, groups]`;
  `W = (q - zero) * scale` of each group: the W4A16 kernel on CUDA (repacked along the input),
  else dequantized once (as `gptq`/`awq`, see `packed`);
- W8A16 FP8, "float-quantized": `weight` e4m3 and `weight_scale` per tensor or per channel;
- W8A8 FP8 ("float-quantized") and W8A8 int8 ("int-quantized"/"naive-quantized", int8 `weight`):
  the same weights plus activations quantized per token (dynamic) or by the static per-tensor
  `input_scale`, emulated exactly (`fp8.ActQuantLinearMethod`).
Anything else (activation or weight orders, asymmetric activations, other bit widths, block
weights here) is a ValueError naming the combination.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from pagedllm.layers.quantization.base import LinearMethodBase, QuantizationConfig
from pagedllm.layers.quantization.fp8 import (
    FP8_DTYPE,
    ActQuantLinearMethod,
    ActScheme,
    add_part_scalar,
    dummy_input_scale,
    per_part_columns,
    weight_scale_dummy,
)
from pagedllm.layers.quantization.packed import (
    CHANNEL_GROUP,
    FUSED_LAYER_NAMES,
    IntWeights,
    PackedLayout,
    PackedLinearMethod,
    add_packed_param,
    dummy_scale,
    pack_int_weights,
    unpack_int32,
)

INT_FORMATS = ("int-quantized", "naive-quantized")


@dataclass(frozen=True)
class QuantArgs:
    """The fields of a compressed-tensors QuantizationArgs that the schemes read."""

    num_bits: int
    type: str
    symmetric: bool
    strategy: str
    group_size: int | None
    dynamic: bool
    actorder: Any

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantArgs:
        return cls(
            num_bits=int(d.get("num_bits", 8)),
            type=str(d.get("type", "int")),
            symmetric=bool(d.get("symmetric", True)),
            strategy=str(d.get("strategy") or "tensor"),
            group_size=d.get("group_size"),
            dynamic=bool(d.get("dynamic", False)),
            actorder=d.get("actorder"),
        )

    def describe(self) -> str:
        sym = "sym" if self.symmetric else "asym"
        group = f"/{self.group_size}" if self.strategy == "group" else ""
        dyn = " dynamic" if self.dynamic else ""
        return f"{self.type}{self.num_bits} {self.strategy}{group} {sym}{dyn}"


@dataclass(frozen=True)
class Scheme:
    """One config group: what it targets and how its layers are quantized."""

    targets: tuple[str, ...]
    weights: QuantArgs
    input_activations: QuantArgs | None
    format: str


def _matches(name: str, patterns: Sequence[str], layer_kind: str = "Linear") -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern == layer_kind or name == pattern or name.endswith(f".{pattern}"):
            return True
    return False


def _checkpoint_names(prefix: str) -> list[str]:
    """The checkpoint's layer names that our (possibly fused) layer `prefix` holds."""
    head, _, last = prefix.rpartition(".")
    return [f"{head}.{p}" if head else p for p in FUSED_LAYER_NAMES.get(last, (last,))]


class CompressedTensorsConfig(QuantizationConfig):
    """`quant_method: "compressed-tensors"`: config groups, their format, the ignore list."""

    name: ClassVar[str] = "compressed-tensors"

    def __init__(self, schemes: Sequence[Scheme], ignore: Sequence[str] = ()) -> None:
        self.schemes = list(schemes)
        self.ignore = list(ignore)
        for scheme in self.schemes:
            _check_scheme(scheme)  # NOTE: an unsupported combination fails before loading

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> CompressedTensorsConfig:
        if config.get("sparsity_config"):
            raise ValueError("compressed-tensors sparsity is not supported")
        if config.get("transform_config"):
            raise ValueError("compressed-tensors transforms are not supported")
        # NOTE: a `kv_cache_scheme` is the attention layers' (k_scale / v_scale, checked by
        # attention/kv_scale_names.check_kv_cache_scheme), not the linear layers'.
        default_format = config.get("format") or "dense"
        schemes = []
        for name, group in (config.get("config_groups") or {}).items():
            if group.get("output_activations"):
                raise ValueError(f"compressed-tensors group {name!r}: output_activations")
            if not group.get("weights"):
                raise ValueError(f"compressed-tensors group {name!r} quantizes no weights")
            acts = group.get("input_activations")
            schemes.append(
                Scheme(
                    targets=tuple(group.get("targets") or ()),
                    weights=QuantArgs.from_dict(group["weights"]),
                    input_activations=None if not acts else QuantArgs.from_dict(acts),
                    format=str(group.get("format") or default_format),
                )
            )
        return cls(schemes, config.get("ignore") or ())

    def scheme_of(self, prefix: str) -> Scheme | None:
        """The scheme of the layer `prefix` (None: ignored or targeted by none). The parts of a
        fused layer must agree (else a ValueError)."""
        names = _checkpoint_names(prefix)
        found: list[Scheme | None] = []
        for name in names:
            if _matches(name, self.ignore, layer_kind=""):
                found.append(None)
                continue
            found.append(next((s for s in self.schemes if _matches(name, s.targets)), None))
        if any(f != found[0] for f in found):
            raise ValueError(
                f"compressed-tensors: the parts of the fused layer {prefix!r} ({', '.join(names)}) "
                "are not quantized alike"
            )
        return found[0]

    def weight_bytes_per_param(self, dtype_size: int) -> float:
        if not self.schemes:
            return float(dtype_size)
        w = self.schemes[0].weights
        scales = 4.0 / int(w.group_size or 1) if w.strategy == "group" else 0.0
        zeros = scales / 4 if w.strategy == "group" and not w.symmetric else 0.0
        return w.num_bits / 8 + scales + zeros

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        scheme = self.scheme_of(prefix)
        return None if scheme is None else _method(scheme)

    def __repr__(self) -> str:
        return f"CompressedTensorsConfig({len(self.schemes)} groups, ignore={self.ignore})"


def _act_scheme(a: QuantArgs) -> ActScheme:
    kind = "fp8" if a.type == "float" else "int8"
    if a.strategy == "token" and a.dynamic:
        return ("token", kind)
    return ("static", kind)


def _check_scheme(s: Scheme) -> None:
    """A ValueError naming the combination unless `_method` supports it."""
    w, a = s.weights, s.input_activations
    what = (
        f"compressed-tensors scheme weights={w.describe()} "
        f"input_activations={a.describe() if a else None} format={s.format!r}"
    )
    if w.actorder or w.dynamic:
        raise ValueError(f"{what}: weight actorder/dynamic weights are not supported")
    if w.strategy == "group" and (not w.group_size or w.group_size <= 0):
        raise ValueError(f"{what}: group strategy needs a positive group_size")
    if a is None:
        packed = s.format == "pack-quantized" and w.type == "int" and w.num_bits in (4, 8)
        eight_bit = w.num_bits == 8 and w.symmetric and w.strategy in ("tensor", "channel")
        fp8 = s.format == "float-quantized" and w.type == "float"
        int8 = s.format in INT_FORMATS and w.type == "int"
        if (packed and w.strategy in ("group", "channel")) or (eight_bit and (fp8 or int8)):
            return
        raise ValueError(f"{what} is not supported")
    acts_ok = (
        a.num_bits == 8
        and a.symmetric
        and a.type == w.type
        and ((a.strategy == "token" and a.dynamic) or (a.strategy == "tensor" and not a.dynamic))
    )
    weights_ok = w.num_bits == 8 and w.symmetric and w.strategy in ("tensor", "channel")
    fmt_ok = s.format == "float-quantized" if w.type == "float" else s.format in INT_FORMATS
    if not (acts_ok and weights_ok and fmt_ok):
        raise ValueError(f"{what} is not supported")


def _method(s: Scheme) -> LinearMethodBase:
    w, a = s.weights, s.input_activations
    if s.format == "pack-quantized":
        return CTPackedLinearMethod(w)
    if a is None:
        return CTWeightOnlyLinearMethod(w)
    return CTW8A8LinearMethod(w, _act_scheme(a))


def _add_weight_scale(layer: nn.Module, w: QuantArgs) -> None:
    dummy = weight_scale_dummy(FP8_DTYPE if w.type == "float" else torch.int8)
    if w.strategy == "tensor":
        add_part_scalar(layer, "weight_scale", dummy)
    else:  # channel
        out = sum(layer.output_partition_sizes)  # type: ignore[arg-type]
        add_packed_param(
            layer, "weight_scale", (out, 1), torch.float32, PackedLayout(None, 0), dummy
        )


def _scale_columns(layer: Any, w: QuantArgs) -> torch.Tensor:
    """The float32 `weight_scale` of each output row, `[output, 1]` (per tensor or channel)."""
    scale = layer.weight_scale.float()
    return per_part_columns(layer, scale) if w.strategy == "tensor" else scale


def _scaled_weight(layer: Any, w: QuantArgs) -> torch.Tensor:
    """`weight * weight_scale` in float32 (an e4m3 or int8 weight, per tensor or channel)."""
    return layer.weight.float() * _scale_columns(layer, w)


def _create_8bit(layer: nn.Module, w: QuantArgs, input_size_per_partition: int) -> None:
    out = sum(layer.output_partition_sizes)  # type: ignore[arg-type]
    dtype = FP8_DTYPE if w.type == "float" else torch.int8
    add_packed_param(layer, "weight", (out, input_size_per_partition), dtype, PackedLayout(1, 0))
    _add_weight_scale(layer, w)


class CTWeightOnlyLinearMethod(PackedLinearMethod):
    """W8A16: an e4m3 or int8 `weight` and its `weight_scale`, dequantized to the model dtype."""

    PACKED_PARAMS = ("weight", "weight_scale")

    def __init__(self, weights: QuantArgs) -> None:
        super().__init__()
        self.w = weights

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
        _create_8bit(layer, self.w, input_size_per_partition)

    def dequantized(self, layer: Any) -> torch.Tensor:
        return _scaled_weight(layer, self.w)


class CTW8A8LinearMethod(ActQuantLinearMethod):
    """W8A8 FP8 or int8: the 8-bit weight and scale, activations per token or static."""

    PACKED_PARAMS = ("weight", "weight_scale")

    def __init__(self, weights: QuantArgs, act: ActScheme) -> None:
        super().__init__(act)
        self.w = weights

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
        _create_8bit(layer, self.w, input_size_per_partition)
        if self.act[0] == "static":
            add_part_scalar(layer, "input_scale", dummy_input_scale)

    def fp8_weight(self, layer: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.w.type != "float":
            return None
        return layer.weight, _scale_columns(layer, self.w).reshape(-1)

    def dequantized(self, layer: Any) -> torch.Tensor:
        return _scaled_weight(layer, self.w)


def _load_weight_shape(
    layer: Any, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None
) -> None:
    """`weight_shape` (the unpacked `[output, input]`): checked against the layer's input."""
    if loaded.numel() != 2 or int(loaded.reshape(-1)[1]) != layer.input_size:
        raise ValueError(
            f"{layer.prefix!r}: weight_shape {loaded.tolist()} does not match the layer's input "
            f"size {layer.input_size}"
        )
    param.data.copy_(loaded.reshape(-1))


class CTPackedLinearMethod(PackedLinearMethod):
    """W4A16 / W8A16 int, pack-quantized (see the module doc), dequantized after loading."""

    PACKED_PARAMS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")

    def __init__(self, weights: QuantArgs) -> None:
        super().__init__()
        self.w = weights

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
        w = self.w
        pack = 32 // w.num_bits
        out, k = sum(output_partition_sizes), input_size_per_partition
        if k % pack or any(n % pack for n in output_partition_sizes):
            raise ValueError(
                f"compressed-tensors: layer {layer.prefix!r} sizes ({out}, {k}) are not multiples "
                f"of {pack} ({w.num_bits}-bit packing)"
            )
        if w.strategy == "group":
            gs = int(w.group_size or 0)
            if k != input_size and k % gs:
                raise ValueError(
                    f"compressed-tensors: the input split {k} is not a multiple of {gs}"
                )
            groups, unit = -(-k // gs), gs
        else:
            groups, unit = 1, input_size
        add_packed_param(
            layer, "weight_packed", (out, k // pack), torch.int32, PackedLayout(1, 0, pack)
        )
        group_split = w.strategy == "group"
        add_packed_param(
            layer,
            "weight_scale",
            (out, groups),
            torch.float32,
            PackedLayout(1 if group_split else None, 0, unit),
            dummy_init=dummy_scale(1 << (w.num_bits - 1)),
        )
        if not w.symmetric:
            add_packed_param(
                layer,
                "weight_zero_point",
                (out // pack, groups),
                torch.int32,
                PackedLayout(1 if group_split else None, 0, unit, pack),
            )
        shape = nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
        shape.weight_loader = lambda p, t, s=None: _load_weight_shape(layer, p, t, s)  # type: ignore[attr-defined]
        shape.dummy_init = lambda data, gen, mag: data.copy_(  # type: ignore[attr-defined]
            torch.tensor([output_size, input_size])
        )
        layer.register_parameter("weight_shape", shape)

    def int_weights(self, layer: Any) -> IntWeights | None:
        bits = self.w.num_bits
        q = unpack_int32(layer.weight_packed, bits, dim=1).t()
        zeros = None
        if not self.w.symmetric:
            zeros = unpack_int32(layer.weight_zero_point, bits, dim=0).t()
        gs = int(self.w.group_size or 0) if self.w.strategy == "group" else CHANNEL_GROUP
        return pack_int_weights(q, layer.weight_scale.t(), zeros, bits, gs)

    def dequantized(self, layer: Any) -> torch.Tensor:
        bits = self.w.num_bits
        offset = 1 << (bits - 1)
        q = unpack_int32(layer.weight_packed, bits, dim=1) - offset
        k = q.shape[1]
        scale = layer.weight_scale.float()
        if self.w.strategy == "group":
            g = torch.arange(k, device=q.device) // int(self.w.group_size or 0)
        else:
            g = torch.zeros(k, dtype=torch.long, device=q.device)
        if not self.w.symmetric:
            zero = unpack_int32(layer.weight_zero_point, bits, dim=0) - offset
            q = q - zero[:, g]
        return q.float() * scale[:, g]
