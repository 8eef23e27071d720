"""AWQ weight-only checkpoints (AutoAWQ's GEMM layout, `version: "gemm"`), 4 bits.

Per linear, with `groups = input / group_size`:
- `qweight` int32 `[input, output / 8]` and `qzeros` int32 `[groups, output / 8]`: eight 4-bit
  values per int32 along the output, interleaved: the 4 bits at `4 * j` hold output
  `8 * c + AWQ_ORDER[j]` (the order AWQ's GEMM kernel unpacks fastest);
- `scales` fp16 `[groups, output]`.

`W[o, i] = (q[i, o] - zero[i // group_size, o]) * scale[i // group_size, o]`: on CUDA the W4A16
kernel, its weights repacked along the input after loading; elsewhere dequantized once after
loading (`packed.PackedLinearMethod`). The zeros are stored as they
are (no "minus one" as in GPTQ v1). With `zero_point: false` there is no `qzeros`; the zero is
then 8, the midpoint of the unsigned 4-bit range (the symmetric convention of other readers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from pagedllm.layers.quantization.base import LinearMethodBase, QuantizationConfig
from pagedllm.layers.quantization.packed import (
    CHANNEL_GROUP,
    IntWeights,
    PackedLayout,
    PackedLinearMethod,
    add_packed_param,
    config_value,
    dequantize,
    dummy_scale,
    is_layer_skipped,
    pack_int_weights,
    unpack_int32,
)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
BITS = 4
PACK = 32 // BITS


class AWQConfig(QuantizationConfig):
    """`quant_method: "awq"`: group size and zero point (4 bits, GEMM layout only)."""

    name: ClassVar[str] = "awq"

    def __init__(
        self,
        bits: int = BITS,
        group_size: int = 128,
        zero_point: bool = True,
        modules_to_not_convert: Sequence[str] = (),
    ) -> None:
        if bits != BITS:
            raise ValueError(f"AWQ with {bits} bits is not supported (only {BITS})")
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"AWQ group_size must be -1 or positive, got {group_size}")
        self.bits = bits
        self.group_size = group_size
        self.zero_point = zero_point
        self.modules_to_not_convert = list(modules_to_not_convert)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> AWQConfig:
        version = config_value(config, "version", default="gemm")
        version = str(getattr(version, "value", version)).lower()  # transformers' str enum
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported (only 'gemm')")
        return cls(
            bits=int(config_value(config, "bits", "w_bit", default=BITS)),
            group_size=int(config_value(config, "group_size", "q_group_size", default=128)),
            zero_point=bool(config_value(config, "zero_point", default=True)),
            modules_to_not_convert=config_value(config, "modules_to_not_convert", default=None)
            or (),
        )

    def weight_bytes_per_param(self, dtype_size: int) -> float:
        # NOTE: the W4A16 kernel's float32 scales and 1-byte zeros, per group.
        group = self.group_size if self.group_size > 0 else 1 << 30
        return self.bits / 8 + 5.0 / group

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        if is_layer_skipped(prefix, self.modules_to_not_convert):
            return None
        return AWQLinearMethod(self)

    def __repr__(self) -> str:
        return f"AWQConfig(group_size={self.group_size}, zero_point={self.zero_point})"


class AWQLinearMethod(PackedLinearMethod):
    """Registers `qweight`, `qzeros` (with a zero point) and `scales`; dequantizes them."""

    def __init__(self, config: AWQConfig) -> None:
        super().__init__()
        self.config = config

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
        out = sum(output_partition_sizes)
        if out % PACK:
            raise ValueError(f"AWQ: output size {out} is not a multiple of {PACK}")
        gs = self.config.group_size
        if gs == -1:
            groups, unit = 1, input_size
        else:
            if input_size_per_partition % gs:
                raise ValueError(
                    f"AWQ: input size {input_size_per_partition} is not a multiple of "
                    f"group_size {gs}"
                )
            groups, unit = input_size_per_partition // gs, gs
        add_packed_param(
            layer,
            "qweight",
            (input_size_per_partition, out // PACK),
            torch.int32,
            PackedLayout(input_dim=0, output_dim=1, output_unit=PACK),
        )

        def group_layout(pack_out: int) -> PackedLayout:
            return PackedLayout(0, 1, unit, pack_out, split_input=gs != -1)

        if self.config.zero_point:
            add_packed_param(
                layer, "qzeros", (groups, out // PACK), torch.int32, group_layout(PACK)
            )
        # NOTE: float32, whatever the model dtype: fp16 and bf16 scales are held exactly.
        add_packed_param(
            layer,
            "scales",
            (groups, out),
            torch.float32,
            group_layout(1),
            dummy_init=dummy_scale(1 << (BITS - 1)),
        )

    def int_weights(self, layer: Any) -> IntWeights | None:
        q = unpack_int32(layer.qweight, BITS, dim=1, order=AWQ_ORDER)
        zeros = None
        if self.config.zero_point:
            zeros = unpack_int32(layer.qzeros, BITS, dim=1, order=AWQ_ORDER)
        gs = CHANNEL_GROUP if self.config.group_size == -1 else self.config.group_size
        return pack_int_weights(q, layer.scales, zeros, BITS, gs)

    def dequantized(self, layer: Any) -> torch.Tensor:
        q = unpack_int32(layer.qweight, BITS, dim=1, order=AWQ_ORDER)
        scales = layer.scales
        if self.config.zero_point:
            zeros = unpack_int32(layer.qzeros, BITS, dim=1, order=AWQ_ORDER)
        else:
            zeros = torch.full(scales.shape, 1 << (BITS - 1), dtype=q.dtype, device=q.device)
        n = layer.input_size_per_partition
        index = torch.arange(n, device=q.device)
        gs = self.config.group_size
        index = index // gs if gs != -1 else torch.zeros_like(index)
        parts = layer.output_partition_sizes
        return dequantize(q, zeros, scales, index.expand(len(parts), n), parts)
