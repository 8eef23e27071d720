"""Block pool and KV-cache manager: ref counts, LRU eviction, prefix-cache hits."""

import pytest

from pagedllm.engine.block_hash import extend_block_hashes, hash_block
from pagedllm.engine.block_pool import BlockPool
from pagedllm.engine.kv_cache_manager import KVCacheManager
from pagedllm.engine.request import Request
from pagedllm.sampling_params import SamplingParams


def make_request(req_id: str, tokens: list[int]) -> Request:
    return Request(req_id, tokens, SamplingParams(max_tokens=8), max_model_len=10_000)


def test_chained_hash_depends_on_prefix() -> None:
    a, b = [], []
    extend_block_hashes(a, [1, 2, 3, 4, 5, 6, 7, 8], 4)
    extend_block_hashes(b, [9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a[0] != b[0]
    assert a[1] != b[1], "same block content behind a different prefix must hash differently"
    assert hash_block(None, [1, 2]) == hash_block(None, [1, 2])
    assert hash_block(None, [1, 2], b"salt") != hash_block(None, [1, 2])


def test_forget_free_blocks_keeps_the_hashes_of_blocks_in_use() -> None:
    """After a failed step: free blocks may hold content never computed; in-use ones do not."""
    pool = BlockPool(4, enable_caching=True)
    held, freed = pool.get_new_blocks(1), pool.get_new_blocks(2)
    pool.cache_blocks(held + freed, [b"h0", b"h1", b"h2"])
    pool.free_blocks(freed)
    pool.forget_free_blocks()
    assert pool.get_cached_block(b"h0") is held[0]
    assert pool.get_cached_block(b"h1") is None and pool.get_cached_block(b"h2") is None
    assert all(b.block_hash is None for b in freed) and pool.num_free_blocks == 3


def test_pool_lru_and_eviction() -> None:
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.get_new_blocks(3)
    assert [b.ref_cnt for b in blocks] == [1, 1, 1] and pool.num_free_blocks == 1
    pool.cache_blocks(blocks[:2], [b"h0", b"h1"])
    pool.free_blocks(reversed(blocks))  # tail first: 2, 1, 0 join the queue in that order
    assert pool.num_free_blocks == 4
    assert pool.get_cached_block(b"h0") is blocks[0]
    # The never-used block 3 goes first, then 2 (no hash), then 1 (evicting h1), h0 survives.
    taken = pool.get_new_blocks(3)
    assert [b.block_id for b in taken] == [3, 2, 1]
    assert pool.get_cached_block(b"h1") is None
    assert pool.get_cached_block(b"h0") is blocks[0]
    with pytest.raises(RuntimeError):
        pool.free_blocks([blocks[0]])  # ref count is already 0


def test_prefix_hit_and_allocation_failure() -> None:
    mgr = KVCacheManager(num_blocks=6, block_size=4, enable_caching=True)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    r1 = make_request("a", prompt)
    assert mgr.allocate_slots(r1, 10) is not None
    assert mgr.get_block_ids("a") and len(mgr.get_block_ids("a")) == 3
    r2 = make_request("b", prompt + [99])
    hits, n = mgr.get_computed_blocks(r2)
    assert n == 8 and [b.block_id for b in hits] == mgr.get_block_ids("a")[:2]
    assert mgr.allocate_slots(r2, 3, hits, n) is not None
    assert [b.ref_cnt for b in hits] == [2, 2]
    # Asking for more than the pool has fails without side effects.
    r3 = make_request("c", list(range(100, 130)))
    before = mgr.pool.num_free_blocks
    assert mgr.allocate_slots(r3, 30) is None
    assert mgr.pool.num_free_blocks == before and "c" not in mgr.req_to_blocks
    mgr.free(r1)
    mgr.free(r2)
    assert mgr.pool.num_free_blocks == 6


def test_full_prompt_hit_leaves_last_token() -> None:
    mgr = KVCacheManager(num_blocks=8, block_size=4, enable_caching=True)
    r1 = make_request("a", list(range(8)))
    mgr.allocate_slots(r1, 8)
    r2 = make_request("b", list(range(8)))
    _, n = mgr.get_computed_blocks(r2)
    assert n == 4, "the last token is always recomputed, so only the first block may hit"


@pytest.mark.parametrize("caching", [True, False])
def test_sliding_window_frees_blocks_out_of_the_window(caching: bool) -> None:
    """Window 6, blocks of 4: once `num_computed - 6 + 1` passes a block's end, no later query
    reads it, and the block goes back to the pool (published ones stay findable)."""
    mgr = KVCacheManager(num_blocks=8, block_size=4, enable_caching=caching, sliding_window=6)
    prompt = list(range(100, 110))
    req = make_request("a", prompt)
    assert mgr.allocate_slots(req, 10) is not None  # first schedule: nothing dropped
    ids = mgr.get_block_ids("a")
    assert len(ids) == 3 and mgr.pool.num_free_blocks == 5
    req.num_computed_tokens = 10
    held = mgr.req_to_blocks["a"]
    for step in range(14):  # decode one token a step
        req.append_output_token_ids([7 + step])
        assert mgr.allocate_slots(req, 1) is not None
        req.num_computed_tokens += 1
        computed = req.num_computed_tokens - 1  # when this step's allocation ran
        dropped = max(computed - 6 + 1, 0) // 4
        if caching:  # only published (full, computed) blocks are dropped
            dropped = min(dropped, computed // 4)
        assert mgr.num_dropped.get("a", 0) == dropped
        assert all(b.block_id == -1 for b in held[:dropped])
        assert all(b.block_id >= 0 and b.ref_cnt == 1 for b in held[dropped:])
        assert mgr.pool.num_free_blocks == 8 - (len(held) - dropped)
    assert mgr.num_dropped["a"] >= 3, "the prompt's blocks went back to the pool"
    if caching:  # a dropped block is still a prefix-cache hit for the same prompt
        hits, n = mgr.get_computed_blocks(make_request("b", prompt + [1, 2]))
        assert n == 8 and [b.block_id for b in hits] == ids[:2]
    mgr.free(req)
    assert mgr.pool.num_free_blocks == 8 and "a" not in mgr.num_dropped


def test_sliding_window_none_beside_full_attention() -> None:
    from pagedllm.engine.kv_cache_spec import KVCacheSpec, SlidingWindowSpec, uniform_sliding_window

    full = KVCacheSpec(16, 2, 8, "float32")
    swa = SlidingWindowSpec(16, 2, 8, "float32", sliding_window=32)
    assert uniform_sliding_window({"a": swa, "b": swa}) == 32
    assert uniform_sliding_window({"a": swa, "b": full}) is None
    assert uniform_sliding_window({"a": full}) is None
    other = SlidingWindowSpec(16, 2, 8, "float32", sliding_window=64)
    assert uniform_sliding_window({"a": swa, "b": other}) is None
