"""`TritonAttention` against `TorchRefAttention`, the oracle, on fresh random inputs.

Each case builds requests as (cached context length, query length) with `make_case` from
test_torch_ref (shuffled block ids, finite garbage in unused slots), runs both backends on
copies of one cache, and compares the outputs and the caches after the write.

Two modes:
- without a GPU, the kernels run on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`,
  set below before triton is imported) at small shapes; the whole file takes well under a
  minute on 2 cores. With a GPU the same tests run compiled on it.
- `@pytest.mark.gpu` tests, at serving shapes (8k contexts, 64+ decode rows), only with CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.triton_interpreter import kernel_test_device

DEVICE = kernel_test_device()  # NOTE: before triton is first imported

from pagedllm.attention.backend import AttentionMetadata, get_attention_impl_cls  # noqa: E402
from pagedllm.attention.torch_ref import TorchRefAttention  # noqa: E402
from pagedllm.attention.triton import kernels  # noqa: E402
from pagedllm.attention.triton.backend import TritonAttention  # noqa: E402
from pagedllm.attention.utils import build_metadata, decode_order  # noqa: E402
from tests.attention.test_torch_ref import NUM_KV_HEADS, Case, dense_attention, make_case  # noqa: E402
from tests.triton_interpreter import one_thread, patch_interpreter  # noqa: E402, F401

FP32_ATOL = 2e-5
# NOTE: half-precision inputs, P rounded to the input dtype before P @ V, output rounded:
# a few ulps of values up to ~4 (bf16 has 8 mantissa bits, fp16 11).
HALF_TOL = {torch.bfloat16: (3e-2, 2e-2), torch.float16: (5e-3, 5e-3)}

# A full prompt, prompt chunks after context, decode rows (one with no context), interleaved.
SMALL_MIXED = [(0, 37), (45, 12), (99, 1), (0, 1), (70, 1), (30, 5), (63, 1)]


if DEVICE == "cpu":
    patch_interpreter()


def to_device(case: Case, device: str) -> Case:
    md = case.metadata
    case.metadata = AttentionMetadata(
        num_reqs=md.num_reqs,
        num_actual_tokens=md.num_actual_tokens,
        max_query_len=md.max_query_len,
        max_seq_len=md.max_seq_len,
        query_start_loc=md.query_start_loc.to(device),
        seq_lens=md.seq_lens.to(device),
        block_table=md.block_table.to(device),
        slot_mapping=md.slot_mapping.to(device),
        query_start_loc_cpu=md.query_start_loc_cpu,
        seq_lens_cpu=md.seq_lens_cpu,
        decode_order=None if md.decode_order is None else md.decode_order.to(device),
    )
    for name in ("query", "key", "value", "kv_cache"):
        setattr(case, name, getattr(case, name).to(device))
    return case


def new_case(
    specs: list[tuple[int, int]],
    num_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Case:
    return to_device(make_case(specs, num_heads, head_dim, block_size, dtype, seed), DEVICE)


def reference(case: Case, num_heads: int, sliding_window: int | None) -> tuple[torch.Tensor, ...]:
    """`TorchRefAttention` in fp32 on a copy of the cache: (output, cache after the write)."""
    head_dim = case.query.shape[-1]
    impl = TorchRefAttention(num_heads, head_dim, head_dim**-0.5, NUM_KV_HEADS, sliding_window)
    cache = case.kv_cache.float().clone()
    out = impl.forward(
        case.query.float(), case.key.float(), case.value.float(), cache, case.metadata
    )
    return out, cache


def run_triton(
    case: Case,
    num_heads: int,
    sliding_window: int | None,
    num_kv_splits: int | None = None,
    use_decode_launch: bool = True,
) -> torch.Tensor:
    head_dim = case.query.shape[-1]
    impl = TritonAttention(num_heads, head_dim, head_dim**-0.5, NUM_KV_HEADS, sliding_window)
    impl.num_kv_splits = num_kv_splits
    impl.use_decode_launch = use_decode_launch
    return impl.forward(case.query, case.key, case.value, case.kv_cache, case.metadata)


def check(
    case: Case,
    num_heads: int,
    sliding_window: int | None,
    num_kv_splits: int | None = None,
    use_decode_launch: bool = True,
) -> None:
    """Triton's output and cache against the reference's, at the dtype's tolerance."""
    expected, expected_cache = reference(case, num_heads, sliding_window)
    out = run_triton(case, num_heads, sliding_window, num_kv_splits, use_decode_launch)
    dtype = case.query.dtype
    assert out.dtype == dtype and out.shape == case.query.shape
    atol, rtol = HALF_TOL.get(dtype, (FP32_ATOL, 0.0))
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)
    assert torch.equal(case.kv_cache.float(), expected_cache)


# ----------------------------------------------------------------------------------------------
# Small shapes: the interpreter on the CPU, or compiled on a GPU
# ----------------------------------------------------------------------------------------------

# (head_dim, gqa_ratio, block_size, sliding_window): every GQA ratio with both head dims, both
# block sizes and the window on and off, pairwise.
SMALL_GRID = [
    (64, 1, 16, None),
    (64, 2, 32, 29),
    (64, 4, 16, 29),
    (64, 8, 32, None),
    (128, 1, 32, 29),
    (128, 2, 16, None),
    (128, 4, 32, None),
    (128, 8, 16, 29),
]


@pytest.mark.parametrize(("head_dim", "gqa_ratio", "block_size", "sliding_window"), SMALL_GRID)
def test_mixed_batch_fp32(
    head_dim: int, gqa_ratio: int, block_size: int, sliding_window: int | None
) -> None:
    num_heads = NUM_KV_HEADS * gqa_ratio
    case = new_case(SMALL_MIXED, num_heads, head_dim, block_size, seed=head_dim + gqa_ratio)
    check(case, num_heads, sliding_window)


@pytest.mark.parametrize(
    ("dtype", "head_dim", "gqa_ratio", "block_size", "sliding_window"),
    [
        (torch.bfloat16, 64, 4, 16, None),
        (torch.bfloat16, 128, 1, 32, 29),
        (torch.float16, 64, 2, 32, 29),
        (torch.float16, 128, 8, 16, None),
    ],
)
def test_mixed_batch_half(
    dtype: torch.dtype, head_dim: int, gqa_ratio: int, block_size: int, sliding_window: int | None
) -> None:
    num_heads = NUM_KV_HEADS * gqa_ratio
    case = new_case(SMALL_MIXED, num_heads, head_dim, block_size, dtype, seed=11)
    check(case, num_heads, sliding_window)


@pytest.mark.parametrize("sliding_window", [None, 41])
@pytest.mark.parametrize("num_kv_splits", [1, 3, None])
def test_decode_split_kv(num_kv_splits: int | None, sliding_window: int | None) -> None:
    """A pure-decode batch, flash-decoding off, forced, and chosen (CPU: as if 8 SMs)."""
    specs = [(c, 1) for c in (300, 0, 77, 160, 1)]
    case = new_case(specs, 8, 64, 16, seed=21)
    check(case, 8, sliding_window, num_kv_splits=num_kv_splits)


def test_decode_order_is_longest_first() -> None:
    order = decode_order(np.array([5, 90, 7, 90, 1, 300], dtype=np.int32))
    assert order.dtype == np.int32
    assert order.tolist() == [5, 1, 3, 2, 0, 4]  # ties keep request order


@pytest.mark.parametrize("order", ["longest_first", "shuffled", "none"])
@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_decode_launch_request_order(order: str, num_kv_splits: int) -> None:
    """The decode launch visits requests in `decode_order` (any permutation, or request order
    without one); every request's output is its own, in pure-decode and mixed batches."""
    for specs in ([(c, 1) for c in (30, 200, 0, 77, 160, 5)], [(64, 1), (0, 40), (150, 1), (9, 2)]):
        case = new_case(specs, 8, 64, 16, seed=23)
        md = case.metadata
        assert md.decode_order is not None  # build_metadata's: longest first
        if order == "shuffled":
            perm = torch.randperm(md.num_reqs, generator=torch.Generator().manual_seed(3))
            md.decode_order = perm.to(torch.int32).to(DEVICE)
        elif order == "none":
            md.decode_order = None
        check(case, 8, None, num_kv_splits=num_kv_splits)


@pytest.mark.parametrize("sliding_window", [None, 23])
def test_multi_row_decode_launch(sliding_window: int | None) -> None:
    """Query runs of up to BLOCK_Q rows (speculative tokens) go through the decode launch."""
    specs = [(90, 3), (0, 8), (40, 1), (130, 5)]  # G = 2: BLOCK_Q = 8
    case = new_case(specs, 4, 64, 16, seed=22)
    assert case.metadata.max_query_len <= kernels.decode_config(2, 64, torch.float32).block_m // 2
    check(case, 4, sliding_window, num_kv_splits=2)


@pytest.mark.parametrize("sliding_window", [None, 29])
def test_varlen_launch_only(sliding_window: int | None) -> None:
    """Decode rows through the varlen launch too (tiles of many rows, one of them valid)."""
    case = new_case(SMALL_MIXED, 8, 64, 32, seed=23)
    check(case, 8, sliding_window, use_decode_launch=False)


@pytest.mark.parametrize(("block_m", "block_n"), [(16, 16), (32, 64)])
def test_tiles_smaller_and_larger_than_blocks(block_m: int, block_n: int) -> None:
    """KV tiles that split a 32-slot block, and tiles that span several 16-slot blocks."""
    block_size = 32 if block_n == 16 else 16
    case = new_case(SMALL_MIXED, 4, 64, block_size, seed=24)
    expected, _ = reference(case, 4, 29)
    kernels.reshape_and_cache(
        case.key, case.value, case.kv_cache, case.metadata.slot_mapping, len(case.key)
    )
    out = torch.empty_like(case.query)
    tiles = kernels.TileConfig(block_m=block_m, block_n=block_n, num_warps=4, num_stages=2)
    kernels.paged_attention(
        case.query, case.kv_cache, case.metadata, out, 64**-0.5, 29,
        decode_tiles=tiles, varlen_tiles=tiles,
    )  # fmt: skip
    torch.testing.assert_close(out, expected, atol=FP32_ATOL, rtol=0)


def test_block_table_padding_is_ignored() -> None:
    case = new_case(SMALL_MIXED, 4, 64, 16, seed=25)
    table = case.metadata.block_table
    for i, blocks in enumerate(case.block_tables):
        table[i, len(blocks) :] = 10**6
    wider = torch.full((table.shape[0], table.shape[1] + 5), 10**6, dtype=table.dtype)
    wider[:, : table.shape[1]] = table.cpu()
    case.metadata.block_table = wider.to(DEVICE)
    check(case, 4, None)


def test_reads_blocks_written_in_the_same_step() -> None:
    """Request 1 hits blocks that request 0 fills in this very step (not in the cache before)."""
    block_size, head_dim, num_heads, query_len = 16, 64, 4, 5
    case = make_case([(0, 40), (0, 1)], num_heads, head_dim, block_size, seed=3)
    shared = case.block_tables[0][:2]
    metadata = build_metadata(
        [40, query_len],
        [40, 32 + query_len],
        [case.block_tables[0], [*shared, *case.block_tables[1]]],
        block_size,
        DEVICE,
    )
    gen = torch.Generator().manual_seed(4)
    new_k = torch.randn(query_len, NUM_KV_HEADS, head_dim, generator=gen)
    new_v = torch.randn(query_len, NUM_KV_HEADS, head_dim, generator=gen)
    query = torch.randn(40 + query_len, num_heads, head_dim, generator=gen)
    key = torch.cat([case.full_keys[0], new_k])
    value = torch.cat([case.full_values[0], new_v])
    impl = TritonAttention(num_heads, head_dim, head_dim**-0.5, NUM_KV_HEADS)
    tensors = [t.to(DEVICE) for t in (query, key, value, case.kv_cache)]
    out = impl.forward(*tensors, metadata).cpu()
    k1 = torch.cat([case.full_keys[0][:32], new_k])
    v1 = torch.cat([case.full_values[0][:32], new_v])
    expected = dense_attention(query[40:], k1, v1, head_dim**-0.5, None)
    torch.testing.assert_close(out[40:].double(), expected, atol=FP32_ATOL, rtol=0)


def test_padded_rows_and_strided_inputs() -> None:
    """Rows past `num_actual_tokens` are zero and not cached; q/k/v are views of one fused
    projection (a token stride wider than heads x head_dim)."""
    num_heads, head_dim, pad = 4, 64, 3
    case = new_case(SMALL_MIXED, num_heads, head_dim, 16, seed=26)
    expected, expected_cache = reference(case, num_heads, None)
    rows = case.query.shape[0] + pad
    widths = [num_heads * head_dim, NUM_KV_HEADS * head_dim, NUM_KV_HEADS * head_dim]
    fused = torch.randn(rows, sum(widths), device=DEVICE)
    q, k, v = fused.split(widths, dim=1)
    q[:-pad] = case.query.flatten(1)
    k[:-pad] = case.key.flatten(1)
    v[:-pad] = case.value.flatten(1)
    impl = TritonAttention(num_heads, head_dim, head_dim**-0.5, NUM_KV_HEADS)
    views = [x.view(rows, -1, head_dim) for x in (q, k, v)]
    out = impl.forward(*views, case.kv_cache, case.metadata)
    torch.testing.assert_close(out[:-pad], expected, atol=FP32_ATOL, rtol=0)
    assert torch.equal(out[-pad:], torch.zeros_like(out[-pad:]))
    assert torch.equal(case.kv_cache, expected_cache)


# NOTE: with splits, the reduce runs over the padding rows too and combines partials that no
# program wrote (garbage, maybe inf/NaN, by design: those rows are discarded); the interpreter's
# numpy then warns.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("num_kv_splits", [1, 3, None])
def test_cuda_graph_padded_decode(num_kv_splits: int | None) -> None:
    """A decode batch as a CUDA-graph replay pads it (pagedllm/worker/cuda_graph.py): padding
    requests with an empty query range, no context and slot -1, and the capture's host ints
    (`max_seq_len` far above the real lengths). The real rows equal the unpadded reference and
    only the real slots are written."""
    num_heads, head_dim, pad = 8, 64, 5
    case = new_case([(40, 1), (7, 1), (90, 1), (0, 1)], num_heads, head_dim, 16, seed=27)
    expected, expected_cache = reference(case, num_heads, None)
    md, n = case.metadata, case.metadata.num_reqs
    size = n + pad
    garbage = torch.randn(pad, *case.query.shape[1:], device=DEVICE)
    query = torch.cat([case.query, garbage])
    key = torch.cat([case.key, garbage[:, :NUM_KV_HEADS]])
    value = torch.cat([case.value, garbage[:, :NUM_KV_HEADS]])

    def padded(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.cat([t, torch.full((pad, *t.shape[1:]), value, dtype=t.dtype, device=DEVICE)])

    qsl, seq_lens = padded(md.query_start_loc, n), padded(md.seq_lens, 0)
    metadata = AttentionMetadata(
        num_reqs=size,
        num_actual_tokens=size,
        max_query_len=1,
        max_seq_len=4096,
        query_start_loc=qsl,
        seq_lens=seq_lens,
        block_table=padded(md.block_table, 10**6),
        slot_mapping=padded(md.slot_mapping, -1),
        query_start_loc_cpu=qsl.cpu(),
        seq_lens_cpu=seq_lens.cpu(),
    )
    impl = TritonAttention(num_heads, head_dim, head_dim**-0.5, NUM_KV_HEADS)
    impl.num_kv_splits = num_kv_splits
    out = impl.forward(query, key, value, case.kv_cache, metadata)
    torch.testing.assert_close(out[:n], expected, atol=FP32_ATOL, rtol=0)
    assert torch.equal(case.kv_cache, expected_cache)


def test_choose_num_splits() -> None:
    assert kernels.choose_num_splits(1, 8, 8192, 64, 132) == 32
    assert kernels.choose_num_splits(256, 8, 2048, 64, 132) == 1
    assert kernels.choose_num_splits(1, 8, 100, 64, 132) == 1
    assert kernels.choose_num_splits(4, 2, 10**6, 64, 132) == 33
    assert kernels.choose_num_splits(24, 8, 1600, 64, 132) == 2  # 192 programs: two splits
    assert kernels.choose_num_splits(48, 8, 1600, 64, 132) == 1  # 384 programs: none


def test_registered_as_default_cuda_backend() -> None:
    assert get_attention_impl_cls("triton", "cuda") is TritonAttention
    assert get_attention_impl_cls(None, "cuda") is TritonAttention


# ----------------------------------------------------------------------------------------------
# Serving shapes: GPU only
# ----------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_mixed_specs(seed: int) -> list[tuple[int, int]]:
    gen = torch.Generator().manual_seed(seed)
    decodes = [(int(c), 1) for c in torch.randint(0, 2048, (72,), generator=gen)]
    prompts = [(0, 1000), (3000, 512), (8000, 190), (0, 4), (777, 77)]
    return prompts[:3] + decodes[:40] + prompts[3:] + decodes[40:] + [(8191, 1)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("sliding_window", [None, 1000])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("gqa_ratio", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_mixed_batch(
    dtype: torch.dtype, head_dim: int, gqa_ratio: int, block_size: int, sliding_window: int | None
) -> None:
    num_heads = NUM_KV_HEADS * gqa_ratio
    seed = head_dim + gqa_ratio + block_size
    case = new_case(_gpu_mixed_specs(seed), num_heads, head_dim, block_size, dtype, seed)
    check(case, num_heads, sliding_window)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("sliding_window", [None, 4096])
@pytest.mark.parametrize("num_kv_splits", [1, None])
@pytest.mark.parametrize(("num_reqs", "max_ctx"), [(1, 8192), (3, 8192), (64, 2048), (256, 1024)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_decode(
    dtype: torch.dtype,
    num_reqs: int,
    max_ctx: int,
    num_kv_splits: int | None,
    sliding_window: int | None,
) -> None:
    gen = torch.Generator().manual_seed(num_reqs)
    specs = [(int(c), 1) for c in torch.randint(max_ctx // 2, max_ctx, (num_reqs,), generator=gen)]
    specs[0] = (max_ctx - 1, 1)
    case = new_case(specs, 32, 128, 16, dtype, seed=num_reqs)
    check(case, 32, sliding_window, num_kv_splits=num_kv_splits)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("head_dim", [32, 256])
def test_gpu_other_head_dims(head_dim: int) -> None:
    case = new_case(_gpu_mixed_specs(5)[:20], 8, head_dim, 16, torch.bfloat16, seed=5)
    check(case, 8, None)
    case = new_case([(c, 1) for c in (5000, 70, 3000)], 8, head_dim, 16, torch.bfloat16, seed=6)
    check(case, 8, 2000)
