"""Distributed state: the parallel groups, sizes, ranks and collectives (identity at size 1)."""

from pagedllm.distributed.parallel_state import (
    expert_parallel_enabled,
    get_pp_group,
    get_tp_group,
    get_tp_rank,
    get_tp_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)

__all__ = [
    "expert_parallel_enabled",
    "get_pp_group",
    "get_tp_group",
    "get_tp_rank",
    "get_tp_size",
    "tensor_model_parallel_all_gather",
    "tensor_model_parallel_all_reduce",
]
