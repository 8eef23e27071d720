"""Distributed state: tensor-parallel size, rank and collectives (identity at tp 1)."""

from pagedllm.distributed.parallel_state import (
    get_tp_rank,
    get_tp_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)

__all__ = [
    "get_tp_rank",
    "get_tp_size",
    "tensor_model_parallel_all_gather",
    "tensor_model_parallel_all_reduce",
]
