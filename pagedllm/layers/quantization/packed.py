"""What the weight-only integer methods (`gptq`, `awq`) share: their checkpoint tensors as layer
parameters with a tensor-parallel loader, the skip list, and the dequantized product.

A packed method registers its checkpoint tensors (`qweight`, `qzeros`, `scales`, `g_idx`) in the
checkpoint's own layout, holding this rank's part. Each carries a `PackedLayout` saying which
dimension runs along the layer's input and which along its output, and how many features one
element covers there (a pack factor, a group size). `load_packed` uses it to copy this rank's
slice of a checkpoint tensor, for every layer kind of `linear.py` (replicated, column, merged
parts, q/k/v heads with KV replication, row): the same split the layers' own loaders apply to
an `[output, input]` weight, in packed units.

`process_weights_after_loading` then dequantizes once: `(q - zero) * scale` of each weight's group,
in float32 (exact: a small integer times an fp16/bf16 scale fits float32's mantissa), cast to the
model dtype, as one `[output, input]` `weight`; the packed tensors are dropped. From then on the
layer is an unquantized linear (`F.linear`, the GEMV for a few rows on CUDA). NOTE: dequantizing
at load, not per call: the product is then exactly the dequantized math on every device at the
unquantized speed, with no kernel of our own; the price is the memory of a float weight (the
saving quantization exists for waits on a dequantizing GEMM kernel that reads the packed tensors).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from pagedllm.layers.quantization.unquantized import UnquantizedLinearMethod

# Our fused layers' names and the checkpoint's layers they fuse (what a skip list names).
FUSED_LAYER_NAMES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def is_layer_skipped(
    prefix: str,
    modules_to_not_convert: Iterable[str],
    modules_to_quantize: Iterable[str] | None = None,
) -> bool:
    """Whether the layer `prefix` stays unquantized: named by `modules_to_not_convert`, or, given
    `modules_to_quantize` (GPTQ's `modules_in_block_to_quantize`, flattened), not named by it.
    An entry matches whole dotted components anywhere in the name ("lm_head", "mlp.down_proj",
    "model.layers.0"). A fused layer (`qkv_proj`) matches when all the checkpoint layers it fuses
    do; a ValueError when only some do (one layer cannot compute part of its output quantized).
    """
    if _names_match(prefix, modules_to_not_convert, "modules_to_not_convert"):
        return True
    if modules_to_quantize is None:
        return False
    return not _names_match(prefix, modules_to_quantize, "modules_in_block_to_quantize")


def _names_match(prefix: str, entries: Iterable[str], what: str) -> bool:
    wanted = [e.strip(".") for e in entries if e]
    if not wanted:
        return False
    head, _, last = prefix.rpartition(".")
    names = [f"{head}.{p}" if head else p for p in FUSED_LAYER_NAMES.get(last, (last,))]
    matched = [any(f".{e}." in f".{name}." for e in wanted) for name in names]
    if any(matched) and not all(matched):
        raise ValueError(
            f"{what} names only part of the fused layer {prefix!r} "
            f"({', '.join(n for n, m in zip(names, matched, strict=True) if m)})"
        )
    return all(matched)


@dataclass(frozen=True)
class PackedLayout:
    """How a checkpoint tensor maps onto the layer's `[output, input]` weight.

    `input_dim`/`output_dim`: the tensor's dimension along the input/output features (None: the
    tensor has none). `input_unit`/`output_unit`: features per element along it (the pack factor
    of a packed dimension, the group size of a group dimension). `split_input`: whether a
    row-parallel layer splits it along the input (False: every rank holds all of it, e.g. the
    groups of an act-order checkpoint, which do not follow the input's order). `per_part`: one row
    per fused part (`g_idx`, which each of q/k/v has in the checkpoint), the checkpoint's 1-D
    tensor filling its part's row.
    """

    input_dim: int | None
    output_dim: int | None
    input_unit: int = 1
    output_unit: int = 1
    split_input: bool = True
    per_part: bool = False


def add_packed_param(
    layer: nn.Module, name: str, shape: Sequence[int], dtype: torch.dtype, layout: PackedLayout
) -> None:
    """Registers `name` (zeros, inference only) loaded by `load_packed` with `layout`."""
    param = nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)
    param.packed_layout = layout  # type: ignore[attr-defined]
    param.weight_loader = partial(load_packed, layer)  # type: ignore[attr-defined]
    layer.register_parameter(name, param)


def _exact_div(n: int, unit: int, what: str) -> int:
    if n % unit:
        raise ValueError(f"{what}: {n} features are not a multiple of {unit}")
    return n // unit


def _output_parts(layer: Any) -> list[int]:
    """The whole (unsplit) output size of each fused part of `layer`, in order."""
    if hasattr(layer, "total_num_kv_heads"):  # QKVParallelLinear
        q = layer.total_num_heads * layer.head_size
        kv = layer.total_num_kv_heads * layer.head_size
        return [q, kv, kv]
    return list(getattr(layer, "output_sizes", None) or [layer.output_size])


def _part_index(layer: Any, shard_id: object) -> int:
    ids: list[object] = ["q", "k", "v"] if hasattr(layer, "total_num_kv_heads") else []
    ids = ids or list(range(len(_output_parts(layer))))
    if shard_id not in ids:
        raise ValueError(f"shard_id must be one of {ids} for {type(layer).__name__}")
    return ids.index(shard_id)


def _output_slice(layer: Any, part: int) -> tuple[int, int, int, int]:
    """`(dst_offset, size, src_start, src_total)` in output features: where this rank's slice of
    fused part `part` lies in the parameter, and where in the part's whole checkpoint tensor."""
    from pagedllm.layers.linear import ColumnParallelLinear

    total = _output_parts(layer)[part]
    if not isinstance(layer, ColumnParallelLinear):  # replicated, row: the whole output
        return sum(_output_parts(layer)[:part]), total, 0, total
    offset = sum(layer.output_partition_sizes[:part])
    size = layer.output_partition_sizes[part]
    rank: int = layer.tp_rank
    if part > 0:  # a KV head replicated over ranks: the same slice on several (q/k/v only)
        rank //= getattr(layer, "num_kv_head_replicas", 1)
    return offset, size, rank * size, total


def load_packed(
    layer: Any, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None
) -> None:
    """Copies this rank's slice of the checkpoint tensor `loaded` into `param` (see the module
    doc); `shard_id` names the fused part it fills ("q"/"k"/"v", or the merged part's index)."""
    from pagedllm.layers.linear import RowParallelLinear

    layout: PackedLayout = param.packed_layout  # type: ignore[attr-defined]
    parts = _output_parts(layer)
    if layout.per_part:
        if loaded.ndim != 1:
            raise ValueError(f"expected a 1-D tensor for a per-part parameter, got {loaded.ndim}-D")
        loaded = loaded.unsqueeze(0)
    if shard_id is None and len(parts) > 1:
        if layout.per_part:  # an already-fused checkpoint: the same row for every part
            for sid in range(len(parts)):
                _load_part(layer, param, loaded, sid, layout)
            return
        if layout.output_dim is None:
            raise ValueError("a tensor without an output dimension needs no shard split")
        sizes = [_exact_div(n, layout.output_unit, "fused part") for n in parts]
        if loaded.shape[layout.output_dim] != sum(sizes):
            raise ValueError(
                f"checkpoint tensor {tuple(loaded.shape)} does not match the fused parts "
                f"{parts} along dim {layout.output_dim}"
            )
        for i, part in enumerate(loaded.split(sizes, dim=layout.output_dim)):
            load_packed(layer, param, part, i)
        return
    part = 0 if shard_id is None else _part_index(layer, shard_id)
    if isinstance(layer, RowParallelLinear) and layout.input_dim is not None and layout.split_input:
        dim = layout.input_dim + (1 if layout.per_part else 0)
        size = param.shape[dim]
        if loaded.shape[dim] != size * layer.tp_size:
            raise ValueError(
                f"checkpoint tensor {tuple(loaded.shape)} does not match parameter "
                f"{tuple(param.shape)} split over {layer.tp_size} ranks along dim {dim}"
            )
        loaded = loaded.narrow(dim, layer.tp_rank * size, size)
    _load_part(layer, param, loaded, part, layout)


def _load_part(
    layer: Any, param: nn.Parameter, loaded: torch.Tensor, part: int, layout: PackedLayout
) -> None:
    if layout.per_part:
        dst, src = param.data.narrow(0, part, 1), loaded
    elif layout.output_dim is None:
        dst, src = param.data, loaded
    else:
        offset, size, start, total = _output_slice(layer, part)
        unit, dim = layout.output_unit, layout.output_dim
        what = f"{layer.prefix or type(layer).__name__} output slice"
        offset, size = _exact_div(offset, unit, what), _exact_div(size, unit, what)
        start, total = _exact_div(start, unit, what), _exact_div(total, unit, what)
        if loaded.shape[dim] != total:
            raise ValueError(
                f"checkpoint tensor {tuple(loaded.shape)} does not match parameter "
                f"{tuple(param.shape)} (expected {total} along dim {dim} in the checkpoint)"
            )
        dst, src = param.data.narrow(dim, offset, size), loaded.narrow(dim, start, size)
    if dst.shape != src.shape:
        raise ValueError(
            f"checkpoint tensor {tuple(loaded.shape)} does not match parameter {tuple(param.shape)}"
        )
    dst.copy_(src)


def unpack_int32(
    packed: torch.Tensor, bits: int, dim: int, order: Sequence[int] | None = None
) -> torch.Tensor:
    """The unsigned `bits`-bit integers packed in the int32 `packed` along `dim`, lowest bits
    first: element `j` of each int32 sits at bits `[j * bits, (j + 1) * bits)`. With `order`,
    the value of feature `order[j]` sits at slot `j` (AWQ's interleaved packing)."""
    per_int = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    # NOTE: the arithmetic shift of a negative int32 drags the sign along; the mask drops it.
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    if order is not None:
        inverse = [0] * per_int
        for slot, feature in enumerate(order):
            inverse[feature] = slot
        values = values[..., inverse]
    values = values.movedim(-1, dim + 1)
    shape = list(packed.shape)
    shape[dim] *= per_int
    return values.reshape(shape)


def dequantize(
    q: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    group_index: torch.Tensor,
    part_sizes: Sequence[int],
) -> torch.Tensor:
    """The `[output, input]` float32 weight `(q - zero) * scale` of `q [input, output]` (integers),
    with `zeros`/`scales [groups, output]` and `group_index [parts, input]`: the group of each
    input feature, for the output columns of each fused part (`part_sizes`)."""
    columns = []
    start = 0
    for part, size in enumerate(part_sizes):
        g = group_index[part].long()
        z = zeros[:, start : start + size][g]
        s = scales[:, start : start + size].float()[g]
        columns.append((q[:, start : start + size] - z).float() * s)
        start += size
    return torch.cat(columns, dim=1).t().contiguous()


class PackedLinearMethod(UnquantizedLinearMethod):
    """The shared tail of the packed methods: `dequantized(layer)` (the method's own) becomes the
    layer's `weight`, the packed parameters go, and `apply` is the unquantized product."""

    PACKED_PARAMS: tuple[str, ...] = ("qweight", "qzeros", "scales", "g_idx")

    def dequantized(self, layer: Any) -> torch.Tensor:
        """The layer's `[output, input]` float32 weight from its loaded packed tensors."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        dtype: torch.dtype = layer.params_dtype  # type: ignore[assignment]
        weight = self.dequantized(layer).to(dtype)
        for name in self.PACKED_PARAMS:
            if name in layer._parameters:
                delattr(layer, name)
        layer.register_parameter("weight", nn.Parameter(weight, requires_grad=False))


def config_value(config: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    """The first of `keys` present in a checkpoint's `quantization_config` (names vary by tool)."""
    for key in keys:
        if key in config:
            return config[key]
    return default
