"""Which KV blocks each request holds: prefix-cache lookup, allocation for new tokens, and freeing."""

from __future__ import annotations

from collections.abc import Sequence

from pagedllm.engine.block_hash import extend_block_hashes
from pagedllm.engine.block_pool import BlockPool, KVCacheBlock
from pagedllm.engine.request import Request
from pagedllm.engine.stats import PrefixCacheStats
from pagedllm.utils import cdiv


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
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
        self.pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
