"""Executors run a SchedulerOutput on one worker or on many; `executor_class` picks the one the
engine's `ParallelConfig` needs (the engine core's one place for that choice).

NOTE: torch-free: the executor modules (which import the worker, and torch) load only when
`executor_class` is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedllm.config import EngineConfig

if TYPE_CHECKING:
    from pagedllm.engine.core import Executor


def executor_class(config: EngineConfig) -> type[Executor]:
    """The executor for `config.parallel_config`: `UniProcExecutor` (one worker in the engine's
    own process), `MultiprocExecutor` (one worker process per rank) or `RayExecutor` (one Ray
    actor per rank, on a Ray cluster's nodes), by `ParallelConfig.executor_backend`."""
    backend = config.parallel_config.executor_backend
    if backend == "mp":
        from pagedllm.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor
    if backend == "ray":
        # NOTE: `ParallelConfig` has checked that Ray is installed.
        from pagedllm.executor.ray import RayExecutor

        return RayExecutor
    from pagedllm.executor.uniproc import UniProcExecutor

    return UniProcExecutor
