"""Which KV blocks each request holds: prefix-cache lookup, allocation for new tokens, and freeing.

With `sliding_window` (every layer attends over the same last `sliding_window` tokens), a running
request's leading blocks go back to the pool once every query it will still run is past them:
block `i` is freed when `(i + 1) * block_size <= num_computed_tokens - sliding_window + 1`. Its
place in the request's list holds `DROPPED` (the list keeps its length: block `i` of a request is
its tokens `i * block_size …`). The worker keeps the freed ids in its block table; its kernels
never read a key out of the window, and its cache writes go to new slots only.

NOTE: freed during `schedule()`, while the previous step may still run on the device and read
them: a block taken again is first written by a later step, queued behind it on the same stream.
A request scheduled for the first time (or resumed) frees nothing in that call, so the block ids
it sends whole to the worker are all real.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedllm.engine.block_hash import extend_block_hashes
from pagedllm.engine.block_pool import BlockPool, KVCacheBlock
from pagedllm.engine.request import Request
from pagedllm.engine.stats import PrefixCacheStats
from pagedllm.utils import cdiv

# The place of a block freed out of the sliding window in a request's block list.
DROPPED = KVCacheBlock(-1)


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool,
        sliding_window: int | None = None,
    ) -> None:
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be positive, got {sliding_window}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        # Leading blocks of each request freed out of the sliding window.
        self.num_dropped: dict[str, int] = {}
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # Number of leading blocks of each request already published in the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def usage(self) -> float:
        return self.pool.usage

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The longest cached prefix of the request, as blocks and a token count.

        NOTE: at least the last token is always left to compute: its logits are needed to sample.
        Requests asking for prompt logprobs skip the lookup (as vLLM's): cached positions would
        give no logits. Their own blocks are still published for others.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        self._update_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_prefix_lookup(self, request: Request, num_hit_tokens: int) -> None:
        """Counts one admitted request's lookup (a lookup retried after a failed allocation
        is counted once, when it succeeds)."""
        if not self.enable_caching:
            return
        stats = self.prefix_cache_stats
        stats.requests += 1
        stats.queries += request.num_tokens
        stats.hits += num_hit_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
        num_new_computed_tokens: int = 0,
    ) -> list[KVCacheBlock] | None:
        """Makes room for `num_new_tokens` more tokens after the computed ones (including
        `new_computed_blocks`, a prefix-cache hit on first schedule). Returns the newly
        allocated blocks, or None (changing nothing) when the pool cannot supply them."""
        held = self.req_to_blocks.setdefault(request.request_id, [])
        if self.sliding_window is not None and held:
            self._drop_out_of_window(request, held)
        num_total = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        num_needed = cdiv(num_total, self.block_size) - len(held) - len(new_computed_blocks)
        # Hit blocks sitting in the free queue stop being free once touched.
        num_revived = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_revived:
            if not held:
                del self.req_to_blocks[request.request_id]
            return None
        self.pool.touch(new_computed_blocks)
        held.extend(new_computed_blocks)
        new_blocks = self.pool.get_new_blocks(max(num_needed, 0))
        held.extend(new_blocks)
        self._cache_full_blocks(request, min(num_total, request.num_tokens))
        return new_blocks

    def _drop_out_of_window(self, request: Request, held: list[KVCacheBlock]) -> None:
        """Frees the leading blocks no query of the request will read again (module doc)."""
        assert self.sliding_window is not None
        req_id = request.request_id
        start = self.num_dropped.get(req_id, 0)
        first_key = request.num_computed_tokens - self.sliding_window + 1
        end = min(max(first_key, 0) // self.block_size, len(held))
        if self.enable_caching:
            # NOTE: published ones only (full blocks are, once computed): they stay findable in
            # the prefix cache until taken for new content, and none is published after.
            end = min(end, self.num_cached_blocks.get(req_id, 0))
        if end <= start:
            return
        self.pool.free_blocks(reversed(held[start:end]))
        held[start:end] = [DROPPED] * (end - start)
        self.num_dropped[req_id] = end

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Publishes the request's blocks that `num_tokens` fills (content known, computed by the
        end of this step)."""
        if not self.enable_caching:
            return
        start = self.num_cached_blocks.get(request.request_id, 0)
        end = num_tokens // self.block_size
        if end <= start:
            return
        self._update_hashes(request)
        blocks = self.req_to_blocks[request.request_id]
        self.pool.cache_blocks(blocks[start:end], request.block_hashes[start:end])
        self.num_cached_blocks[request.request_id] = end

    def _update_hashes(self, request: Request) -> None:
        extend_block_hashes(
            request.block_hashes, request.all_token_ids, self.block_size, request.cache_salt
        )

    def free(self, request: Request) -> None:
        """Releases the request's blocks, tail first (see BlockPool)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        dropped = self.num_dropped.pop(request.request_id, 0)
        self.pool.free_blocks(reversed(blocks[dropped:]))

    def get_block_ids(self, request_id: str) -> list[int]:
        """Every block id of a request scheduled for the first time (none dropped yet)."""
        assert not self.num_dropped.get(request_id), "a dropped block has no id to send"
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
