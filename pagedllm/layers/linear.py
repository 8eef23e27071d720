"""Linear layers that own their tensor-parallel split, weight loading and collectives.

Each parameter carries `weight_loader(param, loaded_weight, shard_id=None)`, which takes the full
checkpoint tensor and copies this rank's slice into the parameter (for fused layers, `shard_id`
names the part of the fused output the tensor fills). At tensor-parallel size 1 every layer is a
plain linear; weights are `[output, input]` as in `nn.Linear`.

Every matmul goes through `apply_linear`: `F.linear` (cuBLAS), except for inputs of a few rows on
CUDA (decode steps) where the Triton GEMV of `gemv_kernels` was measured faster: at batch 1 the
step is bound by reading the weights, and the GEMV streams them faster than cuBLAS does. `RowParallelLinear.forward_silu_mul` also folds the MLP's
SiLU-and-mul into the down projection's GEMV.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.distributed import (
    get_tp_rank,
    get_tp_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from pagedllm.layers import fused
from pagedllm.layers.activation import SiluAndMul

# The most rows that may take the GEMV. Measured on the H200 (`python -m pagedllm.benchmarks.gemv`):
# one row always gains; 2-4 rows only for the shapes `gemv_kernels.wins` lists; 8 and more never.
GEMV_MAX_M = 4

_silu_and_mul = SiluAndMul()


def _gemv_kernels(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool = False
) -> ModuleType | None:
    """The GEMV module when it should compute this product, else None (cuBLAS)."""
    if not (fused.enabled(x) and fused.gemv_enabled() and x.dim() > 0):
        return None
    m = math.prod(x.shape[:-1])
    if m > GEMV_MAX_M:
        return None
    kernels = fused.gemv_kernels()
    n, k = weight.shape
    act = "silu_mul" if silu_mul else ""
    if kernels.supports(x, weight, bias, silu_mul=silu_mul) and kernels.wins(m, n, k, act):
        return kernels
    return None


def apply_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through the GEMV for a few rows on CUDA (see above)."""
    kernels = _gemv_kernels(x, weight, bias)
    if kernels is not None:
        return kernels.gemv(x, weight, bias)
    return F.linear(x, weight, bias)


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


def _new_param(*shape: int) -> nn.Parameter:
    # NOTE: inference only: parameters never need gradients, so loaders can copy into them.
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class LinearBase(nn.Module):
    """A `[output_size, input_size]` weight (this rank's part) and an optional bias."""

    def __init__(self, input_size: int, output_size: int, bias: bool, bias_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.tp_size = get_tp_size()
        self.tp_rank = get_tp_rank()
        self.weight = _new_param(output_size, input_size)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        if bias:
            self.bias: nn.Parameter | None = _new_param(bias_size)
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        default_weight_loader(param, loaded_weight, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}, "
            f"tp={self.tp_size}"
        )


class ReplicatedLinear(LinearBase):
    """The same full weight on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(input_size, output_size, bias, output_size)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks: rank r holds rows `[r * n, (r + 1) * n)` of the weight.

    With `gather_output` the ranks' outputs are concatenated, else each keeps its slice.
    """

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, gather_output: bool = False
    ) -> None:
        per_rank = divide(output_size, get_tp_size())
        super().__init__(input_size, per_rank, bias, per_rank)
        self.gather_output = gather_output

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} is not fused; got shard_id={shard_id!r}")
        size = param.shape[0]
        _copy_rows(param, 0, loaded_weight, self.tp_rank * size, size, size * self.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = apply_linear(x, self.weight, self.bias)
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
    ) -> None:
        self.output_sizes = list(output_sizes)
        tp_size = get_tp_size()
        for size in self.output_sizes:
            divide(size, tp_size)
        super().__init__(input_size, sum(self.output_sizes), bias, gather_output)

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
    `shard_id` is "q", "k" or "v".
    """

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = False,
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
        super().__init__(hidden_size, output_size, bias, gather_output=False)

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
        self, input_size: int, output_size: int, bias: bool = False, reduce_results: bool = True
    ) -> None:
        super().__init__(divide(input_size, get_tp_size()), output_size, bias, output_size)
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
        y = apply_linear(x, self.weight, bias)
        return tensor_model_parallel_all_reduce(y) if self.reduce_results else y

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """`self(silu_and_mul(gate_up))` for `gate_up [..., 2 * input_size]` (gate, then up):
        one GEMV launch when the GEMV applies, else the activation then the linear."""
        bias = self.bias if self.tp_rank == 0 else None
        kernels = _gemv_kernels(gate_up, self.weight, bias, silu_mul=True)
        if kernels is not None:
            y = kernels.gemv_silu_mul(gate_up, self.weight, bias)
            return tensor_model_parallel_all_reduce(y) if self.reduce_results else y
        return self(_silu_and_mul(gate_up))


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
