"""Tensor-parallel rank, size and collectives, read from `torch.distributed`.

For now the tensor-parallel group is the whole world: with torch.distributed not initialized
(one process) the size is 1, the rank 0, and every collective is the identity, so layers call
them unconditionally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_tp_size() -> int:
    """Number of ranks a tensor-parallel layer is split over (1 without torch.distributed)."""
    return dist.get_world_size() if _initialized() else 1


def get_tp_rank() -> int:
    """This process's rank in the tensor-parallel group (0 without torch.distributed)."""
    return dist.get_rank() if _initialized() else 0


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over the tensor-parallel ranks (in place when tp > 1); `x` itself at tp 1."""
    if get_tp_size() == 1:
        return x
    dist.all_reduce(x)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The ranks' `x` concatenated along `dim`, in rank order; `x` itself at tp 1."""
    world = get_tp_size()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)
