"""The Ray executor: one Ray actor per rank, on the nodes and GPUs of a Ray cluster.

It joins the cluster this process can reach (`RAY_ADDRESS`, or the one `ray start` left on this
machine), else starts a local one, and reserves a placement group of `world_size` bundles (a GPU
each on CUDA, a CPU each on the CPU): on one node (STRICT_PACK) when one node has room for all,
else packed over as few nodes as fit. The ranks are numbered node by node (the driver's node
first; on a node, by GPU id), so a TP group's ranks share a node where they can. Each actor sets its
rank up as a worker process of the multiprocess executor does (`executor/rank.py`), joining
torch.distributed over TCP at rank 0's node address and a port free there; on CUDA it sees every
GPU the placement group holds on its node (NCCL then uses P2P) and takes its own.

Each call is pickled once and sent to every actor as a method call (Ray runs one caller's calls
to an actor in order; a payload over `PUT_BYTES` goes to the object store once, and the actors
read it from there). Launch, sample and abandon do not wait: their futures are kept, and the
first call that waits (collect, for `output_rank`'s result; the start-up calls, for every rank's)
raises any error a rank answered meanwhile (once per call; those of calls before an
`abandon_steps` are the abandoned steps' and dropped). An actor that dies (its process or its
node) resolves its futures with Ray's error: the executor then fails for good
(`WorkerDiedError`) instead of hanging. Grammar bitmasks travel in the call (nodes share no
memory).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import time
import weakref
from typing import Any, cast

import numpy as np
import ray
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pagedllm.config import EngineConfig
from pagedllm.engine.core import StepHandle
from pagedllm.engine.outputs import GrammarOutput, ModelRunnerOutput, SchedulerOutput
from pagedllm.executor.rank import (
    ALL_RANKS,
    RankCalls,
    RankHost,
    RemoteError,
    RemoteStep,
    WorkerDiedError,
    output_rank,
    setup_rank,
)

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0
PLACEMENT_TIMEOUT_S = 120.0
SHUTDOWN_TIMEOUT_S = 10.0
# A payload this large goes to the object store once, not once per actor.
PUT_BYTES = 64 * 1024
# The driver's environment the actors get (a cluster's workers do not inherit it).
ENV_PREFIXES = ("PAGEDLLM_", "HF_", "NCCL_", "GLOO_")


class _RayWorker:
    """One rank (a Ray actor): set up by `setup`, then runs the executor's calls."""

    def __init__(self) -> None:
        self.host: RankHost | None = None

    def node(self) -> tuple[str, str, list[str]]:
        """(node id, node IP, the GPU ids Ray gave this actor)."""
        gpus = [str(g) for g in ray.get_gpu_ids()]
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), gpus

    def pid(self) -> int:
        return os.getpid()

    def free_port(self) -> int:
        with socket.socket() as sock:
            sock.bind(("", 0))
            return int(sock.getsockname()[1])

    def setup(
        self, config: EngineConfig, rank: int, init_method: str, visible_gpus: list[str],
        gpu: str | None,
    ) -> tuple[str, Any]:  # fmt: skip
        try:
            cuda_device = None
            if gpu is not None:  # NOTE: before torch first touches CUDA in this process
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible_gpus)
                cuda_device = visible_gpus.index(gpu)
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
            worker = setup_rank(
                config, rank, init_method, cuda_device=cuda_device, num_threads=int(cpus)
            )
            self.host = RankHost(worker, rank, output_rank(config))
        except Exception as exc:  # the executor raises it
            return "error", RemoteError.of(rank, exc, "startup")
        return "ok", None

    def execute(self, payload: bytes) -> tuple[str, Any] | None:
        """The call's ("ok", result) if this rank answers it, its ("error", ...) if it raised."""
        assert self.host is not None, "setup first"
        method, args = pickle.loads(payload)
        kind, value = self.host.execute(method, args)
        return (kind, value) if kind == "error" or self.host.replies(method) else None

    def close(self) -> None:
        if self.host is not None:
            self.host.close()
            self.host = None


RayWorker = ray.remote(_RayWorker)


def connect() -> None:
    """Joins the Ray cluster this process can reach, else starts a local one."""
    if ray.is_initialized():
        return
    try:
        ray.init(address="auto")
    except ConnectionError:
        logger.info("no Ray cluster to join: starting a local one")
        ray.init()


class RayExecutor(RankCalls):
    def __init__(self, config: EngineConfig) -> None:
        self.world_size = config.parallel_config.world_size
        self.output_rank = output_rank(config)
        self._dead: WorkerDiedError | None = None
        self._call_id = 0
        self._step_id = 0
        self._abandoned = 0  # errors of calls up to this one belong to abandoned steps
        self._reported: set[int] = set()
        # The futures not yet looked at, in submission order: (call id, rank).
        self._pending: dict[Any, tuple[int, int]] = {}
        self.workers: list[Any] = []
        self.node_ids: list[str] = []  # the Ray node of each rank
        connect()
        cuda = config.device_config.device == "cuda"
        self.placement_group: PlacementGroup | None
        self.placement_group, self._owns_group = _placement_group(self.world_size, cuda)
        # NOTE: an executor dropped without `shutdown` still ends its actors.
        weakref.finalize(
            self, _release, self.workers, self.placement_group if self._owns_group else None
        )
        try:
            self._start(config, cuda)
        except BaseException:
            self.shutdown()
            raise
        logger.info(
            "Ray executor: %d actors ready on %d node(s)", self.world_size, len(set(self.node_ids))
        )

    def _start(self, config: EngineConfig, cuda: bool) -> None:
        group = self.placement_group
        assert group is not None
        env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
        options: dict[str, Any] = {"num_cpus": 0, "num_gpus": 1} if cuda else {"num_cpus": 1}
        if env:
            options["runtime_env"] = {"env_vars": env}
        actors: list[Any] = [
            RayWorker.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=i
                ),
                **options,
            ).remote()
            for i in range(self.world_size)
        ]
        self.workers.extend(actors)  # NOTE: the finalizer kills them, in whatever order
        nodes = self._gather_start([a.node.remote() for a in actors])
        driver = ray.get_runtime_context().get_node_id()
        order = sorted(
            range(len(actors)),
            key=lambda i: (nodes[i][0] != driver, nodes[i][0], [_gpu_key(g) for g in nodes[i][2]]),
        )
        self.workers[:] = [actors[i] for i in order]
        nodes = [nodes[i] for i in order]
        self.node_ids = [n[0] for n in nodes]
        host = nodes[0][1]
        port = self._gather_start([self.workers[0].free_port.remote()])[0]
        init_method = f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
        visible: dict[str, list[str]] = {}
        for node_id, _, gpus in nodes:
            visible.setdefault(node_id, []).extend(gpus)
        setups = [
            worker.setup.remote(
                config, rank, init_method, sorted(visible[node_id], key=_gpu_key),
                gpus[0] if cuda else None,
            )
            for rank, (worker, (node_id, _, gpus)) in enumerate(zip(self.workers, nodes))
        ]  # fmt: skip
        self._gather_start(setups, replies=True)

    # ----- the Executor protocol -----

    def launch_model(self, scheduler_output: SchedulerOutput) -> RemoteStep:
        self._step_id += 1
        self._submit("launch", self._step_id, scheduler_output)
        return RemoteStep(self._step_id)

    def sample_tokens(self, handle: StepHandle, grammar: GrammarOutput) -> None:
        step_id = cast(RemoteStep, handle).step_id
        self._submit("sample", step_id, grammar.req_ids, grammar.bitmask)

    def bitmask_buffer(self, rows: int, words: int) -> np.ndarray:
        # NOTE: a fresh array: the call serializes it when it is submitted.
        return np.empty((rows, words), dtype=np.int32)

    def collect_output(self, handle: StepHandle) -> ModelRunnerOutput:
        refs = self._submit("collect", cast(RemoteStep, handle).step_id)
        return self._wait({refs[self.output_rank]: self.output_rank})[0]

    def abandon_steps(self) -> None:
        self._submit("abandon")
        self._abandoned = self._call_id

    def shutdown(self) -> None:
        if not self.workers:
            return
        if self._dead is None and ray.is_initialized():
            closes = [w.close.remote() for w in self.workers]
            with contextlib.suppress(Exception):
                ray.wait(closes, num_returns=len(closes), timeout=SHUTDOWN_TIMEOUT_S)
        _release(self.workers, None)
        self._pending.clear()
        if self.placement_group is not None and self._owns_group:
            with contextlib.suppress(Exception):
                remove_placement_group(self.placement_group)
        self.placement_group = None

    # ----- calls and replies -----

    def _submit(self, method: str, *args: Any) -> list[Any]:
        if self._dead is not None:
            raise self._dead
        self._call_id += 1
        payload: Any = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        if len(payload) > PUT_BYTES and self.world_size > 1:
            payload = ray.put(payload)
        refs = [worker.execute.remote(payload) for worker in self.workers]
        for rank, ref in enumerate(refs):
            self._pending[ref] = (self._call_id, rank)
        return refs

    def _call(self, method: str, *args: Any) -> list[Any]:
        refs = self._submit(method, *args)
        wanted = dict(zip(refs, range(self.world_size))) if method in ALL_RANKS else {}
        if not wanted:
            wanted = {refs[self.output_rank]: self.output_rank}
        return self._wait(wanted)

    def _wait(self, wanted: dict[Any, int]) -> list[Any]:
        """The results of the futures `wanted` (by rank); raises the first error any call
        answers meanwhile, or `WorkerDiedError` for an actor that died."""
        results: dict[int, Any] = {}
        while len(results) < len(wanted):
            ready, _ = ray.wait(list(self._pending), num_returns=1)
            for ref in ready:
                call_id, rank = self._pending.pop(ref)
                reply = self._get(ref, rank)
                if reply is not None and reply[0] == "error":
                    fresh = call_id > self._abandoned and call_id not in self._reported
                    if fresh or ref in wanted:
                        self._reported.add(call_id)
                        raise self._error(reply[1])
                    continue
                if ref in wanted:
                    results[rank] = None if reply is None else reply[1]
        return [results[r] for r in sorted(results)]

    def _gather_start(self, refs: list[Any], *, replies: bool = False) -> list[Any]:
        """Every start-up future's value, in order; a dead actor or a slow start fails, and
        with `replies` (("ok", value) or ("error", ...)) the first error, as it comes (the
        other ranks may wait for the failed one forever)."""
        values: dict[int, Any] = {}
        waiting = dict(zip(refs, range(len(refs))))
        deadline = time.monotonic() + START_TIMEOUT_S
        while waiting:
            timeout = max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(waiting), num_returns=1, timeout=timeout)
            if not ready:
                raise self._fail(
                    WorkerDiedError(f"the Ray workers did not start in {START_TIMEOUT_S} s")
                )
            rank = waiting.pop(ready[0])
            values[rank] = self._get(ready[0], rank)
            if replies and values[rank][0] == "error":
                raise self._fail(cast(RemoteError, values[rank][1]).to_exception())
        return [values[rank] for rank in range(len(refs))]

    def _get(self, ref: Any, rank: int) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as exc:
            node = self.node_ids[rank] if self.node_ids else "?"
            raise self._fail(
                WorkerDiedError(
                    f"worker rank {rank} (a Ray actor on node {node}) is gone: "
                    f"{type(exc).__name__}: {exc}"
                )
            ) from exc

    def _error(self, error: RemoteError) -> Exception:
        logger.error("worker rank %d raised:\n%s", error.rank, error.trace)
        return self._fail(error.to_exception())

    def _fail(self, exc: Exception) -> Exception:
        if isinstance(exc, WorkerDiedError):
            self._dead = exc
        return exc


def _gpu_key(gpu: str) -> tuple[int, str]:
    return (int(gpu), gpu) if gpu.isdigit() else (1 << 30, gpu)


def _placement_group(world_size: int, cuda: bool) -> tuple[PlacementGroup, bool]:
    """The placement group the ranks run in, and whether it is ours (to remove at shutdown):
    the one this driver runs in if it has room, else a new one."""
    resource = "GPU" if cuda else "CPU"
    current = get_current_placement_group()
    if current is not None and len(current.bundle_specs) >= world_size:
        return current, False
    per_node = [n["Resources"].get(resource, 0) for n in ray.nodes() if n["Alive"]]
    if sum(per_node) < world_size:
        raise ValueError(
            f"tensor_parallel_size × pipeline_parallel_size = {world_size} ranks need "
            f"{world_size} {resource}s, but the Ray cluster has {sum(per_node):g} "
            f"({len(per_node)} node(s))"
        )
    strategy = "STRICT_PACK" if max(per_node) >= world_size else "PACK"
    group = placement_group([{resource: 1.0}] * world_size, strategy=strategy)
    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(group)
        raise RuntimeError(
            f"the Ray cluster did not free {world_size} {resource}s ({strategy}) in "
            f"{PLACEMENT_TIMEOUT_S} s: ray status shows what holds them"
        )
    return group, True


def _release(workers: list[Any], group: PlacementGroup | None) -> None:
    if not ray.is_initialized():  # NOTE: Ray ended the driver's actors with the connection
        workers.clear()
        return
    for worker in workers:
        with contextlib.suppress(Exception):
            ray.kill(worker)
    workers.clear()
    if group is not None:
        with contextlib.suppress(Exception):
            remove_placement_group(group)
