"""Data parallelism in one process: `DPEngineCores`, N engine cores (each its own scheduler,
KV cache and executor, whose workers run on their own devices) behind the interface of one
`EngineCore`, for `LLMEngine` (the offline `LLM`); the server runs one core process per rank
instead (`core_client.DPEngineCoreClient`).

A request goes to the core with the fewest unfinished requests (ties: the least KV-cache
usage), and its n > 1 samples with it (they share its prompt's prefix-cache blocks); every
call about a request goes to its core. A step steps every core that has work: each core's
executor launches its step on its own devices before the next core's turn (with async
scheduling the devices run side by side while the host goes round). Stats are merged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from pagedllm.config import EngineConfig
from pagedllm.engine.core import EngineCore
from pagedllm.engine.outputs import EngineCoreOutput
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.engine.stats import PrefixCacheStats, SchedulerStats, merge_stats
from pagedllm.executor import executor_class


def rank_config(config: EngineConfig, dp_rank: int) -> EngineConfig:
    """The config of data-parallel rank `dp_rank`'s engine core."""
    parallel = dataclasses.replace(config.parallel_config, data_parallel_rank=dp_rank)
    return dataclasses.replace(config, parallel_config=parallel)


def parent_request_id(core_id: str) -> str:
    """The user request a core request belongs to (n > 1 samples are `<index>_<parent>`)."""
    head, sep, rest = core_id.partition("_")
    return rest if sep and head.isdigit() else core_id


class RequestRouter:
    """Which data-parallel rank holds each request: a user request and its n > 1 samples on
    one rank, chosen when its first core request comes, forgotten when its last one ends."""

    def __init__(self, size: int) -> None:
        self.live = [0] * size  # core requests not ended, per rank
        self._owner: dict[str, int] = {}  # core request id -> its rank
        self._parent: dict[str, tuple[int, int]] = {}  # user request id -> (rank, live)

    def route(self, core_id: str, key: Callable[[int], Any]) -> int:
        """The rank for `core_id`: its user request's, else the least `(live, key(rank))`."""
        parent = parent_request_id(core_id)
        if parent in self._parent:
            rank, count = self._parent[parent]
        else:
            rank = min(range(len(self.live)), key=lambda r: (self.live[r], key(r)))
            count = 0
        self._parent[parent] = (rank, count + 1)
        self._owner[core_id] = rank
        self.live[rank] += 1
        return rank

    def by_rank(self, core_ids: list[str]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for core_id in core_ids:
            rank = self._owner.get(core_id)
            if rank is not None:
                groups.setdefault(rank, []).append(core_id)
        return groups

    def forget(self, core_ids: list[str]) -> None:
        for core_id in core_ids:
            rank = self._owner.pop(core_id, None)
            if rank is None:
                continue
            self.live[rank] -= 1
            parent = parent_request_id(core_id)
            _, count = self._parent[parent]
            if count == 1:
                del self._parent[parent]
            else:
                self._parent[parent] = (rank, count - 1)


class DPEngineCores:
    def __init__(self, config: EngineConfig) -> None:
        size = config.parallel_config.data_parallel_size
        self.cores: list[EngineCore] = []
        try:
            for rank in range(size):
                rc = rank_config(config, rank)
                self.cores.append(EngineCore(rc, executor_class(rc)(rc)))
        except BaseException:
            self.shutdown()
            raise
        self.num_blocks = self.cores[0].num_blocks
        self.router = RequestRouter(size)

    def add_request(self, request: Request) -> None:
        usage = lambda r: self.cores[r].scheduler.kv_cache_manager.usage  # noqa: E731
        rank = self.router.route(request.request_id, usage)
        self.cores[rank].add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        for rank, ids in self.router.by_rank(request_ids).items():
            self.cores[rank].abort_requests(ids)
        self.router.forget(request_ids)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        for rank, ids in self.router.by_rank(request_ids).items():
            self.cores[rank].finish_requests(ids, status)
        self.router.forget(request_ids)

    def has_unfinished_requests(self) -> bool:
        return any(c.has_unfinished_requests() for c in self.cores)

    def step(self) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        for core in self.cores:
            if core.has_unfinished_requests():
                outputs += core.step()
        self.router.forget([o.request_id for o in outputs if o.finish_reason is not None])
        return outputs

    def num_unfinished_requests(self) -> int:
        return sum(c.num_unfinished_requests() for c in self.cores)

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.make_stats().prefix_cache_stats

    def reset_prefix_cache(self) -> bool:
        return all([c.reset_prefix_cache() for c in self.cores])

    def make_stats(self) -> SchedulerStats:
        return merge_stats([c.make_stats() for c in self.cores])

    def shutdown(self) -> None:
        for core in self.cores:
            core.shutdown()
