"""The multiprocess executor: one worker process per rank on this machine.

The engine core writes each call once into a shared-memory ring (`ShmBroadcast`), pickled once
(a `SchedulerOutput` is lists and ints: no tensors cross); every rank reads and runs it in
order. Replies come back on one pipe per rank, tagged with the call's number: a step's results
from one rank only (`output_rank`: TP rank 0 of the last pipeline stage; every rank of a stage
samples the same ids from the same all-gathered logits and the same seeded generators, and the
last stage broadcasts them to the others), the start-up calls' from every rank (the KV-cache
size is the least any rank can hold; the KV-cache specs are every stage's layers). A call that raises on a rank sends its error at once; the
executor raises it from the call waiting for a reply. A rank that exits, or a reply that never
comes while a rank is gone, fails the executor for good (`WorkerDiedError`), instead of
hanging; the engine's requests then fail with it.

Grammar bitmasks cross through shared memory too: `bitmask_buffer` hands out a view of a
segment the workers map, so `sample_tokens` sends its name and shape, not the mask.

Launch, sample and abandon calls do not wait: with async scheduling the core launches step
N + 1 before it collects step N, and the ranks run them in that order, as one worker would.

A rank's set-up and its dispatch of the calls are `executor/rank.py`'s (`setup_rank`,
`RankHost`), shared with the Ray executor.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import tempfile
import weakref
from multiprocessing import connection, shared_memory
from typing import Any, cast

import numpy as np

from pagedllm.config import EngineConfig
from pagedllm.engine.core import StepHandle
from pagedllm.engine.outputs import GrammarOutput, ModelRunnerOutput, SchedulerOutput
from pagedllm.executor.rank import (
    ALL_RANKS,
    BitmaskRef,
    RankCalls,
    RankHost,
    RemoteError,
    RemoteStep,
    WorkerDiedError,
    cpu_threads_per_rank,
    output_rank,
    setup_rank,
)
from pagedllm.executor.shm_broadcast import SPIN_S, ShmBroadcast, ShmHandle

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0
GPU_SPIN_S = 0.5  # how long a GPU worker polls for the next call before it sleeps


class MultiprocExecutor(RankCalls):
    def __init__(self, config: EngineConfig) -> None:
        parallel = config.parallel_config
        self.world_size = parallel.world_size
        self.output_rank = output_rank(config)
        self._dead: WorkerDiedError | None = None
        self._call_id = 0
        self._step_id = 0
        self._bitmask: shared_memory.SharedMemory | None = None
        self._old_masks: list[shared_memory.SharedMemory] = []
        self._abandoned = -1  # the last `abandon_steps` call: errors of earlier calls are stale
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

    def launch_model(self, scheduler_output: SchedulerOutput) -> RemoteStep:
        self._step_id += 1
        self._send("launch", self._step_id, scheduler_output)
        return RemoteStep(self._step_id)

    def sample_tokens(self, handle: StepHandle, grammar: GrammarOutput) -> None:
        self._send(
            "sample",
            cast(RemoteStep, handle).step_id,
            grammar.req_ids,
            self._bitmask_ref(grammar.bitmask),
        )

    def bitmask_buffer(self, rows: int, words: int) -> np.ndarray:
        """A view of shared memory (one half per step parity, as the worker double-buffers)."""
        half = max(rows, 64) * words * 4
        if self._bitmask is None or self._bitmask.size < 2 * half:
            if self._bitmask is not None:
                # NOTE: kept until shutdown: a rank may not have read its last mask yet.
                self._old_masks.append(self._bitmask)
            self._bitmask = shared_memory.SharedMemory(create=True, size=2 * half)
        offset = (self._step_id % 2) * (self._bitmask.size // 2)
        buf = np.ndarray((rows, words), dtype=np.int32, buffer=self._bitmask.buf, offset=offset)
        return buf

    def collect_output(self, handle: StepHandle) -> ModelRunnerOutput:
        return self._call("collect", cast(RemoteStep, handle).step_id)[0]

    def abandon_steps(self) -> None:
        self._abandoned = self._send("abandon")

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
        for shm in [*self._old_masks, *([self._bitmask] if self._bitmask else [])]:
            with contextlib.suppress(BufferError):  # a view still held: unmapped at exit
                shm.close()
            shm.unlink()
        self._bitmask, self._old_masks = None, []
        self._init_dir.cleanup()

    # ----- calls and replies -----

    def _bitmask_ref(self, bitmask: Any) -> Any:
        shm = self._bitmask
        if shm is not None and isinstance(bitmask, np.ndarray) and bitmask.flags.c_contiguous:
            assert shm.buf is not None
            start = np.frombuffer(shm.buf, dtype=np.uint8).ctypes.data
            offset = bitmask.ctypes.data - start
            if 0 <= offset < shm.size:
                return BitmaskRef(shm.name, offset, *bitmask.shape)
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
        waiting = set(range(self.world_size)) if every_rank else {self.output_rank}
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
                if kind == "error" and reply_id > self._abandoned:
                    raise self._error(value)
                if reply_id == call_id and rank in waiting:
                    results[rank] = value
                    waiting.discard(rank)
                # NOTE: other replies, and errors of calls before the last `abandon_steps` (the
                # other ranks' copies of an error already raised), are dropped.
        return [results[r] for r in sorted(results)]

    def _drain(self) -> None:
        for conn in self.conns:
            while conn.poll():
                try:
                    reply_id, kind, value = conn.recv()
                except (EOFError, OSError):
                    break
                if kind == "error" and reply_id > self._abandoned:
                    raise self._error(value)

    def _error(self, error: RemoteError) -> Exception:
        exc = error.to_exception()
        if isinstance(exc, WorkerDiedError):  # it failed to start
            self._dead = exc
        else:
            logger.error("worker rank %d raised:\n%s", error.rank, error.trace)
        return exc


def _kill(procs: list[Any], queue: ShmBroadcast) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    queue.close()


# ----- the worker process -----


def _worker_main(
    config: EngineConfig, rank: int, init_method: str, handle: ShmHandle, conn: Any
) -> None:
    parent = os.getppid()

    def parent_alive() -> None:
        if os.getppid() != parent:
            raise SystemExit(0)  # the engine is gone: nothing to serve

    parallel = config.parallel_config
    try:
        cuda = config.device_config.device == "cuda"
        worker = setup_rank(
            config,
            rank,
            init_method,
            cuda_device=parallel.data_parallel_rank * parallel.world_size + rank,
            num_threads=cpu_threads_per_rank(parallel.world_size * parallel.data_parallel_size),
        )
        queue = ShmBroadcast.attach(handle, rank)
    except BaseException as exc:  # reported, then the process ends
        conn.send((0, "error", RemoteError.of(rank, exc, "startup")))
        return
    conn.send((0, "ok", None))
    # NOTE: a GPU worker polls for the next call between steps (it has a core of its own: the
    # next step's call must not wait out a sleep); on the CPU the ranks share the cores.
    spin_s = GPU_SPIN_S if cuda else SPIN_S
    host = RankHost(worker, rank, output_rank(config))
    try:
        while True:
            call_id, method, args = pickle.loads(queue.read(parent_alive, spin_s))
            if method == "shutdown":
                break
            kind, value = host.execute(method, args)
            if kind == "error" or host.replies(method):
                conn.send((call_id, kind, value))
    finally:
        queue.close()
        host.close()
