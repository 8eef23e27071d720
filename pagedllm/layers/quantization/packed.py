"""What the weight-only integer methods (`gptq`, `awq`) share: their checkpoint tensors as layer
parameters with a tensor-parallel loader, the skip list, and the dequantized product.

A packed method registers its checkpoint tensors (`qweight`, `qzeros`, `scales`, `g_idx`) in the
checkpoint's own layout, holding this rank's part. Each carries a `PackedLayout` saying which
dimension runs along the layer's input and which along its output, and how many features one
element covers there (a pack factor, a group size). `load_packed` uses it to copy this rank's
slice of a checkpoint tensor, for every layer kind of `linear.py` (replicated, column, merged
parts, q/k/v heads with KV replication, row): the same split the layers' own loaders apply to
an `[output, input]` weight, in packed units.

`process_weights_after_loading` then, on CUDA (`kernels.use_kernels`), repacks the integer
weights into the one layout of the W4A16 kernel (`kernels.w4a16.IntWeights`: packed along the
input, float32 group scales, zeros or none), which dequantizes in registers: the weights stay a
quarter (or half) of their float size (for a few rows, `kernels.gemv_quant.int_gemv` on the same
layout). Elsewhere, or for what the kernel does not take (GPTQ's act order, group sizes its K
tiles do not divide), it dequantizes once: `(q - zero) * scale` of
each weight's group, in float32 (exact: a small integer times an fp16/bf16 scale fits float32's
mantissa), cast to the model dtype, as one `[output, input]` `weight`; the packed tensors are
dropped, and the layer is an unquantized linear (`F.linear`, the GEMV for a few rows on CUDA).
That dequantized product is the oracle of the kernel: both round the same weight to the model
dtype and differ only in the order of the float32 sums.

Dummy weights (`load_format="dummy"`): a parameter may carry `dummy_init(data, generator,
magnitude)`, which the dummy loader calls to fill it with valid values (positive scales that
keep the dequantized weight near `magnitude`, group indices in range); integer and FP8
parameters without one get random bits / random FP8 values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
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


DummyInit = Callable[[torch.Tensor, torch.Generator, float], None]


def dummy_scale(qmax: float) -> DummyInit:
    """Dummy scales in `[0.5, 1] * magnitude / qmax`: a weight of integers (or FP8 values) up
    to `qmax` dequantizes to at most about `magnitude`, as the dummy float weights are."""

    def fill(data: torch.Tensor, gen: torch.Generator, magnitude: float) -> None:
        data.uniform_(0.5 * magnitude / qmax, magnitude / qmax, generator=gen)

    return fill


def add_packed_param(
    layer: nn.Module,
    name: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    layout: PackedLayout,
    dummy_init: DummyInit | None = None,
) -> None:
    """Registers `name` (zeros, inference only) loaded by `load_packed` with `layout`, filled by
    `dummy_init` for dummy weights (see the module doc)."""
    param = nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)
    param.packed_layout = layout  # type: ignore[attr-defined]
    param.weight_loader = partial(load_packed, layer)  # type: ignore[attr-defined]
    if dummy_init is not None:
        param.dummy_init = dummy_init  # type: ignore[attr-defined]
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


def drop_params(layer: nn.Module, names: Iterable[str]) -> None:
    """Removes the parameters `names` of `layer` that it has."""
    for name in names:
        if name in layer._parameters:
            delattr(layer, name)


# The group size of one scale per output channel: past any K, so every K tile is in group 0.
CHANNEL_GROUP = 1 << 30


@dataclass(frozen=True)
class IntWeights:
    """A layer's weight in the kernel layout (see the module doc); `n`/`k`: its `[N, K]`."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    n: int
    k: int


def pack_int_weights(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> IntWeights:
    """The kernel layout of unsigned `q [K, N]` (values `< 2 ** bits`), float `scales [groups,
    N]` and unsigned `zeros [groups, N]` (None: symmetric, `2 ** (bits - 1)`); `group_size`: the
    features per group (`CHANNEL_GROUP` for one scale per output channel)."""
    k, n = q.shape
    pack = 32 // bits
    if k % pack:
        raise ValueError(f"the input size {k} is not a multiple of {pack} ({bits}-bit packing)")
    words = torch.zeros(k // pack, n, dtype=torch.int64, device=q.device)
    for j in range(pack):  # NOTE: one slice at a time: int64 temporaries of K / pack rows
        words |= q[j::pack].to(torch.int64) << (j * bits)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # int32's two's complement
    if zeros is not None:
        zeros = zeros.to(torch.uint8 if int(zeros.max()) < 256 else torch.int16)
    return IntWeights(
        qweight=words.to(torch.int32).contiguous(),
        scales=scales.float().contiguous(),
        zeros=None if zeros is None else zeros.contiguous(),
        bits=bits,
        group_size=group_size,
        n=n,
        k=k,
    )


class PackedLinearMethod(UnquantizedLinearMethod):
    """The shared tail of the packed methods: on CUDA the W4A16 kernel on `int_weights(layer)`
    (the method's own repacking), else `dequantized(layer)` becomes the layer's `weight` and
    `apply` is the unquantized product (see the module doc)."""

    PACKED_PARAMS: tuple[str, ...] = ("qweight", "qzeros", "scales", "g_idx")

    def dequantized(self, layer: Any) -> torch.Tensor:
        """The layer's `[output, input]` float32 weight from its loaded packed tensors."""
        raise NotImplementedError

    def int_weights(self, layer: Any) -> IntWeights | None:
        """The layer's weight in the W4A16 kernel's layout; None: the kernel does not take it."""
        return None

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        from pagedllm.layers.quantization import kernels

        device = next(iter(layer.parameters())).device
        layer.int_weights = None  # NOTE: read by `apply` from the layer's __dict__
        if kernels.use_kernels(device):
            from pagedllm.layers.quantization.kernels import w4a16

            packed = self.int_weights(layer)
            if packed is not None and w4a16.supports(packed):
                drop_params(layer, self.PACKED_PARAMS)
                for field in ("qweight", "scales", "zeros"):
                    layer.register_buffer(f"int_{field}", getattr(packed, field))
                layer.int_weights = packed
                return
        dtype: torch.dtype = layer.params_dtype  # type: ignore[assignment]
        weight = self.dequantized(layer).to(dtype)
        drop_params(layer, self.PACKED_PARAMS)
        layer.register_parameter("weight", nn.Parameter(weight, requires_grad=False))

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        packed = layer.__dict__.get("int_weights")
        if packed is not None:
            from pagedllm.layers.quantization.kernels import gemv_quant, w4a16

            # NOTE: a few rows (decode): the integer GEMV (`use_gemv`: the GEMV switch).
            if gemv_quant.int_wanted(x, packed, self.use_gemv):
                return gemv_quant.int_gemv(x, packed, bias)
            return w4a16.int_gemm(x, packed, bias)
        return super().apply(layer, x, bias)

    def apply_silu_mul(
        self, layer: nn.Module, gate_up: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if layer.__dict__.get("int_weights") is not None:
            return self.apply(layer, self.silu_and_mul(gate_up), bias)
        return super().apply_silu_mul(layer, gate_up, bias)


def config_value(config: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    """The first of `keys` present in a checkpoint's `quantization_config` (names vary by tool)."""
    for key in keys:
        if key in config:
            return config[key]
    return default
