"""Linear layers that own their tensor-parallel split, weight loading and collectives.

Each parameter carries `weight_loader(param, loaded_weight, shard_id=None)`, which takes the full
checkpoint tensor and copies this rank's slice into the parameter (for fused layers, `shard_id`
names the part of the fused output the tensor fills). At tensor-parallel size 1 every layer is a
plain linear.

A layer's weights and its product belong to its `quant_method` (`pagedllm.layers.quantization`),
which the layer's `quant_config` picks from the layer's dotted name (`prefix`); without a config
(or when it returns None) the method is `UnquantizedLinearMethod`: a `[output, input]` weight as
in `nn.Linear`, `F.linear`, or the Triton GEMV for a few rows on CUDA, and the MLP's SiLU-and-mul
folded into the down projection's GEMV (`RowParallelLinear.forward_silu_mul`). The layer creates
its bias itself (in the model dtype, split as the output). Callers read a layer's sizes from its
attributes (`input_size_per_partition`, `output_size_per_partition`, `params_dtype`), never from
`weight.shape`: a quantized weight need not be `[output, input]` in the model dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pagedllm.distributed import (
    get_tp_rank,
    get_tp_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from pagedllm.layers.quantization.base import LinearMethodBase, QuantizationConfig
from pagedllm.layers.quantization.unquantized import (
    GEMV_MAX_M,
    UnquantizedLinearMethod,
    apply_linear,
)

__all__ = [
    "GEMV_MAX_M",
    "ColumnParallelLinear",
    "LinearBase",
    "MergedColumnParallelLinear",
    "QKVParallelLinear",
    "ReplicatedLinear",
    "RowParallelLinear",
    "apply_linear",
    "default_weight_loader",
    "divide",
]


def default_weight_loader(
    param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
) -> None:
    """Copies a whole (unsplit) tensor into `param`, casting to its dtype and device."""
    if shard_id is not None:
        raise ValueError(f"this parameter is not fused; got shard_id={shard_id!r}")
    if param.shape != loaded_weight.shape:
        raise ValueError(
            f"shape mismatch: parameter {tuple(param.shape)}, "
            f"checkpoint {tuple(loaded_weight.shape)}"
        )
    param.data.copy_(loaded_weight)


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by tensor-parallel size {denominator}")
    return numerator // denominator


class LinearBase(nn.Module):
    """This rank's part of a `input_size -> output_size` linear, computed by `quant_method`.

    Sizes: `input_size`/`output_size` are the whole layer's; `input_size_per_partition` and
    `output_size_per_partition` (the sum of `output_partition_sizes`, one entry per fused part)
    are this rank's: `forward` maps `[..., input_size_per_partition]` to
    `[..., output_size_per_partition]` (before any gather). `params_dtype` is the dtype of the
    activations and of the bias (the default dtype when the layer was built).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        *,
        input_size_per_partition: int | None = None,
        output_partition_sizes: Sequence[int] | None = None,
        params_dtype: torch.dtype | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = (
            input_size if input_size_per_partition is None else input_size_per_partition
        )
        self.output_partition_sizes = list(output_partition_sizes or [output_size])
        self.output_size_per_partition = sum(self.output_partition_sizes)
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.prefix = prefix
        self.tp_size = get_tp_size()
        self.tp_rank = get_tp_rank()
        # NOTE: the config sees the layer with its sizes set but no parameters yet.
        method = None if quant_config is None else quant_config.get_quant_method(self, prefix)
        self.quant_method: LinearMethodBase = (
            method if method is not None else UnquantizedLinearMethod()
        )
        use_gemv = getattr(quant_config, "use_gemv", None)
        if use_gemv is not None and isinstance(self.quant_method, UnquantizedLinearMethod):
            self.quant_method.use_gemv = use_gemv  # the engine's switch (`KernelConfig.gemv`)
        # NOTE: the weight is registered before the bias: the dummy loader fills parameters in
        # registration order from one generator.
        self.quant_method.create_weights(
            self,
            self.input_size_per_partition,
            self.output_partition_sizes,
            input_size,
            output_size,
            self.params_dtype,
            weight_loader=self.weight_loader,
        )
        if bias:
            # NOTE: inference only: no gradients, so loaders can copy into the parameter.
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.empty(self.output_size_per_partition, dtype=self.params_dtype),
                requires_grad=False,
            )
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        default_weight_loader(param, loaded_weight, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size_per_partition}, out={self.output_size_per_partition}, "
            f"bias={self.bias is not None}, tp={self.tp_size}, "
            f"quant={type(self.quant_method).__name__}"
        )


class ReplicatedLinear(LinearBase):
    """The same full weight on every rank."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        *,
        params_dtype: torch.dtype | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__(
            input_size,
            output_size,
            bias,
            params_dtype=params_dtype,
            quant_config=quant_config,
            prefix=prefix,
        )


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks: rank r holds rows `[r * n, (r + 1) * n)` of the weight.

    With `gather_output` the ranks' outputs are concatenated, else each keeps its slice.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        gather_output: bool = False,
        *,
        params_dtype: torch.dtype | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        tp_size = get_tp_size()
        divide(output_size, tp_size)
        # NOTE: fused subclasses set `output_sizes` (each part's whole size) before this runs;
        # every part is split over the ranks, in order.
        parts = getattr(self, "output_sizes", None) or [output_size]
        super().__init__(
            input_size,
            output_size,
            bias,
            output_partition_sizes=[divide(size, tp_size) for size in parts],
            params_dtype=params_dtype,
            quant_config=quant_config,
            prefix=prefix,
        )
        self.gather_output = gather_output

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} is not fused; got shard_id={shard_id!r}")
        size = param.shape[0]
        _copy_rows(param, 0, loaded_weight, self.tp_rank * size, size, size * self.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant_method.apply(self, x, self.bias)
        return tensor_model_parallel_all_gather(y) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input fused into one matmul (e.g. gate_up).

    Each rank holds its slice of every part, parts in order; `shard_id` is the part's index.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool = False,
        gather_output: bool = False,
        *,
        params_dtype: torch.dtype | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        self.output_sizes = list(output_sizes)
        tp_size = get_tp_size()
        for size in self.output_sizes:
            divide(size, tp_size)
        super().__init__(
            input_size,
            sum(self.output_sizes),
            bias,
            gather_output,
            params_dtype=params_dtype,
            quant_config=quant_config,
            prefix=prefix,
        )

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if shard_id is None:  # an already-fused checkpoint tensor: load part by part
            for i, part in enumerate(loaded_weight.split(self.output_sizes, dim=0)):
                self.weight_loader(param, part, i)
            return
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id must index {self.output_sizes}, got {shard_id!r}")
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        _copy_rows(param, offset, loaded_weight, self.tp_rank * size, size, size * self.tp_size)


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections fused, split by attention heads (GQA aware).

    Each rank holds `total_num_heads / tp` query heads and `total_num_kv_heads / tp` KV heads;
    when tp exceeds the KV heads, each KV head is replicated on `tp / total_num_kv_heads` ranks.
    `shard_id` is "q", "k" or "v". `output_size` counts replicated KV heads once per replica
    (`output_size_per_partition * tp`), as vLLM's.
    """

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = False,
        *,
        params_dtype: torch.dtype | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        tp_size = get_tp_size()
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp_size)
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.num_kv_head_replicas = divide(tp_size, total_num_kv_heads)
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp_size)
            self.num_kv_head_replicas = 1
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_size
        self.output_sizes = [self.q_size * tp_size, self.kv_size * tp_size, self.kv_size * tp_size]
        super().__init__(
            hidden_size,
            output_size,
            bias,
            gather_output=False,
            params_dtype=params_dtype,
            quant_config=quant_config,
            prefix=prefix,
        )

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if shard_id is None:  # an already-fused checkpoint tensor: load part by part
            total_q = self.total_num_heads * self.head_size
            total_kv = self.total_num_kv_heads * self.head_size
            parts = loaded_weight.split([total_q, total_kv, total_kv], dim=0)
            for sid, part in zip(("q", "k", "v"), parts, strict=True):
                self.weight_loader(param, part, sid)
            return
        if shard_id == "q":
            offset, size, src_index = 0, self.q_size, self.tp_rank
            total = self.total_num_heads * self.head_size
        elif shard_id in ("k", "v"):
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, src_index = self.kv_size, self.tp_rank // self.num_kv_head_replicas
            total = self.total_num_kv_heads * self.head_size
        else:
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        _copy_rows(param, offset, loaded_weight, src_index * size, size, total)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed (all-reduce).

    The input is expected already split (the output of a column-parallel layer). The bias is
    added once, on rank 0, before the reduction.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        reduce_results: bool = True,
        *,
        params_dtype: torch.dtype | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__(
            input_size,
            output_size,
            bias,
            input_size_per_partition=divide(input_size, get_tp_size()),
            params_dtype=params_dtype,
            quant_config=quant_config,
            prefix=prefix,
        )
        self.reduce_results = reduce_results

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} is not fused; got shard_id={shard_id!r}")
        if param.ndim == 1:  # the bias is not split
            default_weight_loader(param, loaded_weight)
            return
        size = param.shape[1]
        if loaded_weight.ndim != 2 or loaded_weight.shape[1] != size * self.tp_size:
            raise ValueError(
                f"checkpoint tensor {tuple(loaded_weight.shape)} does not match parameter "
                f"{tuple(param.shape)} split over {self.tp_size} ranks"
            )
        default_weight_loader(param, loaded_weight.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        y = self.quant_method.apply(self, x, bias)
        return tensor_model_parallel_all_reduce(y) if self.reduce_results else y

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """`self(silu_and_mul(gate_up))` for `gate_up [..., 2 * input_size_per_partition]` (gate,
        then up), through `quant_method.apply_silu_mul`: one GEMV launch when the fused GEMV
        applies (unquantized), else the activation then the product."""
        bias = self.bias if self.tp_rank == 0 else None
        y = self.quant_method.apply_silu_mul(self, gate_up, bias)
        return tensor_model_parallel_all_reduce(y) if self.reduce_results else y


def _copy_rows(
    param: nn.Parameter,
    dst_start: int,
    loaded_weight: torch.Tensor,
    src_start: int,
    size: int,
    src_rows: int,
) -> None:
    """`param[dst_start : dst_start + size] = loaded_weight[src_start : src_start + size]`.

    `src_rows` is the number of rows the full checkpoint tensor must have.
    """
    if loaded_weight.shape[0] != src_rows or loaded_weight.shape[1:] != param.shape[1:]:
        raise ValueError(
            f"checkpoint tensor {tuple(loaded_weight.shape)} does not match parameter "
            f"{tuple(param.shape)} (expected {src_rows} rows in the checkpoint)"
        )
    param.data.narrow(0, dst_start, size).copy_(loaded_weight.narrow(0, src_start, size))
