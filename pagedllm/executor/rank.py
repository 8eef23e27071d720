"""What one rank of a distributed executor runs, whichever executor started it (the multiprocess
executor's worker processes, the Ray executor's actors): its set-up (`setup_rank`: device,
torch.distributed, the model-parallel groups, the `Worker`), the dispatch of the executor's calls
(`RankHost.execute`) and the errors it sends back (`RemoteError`, as text: exceptions do not all
unpickle).

Which calls answer: the start-up calls (`ALL_RANKS`) from every rank (the KV-cache size is the
least any rank can hold; the KV-cache specs are every stage's layers), `collect` from one rank
only (`output_rank`: TP rank 0 of the last pipeline stage; every rank of a stage samples the same
ids from the same all-gathered logits and the same seeded generators); launch, sample and
abandon from none. An error answers from any rank, at once.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from pagedllm.config import EngineConfig
from pagedllm.engine.exceptions import RequestPreparationError
from pagedllm.engine.outputs import GrammarOutput
from pagedllm.executor.shm_broadcast import attach_untracked

# Calls every rank answers; the others only rank 0 (errors: every rank, at once).
ALL_RANKS = frozenset(
    {"ready", "determine_num_blocks", "kv_cache_specs", "initialize_cache", "warm_up"}
)
REPLIED = ALL_RANKS | {"collect"}


class WorkerDiedError(RuntimeError):
    """A worker exited or failed in a way that leaves the ranks out of step: the executor cannot
    run another step."""


@dataclass(frozen=True)
class RemoteError:
    """An exception raised on a rank, as text."""

    rank: int
    type_name: str
    message: str
    trace: str
    request_id: str | None = None

    @classmethod
    def of(cls, rank: int, exc: BaseException, type_name: str | None = None) -> RemoteError:
        return cls(
            rank,
            type_name or type(exc).__name__,
            str(exc),
            "".join(traceback.format_exception(exc)),
            exc.request_id if isinstance(exc, RequestPreparationError) else None,
        )

    def to_exception(self) -> Exception:
        """What the executor raises: a start-up failure fails it for good (`WorkerDiedError`);
        a request's preparation fails that request alone."""
        if self.type_name == "startup":
            return WorkerDiedError(f"worker rank {self.rank} failed to start: {self.message}")
        if self.request_id is not None:
            return RequestPreparationError(self.request_id, RuntimeError(self.message))
        return RuntimeError(f"worker rank {self.rank}: {self.type_name}: {self.message}")


@dataclass(frozen=True)
class BitmaskRef:
    """A grammar bitmask in a shared-memory segment the executor owns (same machine only)."""

    name: str
    offset: int
    rows: int
    words: int


def output_rank(config: EngineConfig) -> int:
    """The rank whose step results the engine gets: TP rank 0 of the last pipeline stage
    (where the logprobs are; every rank holds the same sampled ids)."""
    parallel = config.parallel_config
    return parallel.world_size - parallel.tensor_parallel_size


class RemoteStep:
    """The handle of a launched step: its number on the ranks."""

    __slots__ = ("step_id",)

    def __init__(self, step_id: int) -> None:
        self.step_id = step_id


class RankCalls:
    """The start-up half of the Executor protocol for executors whose ranks live elsewhere,
    over the subclass's `_call(method, *args)`, which returns every rank's reply."""

    def _call(self, method: str, *args: Any) -> list[Any]:
        raise NotImplementedError

    def determine_num_blocks(self) -> int:
        """The least any rank can hold."""
        return min(self._call("determine_num_blocks"))

    def kv_cache_specs(self) -> dict[str, Any]:
        """Every stage's layers (the TP ranks of a stage hold the same names)."""
        specs: dict[str, Any] = {}
        for part in self._call("kv_cache_specs"):
            specs.update(part)
        return specs

    def initialize_cache(self, num_blocks: int) -> None:
        self._call("initialize_cache", num_blocks)

    def warm_up(self) -> None:
        self._call("warm_up")


def setup_rank(
    config: EngineConfig,
    rank: int,
    init_method: str,
    *,
    cuda_device: int | None = None,
    num_threads: int | None = None,
) -> Any:
    """Joins the world as `rank` and builds this rank's `Worker`: on CUDA on device
    `cuda_device` (NCCL), else on the CPU with `num_threads` torch threads (gloo)."""
    import torch

    from pagedllm.distributed.parallel_state import init_distributed, initialize_model_parallel

    parallel = config.parallel_config
    cuda = config.device_config.device == "cuda"
    if cuda:
        torch.cuda.set_device(cuda_device or 0)
    elif num_threads is not None:
        torch.set_num_threads(max(1, num_threads))
    init_distributed(parallel.world_size, rank, init_method, "nccl" if cuda else "gloo")
    initialize_model_parallel(
        parallel.tensor_parallel_size,
        parallel.pipeline_parallel_size,
        parallel.enable_expert_parallel,
    )
    from pagedllm.worker.worker import Worker

    return Worker(config)


class RankHost:
    """One rank's `Worker` and its launched steps, running the executor's calls by name."""

    def __init__(self, worker: Any, rank: int, reply_rank: int) -> None:
        self.worker = worker
        self.rank = rank
        self.reply_rank = reply_rank
        self.steps: dict[int, Any] = {}
        self.masks: dict[str, shared_memory.SharedMemory] = {}

    def replies(self, method: str) -> bool:
        """Whether this rank answers `method` when it succeeds."""
        return method in ALL_RANKS or (method in REPLIED and self.rank == self.reply_rank)

    def execute(self, method: str, args: tuple[Any, ...]) -> tuple[str, Any]:
        """("ok", the result) or ("error", a `RemoteError`): an exception never escapes."""
        try:
            return "ok", self.run(method, args)
        except Exception as exc:  # the executor raises it
            return "error", RemoteError.of(self.rank, exc)

    def run(self, method: str, args: tuple[Any, ...]) -> Any:
        worker, steps = self.worker, self.steps
        if method == "launch":
            step_id, scheduler_output = args
            steps[step_id] = worker.launch_model(scheduler_output)
            return None
        if method == "sample":
            step_id, req_ids, mask = args
            if isinstance(mask, BitmaskRef):
                mask = self._attach_mask(mask)
            worker.sample_tokens(steps.get(step_id), GrammarOutput(req_ids, mask))
            return None
        if method == "collect":
            return worker.collect_output(steps.pop(args[0], None))
        if method == "abandon":
            steps.clear()
            worker.abandon_steps()
            return None
        if method == "kv_cache_specs":
            return worker.kv_cache_specs
        if method in ("determine_num_blocks", "initialize_cache", "warm_up"):
            return getattr(worker, method)(*args)
        raise ValueError(f"unknown executor call {method!r}")

    def _attach_mask(self, ref: BitmaskRef) -> np.ndarray:
        masks = self.masks
        if ref.name not in masks:
            for old in masks.values():  # the executor made a larger segment: done with this one
                with contextlib.suppress(BufferError):
                    old.close()
            masks.clear()
            masks[ref.name] = attach_untracked(ref.name)
        buf = masks[ref.name].buf
        return np.ndarray((ref.rows, ref.words), dtype=np.int32, buffer=buf, offset=ref.offset)

    def close(self) -> None:
        """Unmaps the bitmasks and tears down the process groups."""
        from pagedllm.distributed.parallel_state import destroy_model_parallel

        for shm in self.masks.values():
            shm.close()
        self.masks.clear()
        destroy_model_parallel()


def cpu_threads_per_rank(ranks: int) -> int:
    """The torch threads of each of `ranks` CPU ranks sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // ranks)
