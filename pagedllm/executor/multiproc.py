"""The multiprocess executor: one worker process per rank on this machine.

The engine core writes each call once into a shared-memory ring (`ShmBroadcast`), pickled once
(a `SchedulerOutput` is lists and ints: no tensors cross); every rank reads and runs it in
order. Replies come back on one pipe per rank, tagged with the call's number: a step's sampled
ids from rank 0 only (TP rank 0; every rank samples the same ids from the same all-gathered
logits and the same seeded generators), the start-up calls' from every rank (the KV-cache size
is the least any rank can hold). A call that raises on a rank sends its error at once; the
executor raises it from the call waiting for a reply. A rank that exits, or a reply that never
comes while a rank is gone, fails the executor for good (`WorkerDiedError`), instead of
hanging; the engine's requests then fail with it.

Grammar bitmasks cross through shared memory too: `bitmask_buffer` hands out a view of a
segment the workers map, so `sample_tokens` sends its name and shape, not the mask.

Launch, sample and abandon calls do not wait: with async scheduling the core launches step
N + 1 before it collects step N, and the ranks run them in that order, as one worker would.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import tempfile
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing import connection, shared_memory
from typing import Any, cast

import numpy as np

from pagedllm.config import EngineConfig
from pagedllm.engine.core import StepHandle
from pagedllm.engine.exceptions import RequestPreparationError
from pagedllm.engine.kv_cache_spec import KVCacheSpec
from pagedllm.engine.outputs import GrammarOutput, ModelRunnerOutput, SchedulerOutput
from pagedllm.executor.shm_broadcast import ShmBroadcast, ShmHandle, attach_untracked

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0
# Calls every rank answers; the others only rank 0 (errors: every rank, at once).
ALL_RANKS = frozenset({"ready", "determine_num_blocks", "initialize_cache", "warm_up"})
REPLIED = ALL_RANKS | {"kv_cache_specs", "collect"}


class WorkerDiedError(RuntimeError):
    """A worker process exited or failed in a way that leaves the ranks out of step: the
    executor cannot run another step."""


@dataclass(frozen=True)
class _RemoteError:
    """An exception raised on a rank, as text (exceptions do not all unpickle)."""

    rank: int
    type_name: str
    message: str
    trace: str
    request_id: str | None = None

    def to_exception(self) -> Exception:
        if self.request_id is not None:  # the engine fails that request alone
            return RequestPreparationError(self.request_id, RuntimeError(self.message))
        return RuntimeError(f"worker rank {self.rank}: {self.type_name}: {self.message}")


@dataclass(frozen=True)
class _BitmaskRef:
    name: str
    offset: int
    rows: int
    words: int


class _RemoteStep:
    """The handle of a launched step: its number on the ranks."""

    __slots__ = ("step_id",)

    def __init__(self, step_id: int) -> None:
        self.step_id = step_id


class MultiprocExecutor:
    def __init__(self, config: EngineConfig) -> None:
        parallel = config.parallel_config
        self.world_size = parallel.world_size
        self._dead: WorkerDiedError | None = None
        self._call_id = 0
        self._step_id = 0
        self._bitmask: shared_memory.SharedMemory | None = None
        self._init_dir = tempfile.TemporaryDirectory(prefix="pagedllm-dist-")
        init_method = f"file://{os.path.join(self._init_dir.name, 'init')}"
        self.queue = ShmBroadcast.create(self.world_size)
        ctx = mp.get_context("spawn")
        self.procs: list[Any] = []
        self.conns: list[connection.Connection] = []
        for rank in range(self.world_size):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker_main,
                args=(config, rank, init_method, self.queue.handle, send),
                name=f"pagedllm-worker-{rank}",
                daemon=True,
            )
            proc.start()
            send.close()
            self.procs.append(proc)
            self.conns.append(recv)
        # NOTE: an executor dropped without `shutdown` still ends its processes.
        weakref.finalize(self, _kill, self.procs, self.queue)
        try:
            self._wait(0, ALL_RANKS, timeout=START_TIMEOUT_S, every_rank=True)
        except BaseException:
            self.shutdown()
            raise
        logger.info("multiprocess executor: %d worker processes ready", self.world_size)

    # ----- the Executor protocol -----

    def determine_num_blocks(self) -> int:
        return min(self._call("determine_num_blocks"))

    def kv_cache_specs(self) -> dict[str, KVCacheSpec]:
        return self._call("kv_cache_specs")[0]

    def initialize_cache(self, num_blocks: int) -> None:
        self._call("initialize_cache", num_blocks)

    def warm_up(self) -> None:
        self._call("warm_up")

    def launch_model(self, scheduler_output: SchedulerOutput) -> _RemoteStep:
        self._step_id += 1
        self._send("launch", self._step_id, scheduler_output)
        return _RemoteStep(self._step_id)

    def sample_tokens(self, handle: StepHandle, grammar: GrammarOutput) -> None:
        self._send(
            "sample",
            cast(_RemoteStep, handle).step_id,
            grammar.req_ids,
            self._bitmask_ref(grammar.bitmask),
        )

    def bitmask_buffer(self, rows: int, words: int) -> np.ndarray:
        """A view of shared memory (one half per step parity, as the worker double-buffers)."""
        half = max(rows, 64) * words * 4
        if self._bitmask is None or self._bitmask.size < 2 * half:
            if self._bitmask is not None:
                self._bitmask.close()
                self._bitmask.unlink()
            self._bitmask = shared_memory.SharedMemory(create=True, size=2 * half)
        offset = (self._step_id % 2) * (self._bitmask.size // 2)
        buf = np.ndarray((rows, words), dtype=np.int32, buffer=self._bitmask.buf, offset=offset)
        return buf

    def collect_output(self, handle: StepHandle) -> ModelRunnerOutput:
        return self._call("collect", cast(_RemoteStep, handle).step_id)[0]

    def abandon_steps(self) -> None:
        self._send("abandon")

    def shutdown(self) -> None:
        if not self.procs:
            return
        if self._dead is None:
            with contextlib.suppress(Exception):  # a dead ring: the processes are killed below
                self._send("shutdown")
        for proc in self.procs:
            proc.join(timeout=10)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.procs.clear()
        self.conns = []
        self.queue.close()
        if self._bitmask is not None:
            self._bitmask.close()
            self._bitmask.unlink()
            self._bitmask = None
        self._init_dir.cleanup()

    # ----- calls and replies -----

    def _bitmask_ref(self, bitmask: Any) -> Any:
        shm = self._bitmask
        if shm is not None and isinstance(bitmask, np.ndarray) and bitmask.flags.c_contiguous:
            assert shm.buf is not None
            start = np.frombuffer(shm.buf, dtype=np.uint8).ctypes.data
            offset = bitmask.ctypes.data - start
            if 0 <= offset < shm.size:
                return _BitmaskRef(shm.name, offset, *bitmask.shape)
        return bitmask  # not ours: it travels in the message

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise self._dead
        for rank, proc in enumerate(self.procs):
            if not proc.is_alive():
                self._dead = WorkerDiedError(
                    f"worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
                )
                raise self._dead

    def _send(self, method: str, *args: Any) -> int:
        self._check_alive()
        self._call_id += 1
        data = pickle.dumps((self._call_id, method, args), protocol=pickle.HIGHEST_PROTOCOL)
        self.queue.write(data, check=self._check_alive)
        return self._call_id

    def _call(self, method: str, *args: Any) -> list[Any]:
        call_id = self._send(method, *args)
        return self._wait(call_id, {method}, every_rank=method in ALL_RANKS)

    def _wait(
        self, call_id: int, methods: set[str] | frozenset[str], *, every_rank: bool,
        timeout: float | None = None,
    ) -> list[Any]:  # fmt: skip
        """The replies to call `call_id` (every rank's, or rank 0's), by rank; raises the first
        error any rank sends meanwhile."""
        waiting = set(range(self.world_size)) if every_rank else {0}
        results: dict[int, Any] = {}
        sentinels = {proc.sentinel: rank for rank, proc in enumerate(self.procs)}
        while waiting:
            ready = connection.wait([*self.conns, *sentinels], timeout)
            if not ready:
                self._dead = WorkerDiedError(f"no reply from the workers in {timeout} s")
                raise self._dead
            for item in ready:
                if item in sentinels:
                    # NOTE: drain the pipes first: an error sent before the exit says more.
                    self._drain()
                    self._check_alive()
                    continue
                conn = cast(connection.Connection, item)
                rank = self.conns.index(conn)
                reply_id, kind, value = conn.recv()
                if kind == "error":
                    raise self._error(value)
                if reply_id == call_id and rank in waiting:
                    results[rank] = value
                    waiting.discard(rank)
                # NOTE: other replies belong to calls abandoned after an error: dropped.
        return [results[r] for r in sorted(results)]

    def _drain(self) -> None:
        for conn in self.conns:
            while conn.poll():
                try:
                    _, kind, value = conn.recv()
                except (EOFError, OSError):
                    break
                if kind == "error":
                    raise self._error(value)

    def _error(self, error: _RemoteError) -> Exception:
        if error.type_name == "startup":
            self._dead = WorkerDiedError(
                f"worker rank {error.rank} failed to start: {error.message}"
            )
            return self._dead
        logger.error("worker rank %d raised:\n%s", error.rank, error.trace)
        return error.to_exception()


def _kill(procs: list[Any], queue: ShmBroadcast) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    queue.close()


# ----- the worker process -----


def _remote_error(rank: int, exc: BaseException, type_name: str | None = None) -> _RemoteError:
    return _RemoteError(
        rank,
        type_name or type(exc).__name__,
        str(exc),
        "".join(traceback.format_exception(exc)),
        exc.request_id if isinstance(exc, RequestPreparationError) else None,
    )


def _worker_main(
    config: EngineConfig, rank: int, init_method: str, handle: ShmHandle, conn: Any
) -> None:
    import torch

    from pagedllm.distributed.parallel_state import (
        destroy_model_parallel,
        init_distributed,
        initialize_model_parallel,
    )

    parent = os.getppid()

    def parent_alive() -> None:
        if os.getppid() != parent:
            raise SystemExit(0)  # the engine is gone: nothing to serve

    parallel = config.parallel_config
    try:
        cuda = config.device_config.device == "cuda"
        if cuda:
            torch.cuda.set_device(parallel.data_parallel_rank * parallel.world_size + rank)
        else:
            ranks = parallel.world_size * parallel.data_parallel_size
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))
        init_distributed(parallel.world_size, rank, init_method, "nccl" if cuda else "gloo")
        initialize_model_parallel(
            parallel.tensor_parallel_size,
            parallel.pipeline_parallel_size,
            parallel.enable_expert_parallel,
        )
        from pagedllm.worker.worker import Worker

        worker = Worker(config)
        queue = ShmBroadcast.attach(handle, rank)
    except BaseException as exc:  # reported, then the process ends
        conn.send((0, "error", _remote_error(rank, exc, "startup")))
        return
    conn.send((0, "ok", None))
    steps: dict[int, Any] = {}
    masks: dict[str, shared_memory.SharedMemory] = {}
    try:
        while True:
            call_id, method, args = pickle.loads(queue.read(check=parent_alive))
            if method == "shutdown":
                break
            try:
                result = _run(worker, steps, masks, method, args)
            except Exception as exc:  # the executor raises it
                conn.send((call_id, "error", _remote_error(rank, exc)))
                continue
            if method in ALL_RANKS or (method in REPLIED and rank == 0):
                conn.send((call_id, "ok", result))
    finally:
        for shm in masks.values():
            shm.close()
        queue.close()
        destroy_model_parallel()


def _run(
    worker: Any,
    steps: dict[int, Any],
    masks: dict[str, shared_memory.SharedMemory],
    method: str,
    args: tuple[Any, ...],
) -> Any:
    if method == "launch":
        step_id, scheduler_output = args
        steps[step_id] = worker.launch_model(scheduler_output)
        return None
    if method == "sample":
        step_id, req_ids, mask = args
        if isinstance(mask, _BitmaskRef):
            mask = _attach_mask(masks, mask)
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


def _attach_mask(masks: dict[str, shared_memory.SharedMemory], ref: _BitmaskRef) -> np.ndarray:
    if ref.name not in masks:
        for old in masks.values():  # the executor made a larger segment: the old one is gone
            old.close()
        masks.clear()
        masks[ref.name] = attach_untracked(ref.name)
    buf = masks[ref.name].buf
    return np.ndarray((ref.rows, ref.words), dtype=np.int32, buffer=buf, offset=ref.offset)
