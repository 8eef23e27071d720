"""Chained hashing of full KV blocks: a block's key covers its whole prefix.

`hash(block i) = sha256(hash(block i-1) || token ids of block i || extra keys)`, so two requests
share a cached block only if every token before and inside it is the same.
"""

from __future__ import annotations

import hashlib
from array import array

BlockHash = bytes

# NOTE: the root parent hash; a salted request mixes its salt into the first block instead.
_ROOT = b"pagedllm-kv-root"


def hash_block(
    parent: BlockHash | None, token_ids: list[int], extra_keys: bytes = b""
) -> BlockHash:
    h = hashlib.sha256(parent if parent is not None else _ROOT)
    h.update(array("q", token_ids).tobytes())
    if extra_keys:
        h.update(b"\x00extra")
        h.update(extra_keys)
    return h.digest()


def extend_block_hashes(
    block_hashes: list[BlockHash],
    token_ids: list[int],
    block_size: int,
    cache_salt: str | None = None,
) -> None:
    """Appends the hashes of the full blocks of `token_ids` not yet in `block_hashes`."""
    num_full = len(token_ids) // block_size
    for i in range(len(block_hashes), num_full):
        parent = block_hashes[i - 1] if i > 0 else None
        extra = cache_salt.encode() if (i == 0 and cache_salt) else b""
        block_hashes.append(
            hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], extra)
        )
