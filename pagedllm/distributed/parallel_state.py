"""Process groups of the parallel dimensions, and the collectives the layers call.

The world of one engine is `pipeline_parallel_size × tensor_parallel_size` ranks, ordered
`rank = pp_rank × tp + tp_rank` (a TP group is consecutive ranks: on one machine, neighbouring
GPUs). `init_distributed(world_size, rank, init_method, backend)` joins the world;
`initialize_model_parallel(tp, pp)` then makes:
- the TP groups (the layers' all-reduce and all-gather),
- the PP groups (stage-to-stage sends, ranks `tp_rank, tp_rank + tp, …`),
- the EP group: with `--enable-expert-parallel` the experts are split over the TP group's ranks
  instead of each expert's intermediate dimension (`expert_parallel`: set by the model loader
  from the ParallelConfig).
Each group has a device communicator (NCCL on CUDA, gloo on the CPU) and a gloo twin for host
objects. Without torch.distributed (one process) every size is 1, every rank 0 and every
collective the identity, so layers call them unconditionally. `destroy_model_parallel` tears all
of it down (the worker process calls it on exit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class GroupCoordinator:
    """One group this rank belongs to: its ranks (global), this rank's place in them, and the
    torch.distributed groups (None for a group of one: every collective is then the identity)."""

    ranks: list[int]
    rank_in_group: int
    device_group: Any = None
    cpu_group: Any = None

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.world_size - 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the group (in place); `x` itself for a group of one."""
        if self.world_size == 1:
            return x
        dist.all_reduce(x, group=self.device_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' `x` concatenated along `dim`, in rank order."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=dim)

    def send(self, x: torch.Tensor, dst: int) -> None:
        """`x` to the group's rank `dst` (matched by a `recv` there)."""
        dist.send(x.contiguous(), self.ranks[dst], group=self.device_group)

    def recv(self, like: torch.Tensor, src: int) -> torch.Tensor:
        out = torch.empty_like(like)
        dist.recv(out, self.ranks[src], group=self.device_group)
        return out

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """`x` of the group's rank `src` into every rank's `x` (in place)."""
        if self.world_size > 1:
            dist.broadcast(x, self.ranks[src], group=self.device_group)
        return x

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """A picklable host object from the group's rank `src` to all (over gloo)."""
        if self.world_size == 1:
            return obj
        box = [obj if self.rank_in_group == src else None]
        dist.broadcast_object_list(box, src=self.ranks[src], group=self.cpu_group)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.cpu_group)


_TP: GroupCoordinator | None = None
_PP: GroupCoordinator | None = None
_EXPERT_PARALLEL = False


def _single() -> GroupCoordinator:
    return GroupCoordinator(ranks=[0], rank_in_group=0)


def init_distributed(world_size: int, rank: int, init_method: str, backend: str) -> None:
    """Joins the world of `world_size` ranks as `rank` (backend "nccl" or "gloo")."""
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank)


def _new_group(ranks: list[int], backend: str) -> tuple[Any, Any]:
    device = dist.new_group(ranks, backend=backend)
    cpu = device if backend == "gloo" else dist.new_group(ranks, backend="gloo")
    return device, cpu


def initialize_model_parallel(tp: int, pp: int, expert_parallel: bool = False) -> None:
    """Makes this rank's TP and PP groups (see the module); every rank calls it, in the same
    order, since `new_group` is collective."""
    global _TP, _PP, _EXPERT_PARALLEL
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != tp * pp:
        raise ValueError(
            f"the world has {world} ranks, but tensor_parallel_size × pipeline_parallel_size = "
            f"{tp} × {pp} = {tp * pp}"
        )
    backend = dist.get_backend()
    for stage in range(pp):
        ranks = list(range(stage * tp, (stage + 1) * tp))
        groups = _new_group(ranks, backend)
        if rank in ranks:
            _TP = GroupCoordinator(ranks, ranks.index(rank), *groups)
    for tp_rank in range(tp):
        ranks = list(range(tp_rank, world, tp))
        groups = _new_group(ranks, backend)
        if rank in ranks:
            _PP = GroupCoordinator(ranks, ranks.index(rank), *groups)
    _EXPERT_PARALLEL = expert_parallel


def destroy_model_parallel() -> None:
    global _TP, _PP, _EXPERT_PARALLEL
    _TP = _PP = None
    _EXPERT_PARALLEL = False
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_tp_group() -> GroupCoordinator:
    if _TP is not None:
        return _TP
    if dist.is_available() and dist.is_initialized():
        # NOTE: a world joined without `initialize_model_parallel` (tests): all of it is TP.
        return GroupCoordinator(list(range(dist.get_world_size())), dist.get_rank())
    return _single()


def get_pp_group() -> GroupCoordinator:
    return _PP if _PP is not None else _single()


def get_tp_size() -> int:
    """Number of ranks a tensor-parallel layer is split over (1 without torch.distributed)."""
    return get_tp_group().world_size


def get_tp_rank() -> int:
    """This process's rank in the tensor-parallel group (0 without torch.distributed)."""
    return get_tp_group().rank_in_group


def expert_parallel_enabled() -> bool:
    """Whether MoE layers split their experts over the TP ranks (EP) instead of each expert."""
    return _EXPERT_PARALLEL and get_tp_size() > 1


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over the tensor-parallel ranks (in place when tp > 1); `x` itself at tp 1."""
    return get_tp_group().all_reduce(x)


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The ranks' `x` concatenated along `dim`, in rank order; `x` itself at tp 1."""
    return get_tp_group().all_gather(x, dim)
