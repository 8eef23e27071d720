"""`DPEngineCoreClient`: data parallelism behind one API server: one engine-core process per
data-parallel rank (each with its own scheduler, KV cache and worker processes on its own
devices), behind the interface of one `EngineCoreClient`, for `AsyncLLM`.

A user request (and its n > 1 samples) goes to the core with the fewest live requests, ties
broken by the KV-cache usage its last stats reported; aborts and stop-string finishes follow it
to its core. Outputs are read from every core as they come; each batch is handed on decoded,
with the stats of all cores merged (the server's gauges and counters are the engine's, not
one core's). One core dying fails the whole engine, as one core would.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.engine import serial
from pagedllm.engine.core_client import EngineCoreClient
from pagedllm.engine.dp import RequestRouter, rank_config
from pagedllm.engine.request import Request
from pagedllm.engine.stats import SchedulerStats, merge_stats


class DPEngineCoreClient:
    def __init__(self, config: EngineConfig) -> None:
        self.clients: list[EngineCoreClient] = []
        try:
            for rank in range(config.parallel_config.data_parallel_size):
                self.clients.append(EngineCoreClient(rank_config(config, rank)))
        except BaseException:
            self.shutdown()
            raise
        self.info = self.clients[0].info
        self._stats = [SchedulerStats() for _ in self.clients]
        self.router = RequestRouter(len(self.clients))
        self._reads: dict[int, asyncio.Task[Any]] = {}

    # ----- health -----

    @property
    def dead_reason(self) -> str | None:
        for rank, client in enumerate(self.clients):
            if client.dead_reason is not None:
                return f"data-parallel rank {rank}: {client.dead_reason}"
        return None

    @property
    def is_dead(self) -> bool:
        return any(c.is_dead for c in self.clients)

    @property
    def proc(self) -> Any:
        """A dead core's process if one died, else the first one's (for health checks)."""
        for client in self.clients:
            if not client.proc.is_alive():
                return client.proc
        return self.clients[0].proc

    # ----- inputs -----

    def add_requests(self, requests: list[Request]) -> None:
        """A user request's core requests (its n samples), all to one core."""
        if not requests:
            return
        usage = lambda r: self._stats[r].kv_cache_usage  # noqa: E731
        ranks = {self.router.route(r.request_id, usage) for r in requests}
        assert len(ranks) == 1, "one user request's samples go to one core"
        self.clients[ranks.pop()].add_requests(requests)

    def abort_requests(self, request_ids: list[str]) -> None:
        for rank, ids in self.router.by_rank(request_ids).items():
            self.clients[rank].abort_requests(ids)
        self.router.forget(request_ids)

    def finish_requests(self, request_ids: list[str]) -> None:
        for rank, ids in self.router.by_rank(request_ids).items():
            self.clients[rank].finish_requests(ids)
        self.router.forget(request_ids)

    # ----- outputs -----

    async def get_output(self) -> tuple[int, Any]:
        """The next message of any core: an OUTPUTS batch comes decoded, its stats merged over
        the cores; FAILED or DEAD as the core sent it (the engine is then dead)."""
        for rank, client in enumerate(self.clients):
            if rank not in self._reads:
                self._reads[rank] = asyncio.ensure_future(client.get_output())
        done, _ = await asyncio.wait(self._reads.values(), return_when=asyncio.FIRST_COMPLETED)
        task = next(iter(done))
        rank = next(r for r, t in self._reads.items() if t is task)
        del self._reads[rank]
        kind, payload = task.result()
        if kind != serial.OutputKind.OUTPUTS:
            return kind, f"data-parallel rank {rank}: {payload}"
        batch = serial.decode_outputs(payload)
        self._stats[rank] = batch.stats
        ended = [o.request_id for o in batch.outputs if o.finish_reason is not None]
        self.router.forget(ended)
        batch.stats = merge_stats(self._stats)
        return kind, batch

    def reset_async(self) -> None:
        for task in self._reads.values():
            task.cancel()
        self._reads.clear()
        for client in self.clients:
            client.reset_async()

    def shutdown(self) -> None:
        for client in self.clients:
            client.shutdown()
