"""`TorchRefAttention` and `build_metadata` against a dense attention written independently here.

Every case builds requests as (cached context length, query length): the context K/V are put in
the paged cache by hand (shuffled block ids), this step's K/V go through `forward`, and each
request's output is compared with plain softmax attention over its full, contiguous K/V in
float64 (explicit causal / sliding-window mask, GQA by `repeat_interleave`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.attention import torch_ref
from pagedllm.attention.backend import AttentionMetadata, get_attention_impl_cls
from pagedllm.attention.torch_ref import TorchRefAttention
from pagedllm.attention.utils import build_metadata

NUM_KV_HEADS = 2
FP32_ATOL = 1e-5
# NOTE: bf16 inputs, outputs rounded to bf16 (8 mantissa bits): half an ulp of values up to ~4.
BF16_ATOL, BF16_RTOL = 2e-2, 2e-2

# (context already in the cache, query length): a full prompt, prompt chunks after context,
# decode rows (one with no context at all), interleaved.
MIXED = [(0, 60), (200, 33), (999, 1), (0, 1), (45, 16), (130, 1), (17, 1), (500, 7), (63, 1)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Small ops: a second intra-op thread only adds barrier waits (10 ms each on a busy box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass
class Case:
    specs: list[tuple[int, int]]
    query: torch.Tensor  # [T, H, D]
    key: torch.Tensor  # [T, Hkv, D], this step's
    value: torch.Tensor
    full_keys: list[torch.Tensor]  # per request [seq_len, Hkv, D]
    full_values: list[torch.Tensor]
    block_tables: list[list[int]]
    kv_cache: torch.Tensor
    cache_before: torch.Tensor
    metadata: AttentionMetadata
    block_size: int


def slot_of(block_table: list[int], pos: int, block_size: int) -> int:
    return block_table[pos // block_size] * block_size + pos % block_size


def make_case(
    specs: list[tuple[int, int]],
    num_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Case:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    blocks_per_req = [-(-(ctx + q) // block_size) for ctx, q in specs]
    num_blocks = sum(blocks_per_req) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables, used = [], 0
    for n in blocks_per_req:
        block_tables.append(perm[used : used + n])
        used += n
    # NOTE: finite garbage everywhere, so reading a wrong slot changes the result.
    kv_cache = randn(2, num_blocks, block_size, NUM_KV_HEADS, head_dim)
    flat = kv_cache.view(2, num_blocks * block_size, NUM_KV_HEADS, head_dim)
    full_keys, full_values, keys, values = [], [], [], []
    for (ctx, q), table in zip(specs, block_tables, strict=True):
        k, v = randn(ctx + q, NUM_KV_HEADS, head_dim), randn(ctx + q, NUM_KV_HEADS, head_dim)
        context_slots = torch.tensor(
            [slot_of(table, pos, block_size) for pos in range(ctx)], dtype=torch.long
        )
        flat[0, context_slots] = k[:ctx]
        flat[1, context_slots] = v[:ctx]
        full_keys.append(k)
        full_values.append(v)
        keys.append(k[ctx:])
        values.append(v[ctx:])
    num_tokens = sum(q for _, q in specs)
    metadata = build_metadata(
        [q for _, q in specs], [c + q for c, q in specs], block_tables, block_size, "cpu"
    )
    return Case(
        specs=specs,
        query=randn(num_tokens, num_heads, head_dim),
        key=torch.cat(keys),
        value=torch.cat(values),
        full_keys=full_keys,
        full_values=full_values,
        block_tables=block_tables,
        kv_cache=kv_cache,
        cache_before=kv_cache.clone(),
        metadata=metadata,
        block_size=block_size,
    )


def dense_attention(
    q: torch.Tensor,  # [Q, H, D]: the last Q positions of the sequence
    k: torch.Tensor,  # [S, Hkv, D]: all positions
    v: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    num_q, num_heads, _ = q.shape
    seq_len = k.shape[0]
    group = num_heads // k.shape[1]
    kd = k.double().repeat_interleave(group, dim=1)
    vd = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kd) * scale
    q_pos = torch.arange(seq_len - num_q, seq_len)[:, None]
    k_pos = torch.arange(seq_len)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vd)


def expected_output(case: Case, scale: float, sliding_window: int | None) -> torch.Tensor:
    outs, start = [], 0
    for (_, q), k, v in zip(case.specs, case.full_keys, case.full_values, strict=True):
        outs.append(dense_attention(case.query[start : start + q], k, v, scale, sliding_window))
        start += q
    return torch.cat(outs)


def run(case: Case, num_heads: int, sliding_window: int | None) -> torch.Tensor:
    head_dim = case.query.shape[-1]
    impl = TorchRefAttention(num_heads, head_dim, head_dim**-0.5, NUM_KV_HEADS, sliding_window)
    return impl.forward(case.query, case.key, case.value, case.kv_cache, case.metadata)


def check_cache_writes(case: Case) -> None:
    """This step's K/V sit at their slots; every other slot is untouched."""
    num_blocks, block_size = case.kv_cache.shape[1:3]
    flat = case.kv_cache.view(2, num_blocks * block_size, *case.kv_cache.shape[3:])
    before = case.cache_before.view(flat.shape)
    slots = [
        slot_of(table, pos, block_size)
        for (ctx, q), table in zip(case.specs, case.block_tables, strict=True)
        for pos in range(ctx, ctx + q)
    ]
    assert case.metadata.slot_mapping.tolist() == slots
    index = torch.tensor(slots, dtype=torch.long)
    written = torch.zeros(flat.shape[1], dtype=torch.bool)
    written[index] = True
    assert torch.equal(flat[0, index], case.key)
    assert torch.equal(flat[1, index], case.value)
    assert torch.equal(flat[:, ~written], before[:, ~written])


@pytest.mark.parametrize("sliding_window", [None, 37])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("gqa_ratio", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mixed_batch_fp32(
    head_dim: int, gqa_ratio: int, block_size: int, sliding_window: int | None
) -> None:
    num_heads = NUM_KV_HEADS * gqa_ratio
    case = make_case(MIXED, num_heads, head_dim, block_size, seed=head_dim + gqa_ratio)
    out = run(case, num_heads, sliding_window)
    expected = expected_output(case, head_dim**-0.5, sliding_window)
    torch.testing.assert_close(out.double(), expected, atol=FP32_ATOL, rtol=0)
    check_cache_writes(case)


@pytest.mark.parametrize("sliding_window", [None, 100])
@pytest.mark.parametrize(("head_dim", "gqa_ratio", "block_size"), [(64, 4, 16), (128, 1, 32)])
def test_mixed_batch_bf16(
    head_dim: int, gqa_ratio: int, block_size: int, sliding_window: int | None
) -> None:
    num_heads = NUM_KV_HEADS * gqa_ratio
    case = make_case(MIXED, num_heads, head_dim, block_size, dtype=torch.bfloat16, seed=7)
    out = run(case, num_heads, sliding_window)
    assert out.dtype == torch.bfloat16
    expected = expected_output(case, head_dim**-0.5, sliding_window)
    torch.testing.assert_close(out.double(), expected, atol=BF16_ATOL, rtol=BF16_RTOL)
    check_cache_writes(case)


@settings(max_examples=25, deadline=None)
@given(
    specs=st.lists(
        st.tuples(st.integers(0, 300), st.sampled_from([1, 1, 2, 5, 40])), min_size=1, max_size=6
    ),
    gqa_ratio=st.sampled_from([1, 2, 4, 8]),
    block_size=st.sampled_from([1, 2, 16, 32]),
    sliding_window=st.one_of(st.none(), st.integers(1, 64)),
    seed=st.integers(0, 2**16),
)
def test_random_batches(
    specs: list[tuple[int, int]],
    gqa_ratio: int,
    block_size: int,
    sliding_window: int | None,
    seed: int,
) -> None:
    num_heads = NUM_KV_HEADS * gqa_ratio
    case = make_case(specs, num_heads, 64, block_size, seed=seed)
    out = run(case, num_heads, sliding_window)
    expected = expected_output(case, 64**-0.5, sliding_window)
    torch.testing.assert_close(out.double(), expected, atol=FP32_ATOL, rtol=0)
    check_cache_writes(case)


@pytest.mark.parametrize("pad_value", [0, -1, 10**6])
def test_block_table_padding_is_ignored(pad_value: int) -> None:
    case = make_case(MIXED, 8, 64, 16)
    table = case.metadata.block_table
    for i, blocks in enumerate(case.block_tables):
        table[i, len(blocks) :] = pad_value
    wider = torch.full((table.shape[0], table.shape[1] + 5), pad_value, dtype=table.dtype)
    wider[:, : table.shape[1]] = table
    case.metadata.block_table = wider
    out = run(case, 8, None)
    torch.testing.assert_close(
        out.double(), expected_output(case, 64**-0.5, None), atol=FP32_ATOL, rtol=0
    )


def test_reads_blocks_written_in_the_same_step() -> None:
    """Request 1 hits blocks that request 0 fills in this very step (not in the cache before)."""
    block_size, head_dim, num_heads = 16, 64, 4
    case = make_case([(0, 40), (0, 1)], num_heads, head_dim, block_size, seed=3)
    shared = case.block_tables[0][:2]
    own = case.block_tables[1]
    query_len = 5
    metadata = build_metadata(
        [40, query_len],
        [40, 32 + query_len],
        [case.block_tables[0], [*shared, *own]],
        block_size,
        "cpu",
    )
    gen = torch.Generator().manual_seed(4)
    new_k = torch.randn(query_len, NUM_KV_HEADS, head_dim, generator=gen)
    new_v = torch.randn(query_len, NUM_KV_HEADS, head_dim, generator=gen)
    query = torch.randn(40 + query_len, num_heads, head_dim, generator=gen)
    impl = TorchRefAttention(num_heads, head_dim, head_dim**-0.5, NUM_KV_HEADS)
    key = torch.cat([case.full_keys[0], new_k])
    value = torch.cat([case.full_values[0], new_v])
    out = impl.forward(query, key, value, case.kv_cache, metadata)
    k1 = torch.cat([case.full_keys[0][:32], new_k])
    v1 = torch.cat([case.full_values[0][:32], new_v])
    expected = dense_attention(query[40:], k1, v1, head_dim**-0.5, None)
    torch.testing.assert_close(out[40:].double(), expected, atol=FP32_ATOL, rtol=0)


def test_decode_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny gather budget splits the decode rows into chunks of one or two requests."""
    monkeypatch.setattr(torch_ref, "_DECODE_CHUNK_BYTES", 100_000)
    specs = [(c, 1) for c in (0, 5, 99, 300, 17, 250, 64)]
    case = make_case(specs, 4, 64, 16, seed=5)
    out = run(case, 4, 50)
    torch.testing.assert_close(
        out.double(), expected_output(case, 64**-0.5, 50), atol=FP32_ATOL, rtol=0
    )


def test_padded_query_rows() -> None:
    """Rows past `num_actual_tokens` (a padded batch) are neither cached nor attended."""
    case = make_case(MIXED, 4, 64, 16, seed=6)
    pad = 3
    query = torch.cat([case.query, torch.randn(pad, *case.query.shape[1:])])
    key = torch.cat([case.key, torch.randn(pad, *case.key.shape[1:])])
    value = torch.cat([case.value, torch.randn(pad, *case.value.shape[1:])])
    impl = TorchRefAttention(4, 64, 64**-0.5, NUM_KV_HEADS)
    out = impl.forward(query, key, value, case.kv_cache, case.metadata)
    expected = expected_output(case, 64**-0.5, None)
    torch.testing.assert_close(out[:-pad].double(), expected, atol=FP32_ATOL, rtol=0)
    assert torch.equal(out[-pad:], torch.zeros_like(out[-pad:]))
    check_cache_writes(case)


def test_build_metadata_fields() -> None:
    md = build_metadata([3, 1, 2], [3, 7, 20], [[5, 2], [0], [9, 4, 1]], 8, "cpu")
    assert (md.num_reqs, md.num_actual_tokens, md.max_query_len, md.max_seq_len) == (3, 6, 3, 20)
    assert md.query_start_loc.tolist() == [0, 3, 4, 6]
    assert md.query_start_loc_cpu.tolist() == [0, 3, 4, 6]
    assert md.seq_lens.tolist() == [3, 7, 20]
    assert md.block_table.tolist() == [[5, 2, 0], [0, 0, 0], [9, 4, 1]]
    assert md.slot_mapping.tolist() == [40, 41, 42, 6, 1 * 8 + 2, 1 * 8 + 3]
    assert md.slot_mapping.dtype == torch.int64
    assert md.block_table.dtype == md.seq_lens.dtype == md.query_start_loc.dtype == torch.int32


@pytest.mark.parametrize(
    ("query_lens", "seq_lens", "tables"),
    [([0], [4], [[0]]), ([5], [4], [[0]]), ([1], [40], [[0, 1]]), ([1, 1], [1], [[0], [1]])],
)
def test_build_metadata_rejects_bad_input(
    query_lens: list[int], seq_lens: list[int], tables: list[list[int]]
) -> None:
    with pytest.raises(ValueError):
        build_metadata(query_lens, seq_lens, tables, 16, "cpu")


def test_registered_as_torch_backend() -> None:
    assert get_attention_impl_cls("torch", "cpu") is TorchRefAttention
