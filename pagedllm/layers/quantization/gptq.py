"""GPTQ weight-only checkpoints (AutoGPTQ / Optimum / GPTQModel layout), 4 or 8 bits.

Per linear the checkpoint holds, with `pack = 32 // bits` and `groups = ceil(input / group_size)`
(1 for `group_size = -1`, one scale per output channel):
- `qweight` int32 `[input / pack, output]`: input feature `r * pack + j` at bits `j * bits` of row r;
- `qzeros` int32 `[groups, output / pack]`: output `c * pack + j` at bits `j * bits` of column c;
  the v1 format (`checkpoint_format` "gptq", the default) stores `zero - 1` (a historical quirk
  of AutoGPTQ's packer that every reader undoes; a zero of 0 cannot be stored), "gptq_v2" the zero;
- `scales` fp16 `[groups, output]`;
- `g_idx` int32 `[input]`: the group of each input feature. Without `desc_act` it is
  `i // group_size` and ignored (as other readers do); with `desc_act` (act order: columns were
  quantized in a permuted order) it is read, and each of q/k/v keeps its own.

`W[o, i] = (q[i, o] - zero[g(i), o]) * scale[g(i), o]`: on CUDA the W4A16 kernel on the same
`qweight` (its layout is GPTQ's) with the zeros unpacked; with `desc_act` (groups out of input
order, which the kernel's one-group K tiles cannot follow) and on the CPU dequantized once after
loading (`packed.PackedLinearMethod`). `sym` needs nothing of its own: a symmetric
checkpoint stores its zeros (`2 ** (bits - 1)`) like any other. Tensor parallel: a row-parallel
layer splits `qweight` and `g_idx` along the input and the groups too, except with `desc_act`
(groups then do not follow the input order; every rank keeps all of them) or a per-channel scale.
Layers named by `modules_to_not_convert`, or left out of `modules_in_block_to_quantize` when the
config has it, stay unquantized (`packed.is_layer_skipped`).
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

SUPPORTED_BITS = (4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


class GPTQConfig(QuantizationConfig):
    """`quant_method: "gptq"`: bits, group size, act order, symmetry, the zeros' format."""

    name: ClassVar[str] = "gptq"

    def __init__(
        self,
        bits: int,
        group_size: int,
        desc_act: bool = False,
        sym: bool = True,
        checkpoint_format: str = "gptq",
        modules_to_not_convert: Sequence[str] = (),
        modules_in_block_to_quantize: Sequence[str] | None = None,
    ) -> None:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"GPTQ with {bits} bits is not supported (only {SUPPORTED_BITS})")
        if group_size != -1 and group_size <= 0:
            raise ValueError(f"GPTQ group_size must be -1 or positive, got {group_size}")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"GPTQ checkpoint_format {checkpoint_format!r} is not supported "
                f"(only {CHECKPOINT_FORMATS})"
            )
        self.bits = bits
        self.group_size = group_size
        self.desc_act = desc_act
        self.sym = sym
        self.checkpoint_format = checkpoint_format
        self.modules_to_not_convert = list(modules_to_not_convert)
        # None: every linear of the blocks is quantized (else only these, e.g. "mlp.down_proj").
        self.modules_in_block_to_quantize = (
            None if modules_in_block_to_quantize is None else list(modules_in_block_to_quantize)
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GPTQConfig:
        # NOTE: Optimum writes the linears it quantized per block as a list of lists (one per
        # sequential step); the order does not matter here.
        in_block = config_value(config, "modules_in_block_to_quantize", default=None)
        if in_block is not None:
            in_block = [
                name for step in in_block for name in ([step] if isinstance(step, str) else step)
            ]
        if config_value(config, "lm_head", default=False):
            raise ValueError("GPTQ checkpoints with a quantized lm_head are not supported")
        if config_value(config, "dynamic", default=None):
            raise ValueError("GPTQ per-module overrides ('dynamic') are not supported")
        return cls(
            bits=int(config_value(config, "bits", "w_bit", default=4)),
            group_size=int(config_value(config, "group_size", default=128)),
            desc_act=bool(config_value(config, "desc_act", default=False)),
            sym=bool(config_value(config, "sym", default=True)),
            checkpoint_format=str(config_value(config, "checkpoint_format", default="gptq")),
            modules_to_not_convert=config_value(config, "modules_to_not_convert", default=None)
            or (),
            modules_in_block_to_quantize=in_block,
        )

    def weight_bytes_per_param(self, dtype_size: int) -> float:
        # NOTE: the W4A16 kernel's float32 scales and 1-byte zeros, per group.
        group = self.group_size if self.group_size > 0 else 1 << 30
        return self.bits / 8 + 5.0 / group

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        if is_layer_skipped(prefix, self.modules_to_not_convert, self.modules_in_block_to_quantize):
            return None
        return GPTQLinearMethod(self)

    def __repr__(self) -> str:
        return (
            f"GPTQConfig(bits={self.bits}, group_size={self.group_size}, "
            f"desc_act={self.desc_act}, sym={self.sym}, format={self.checkpoint_format!r})"
        )


class GPTQLinearMethod(PackedLinearMethod):
    """Registers the checkpoint's four tensors for this rank; dequantizes them after loading."""

    def __init__(self, config: GPTQConfig) -> None:
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
        cfg = self.config
        pack = 32 // cfg.bits
        out = sum(output_partition_sizes)
        split = input_size_per_partition != input_size  # a row-parallel layer at tp > 1
        if input_size_per_partition % pack:
            raise ValueError(
                f"GPTQ: input size {input_size_per_partition} is not a multiple of {pack}"
            )
        if out % pack:
            raise ValueError(f"GPTQ: output size {out} is not a multiple of {pack}")
        gs = cfg.group_size
        split_groups = gs != -1 and not cfg.desc_act
        if gs == -1:
            groups = 1
        elif split_groups and split:
            if input_size_per_partition % gs:
                raise ValueError(
                    f"GPTQ: the input split {input_size_per_partition} is not a multiple of "
                    f"group_size {gs}"
                )
            groups = input_size_per_partition // gs
        else:
            groups = -(-input_size // gs)
        group_unit = input_size if gs == -1 else gs
        add_packed_param(
            layer,
            "qweight",
            (input_size_per_partition // pack, out),
            torch.int32,
            PackedLayout(input_dim=0, output_dim=1, input_unit=pack),
        )

        def group_layout(pack_out: int) -> PackedLayout:
            return PackedLayout(0, 1, group_unit, pack_out, split_input=split_groups)

        add_packed_param(layer, "qzeros", (groups, out // pack), torch.int32, group_layout(pack))
        # NOTE: float32, whatever the model dtype: fp16 and bf16 scales are held exactly.
        add_packed_param(
            layer,
            "scales",
            (groups, out),
            torch.float32,
            group_layout(1),
            dummy_init=dummy_scale(2 ** (cfg.bits - 1)),
        )

        def dummy_g_idx(data: torch.Tensor, gen: torch.Generator, magnitude: float) -> None:
            data.copy_(torch.arange(data.shape[1], device=data.device) // group_unit)

        add_packed_param(
            layer,
            "g_idx",
            (len(output_partition_sizes), input_size_per_partition),
            torch.int32,
            PackedLayout(input_dim=0, output_dim=None, per_part=True),
            dummy_init=dummy_g_idx,
        )

    def _zeros(self, layer: Any) -> torch.Tensor:
        zeros = unpack_int32(layer.qzeros, self.config.bits, dim=1)
        if self.config.checkpoint_format == "gptq":
            zeros = zeros + 1  # NOTE: v1 stores zero - 1 (see the module doc)
        return zeros

    def int_weights(self, layer: Any) -> IntWeights | None:
        cfg = self.config
        if cfg.desc_act:
            return None
        zeros: torch.Tensor | None = self._zeros(layer)
        if bool((zeros == 1 << (cfg.bits - 1)).all()):  # type: ignore[operator]
            zeros = None  # NOTE: symmetric: the kernel's constant zero
        gs = CHANNEL_GROUP if cfg.group_size == -1 else cfg.group_size
        q = unpack_int32(layer.qweight, cfg.bits, dim=0)
        return pack_int_weights(q, layer.scales, zeros, cfg.bits, gs)

    def dequantized(self, layer: Any) -> torch.Tensor:
        cfg = self.config
        q = unpack_int32(layer.qweight, cfg.bits, dim=0)
        zeros = self._zeros(layer)
        parts = layer.output_partition_sizes
        if cfg.desc_act:
            group_index = layer.g_idx
        else:
            n = layer.input_size_per_partition
            index = torch.arange(n, device=q.device)
            index = index // cfg.group_size if cfg.group_size != -1 else torch.zeros_like(index)
            group_index = index.expand(len(parts), n)
        if int(group_index.max()) >= layer.scales.shape[0] or int(group_index.min()) < 0:
            raise ValueError(f"GPTQ g_idx of {layer.prefix!r} indexes past its groups")
        return dequantize(q, zeros, layer.scales, group_index, parts)
