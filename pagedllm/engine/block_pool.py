"""The pool of KV-cache blocks: reference counts, an LRU queue of free blocks, and the map from a
full block's hash to the block that holds it (the prefix cache).

NOTE (invariants):
- a block is in the free queue iff its ref count is 0;
- every block in `cached` carries the hash it is filed under; a free block keeps its hash (and
  stays findable) until it is taken for new content, the only time a cached block is evicted;
  a block whose content duplicates an already cached one carries its hash but is not filed;
- the free queue pops least recently freed first; callers free a request's blocks tail first so
  a sequence's last blocks, the least likely to be shared, go first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from pagedllm.engine.block_hash import BlockHash


class KVCacheBlock:
    __slots__ = ("block_hash", "block_id", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks
        )
        self.cached: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Takes `n` free blocks (LRU first), evicting their cached content; ref counts become 1."""
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks with {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Takes a reference on blocks found in the prefix cache (reviving free ones)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drops one reference on each block; those reaching 0 join the free queue in order."""
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block.block_id] = block

    def cache_blocks(self, blocks: list[KVCacheBlock], hashes: list[BlockHash]) -> None:
        """Publishes full blocks under their hashes. A hash already cached keeps its first block."""
        if not self.enable_caching:
            return
        for block, block_hash in zip(blocks, hashes):
            if block.block_hash is not None:
                continue  # already published (a prefix-cache hit, or cached in an earlier step)
            block.block_hash = block_hash
            self.cached.setdefault(block_hash, block)

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        if self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
        block.block_hash = None

    def forget_free_blocks(self) -> None:
        """Forgets the hashes of every free block (after a failed step: blocks published before
        their content was computed must not be found)."""
        for block in self.free_queue.values():
            self._evict(block)

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached hash; refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached.clear()
        return True
