"""The Triton MLA decode (`attention/triton/mla_kernels.py`, `mla_backend.py`) against the torch
MLA path (`MLATorchImpl`, itself tested against HF's expanded attention in test_mla.py), on
fresh random latents in a paged cache with shuffled block ids:

- `mla_decode` on decode batches of odd context lengths, with KV splits off and on, fewer heads
  than a head block and more (two blocks), unpadded and padded latent / rope widths, fp32 and
  bf16, with and without a decode order;
- `MLATritonImpl` on a mixed step (prompt chunks after cached context beside decodes): the cache
  write, the decode rows in Triton, the prompt rows through the torch path;
- `write_latents` skips negative slots (a CUDA graph's padding rows);
- on a GPU (`gpu` marker): DeepSeek-V2-Lite's shape (16 heads, kv_lora_rank 512, rope 64,
  block 16) at contexts 1 ... 4096, and a CUDA-graph capture replayed with new metadata.

Without a GPU the kernels run under Triton's interpreter (slow: small shapes).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tests.triton_interpreter import kernel_test_device, one_thread, patch_interpreter

DEVICE = kernel_test_device()

from pagedllm.attention.mla import MLATorchImpl  # noqa: E402
from pagedllm.attention.triton.mla_backend import MLATritonImpl  # noqa: E402
from pagedllm.attention.triton.mla_kernels import mla_decode, write_latents  # noqa: E402
from pagedllm.attention.utils import build_metadata, decode_order  # noqa: E402

__all__ = ["one_thread"]

BLOCK = 16
SCALE = 0.21


@pytest.fixture(autouse=True)
def _interpreter() -> None:
    if DEVICE == "cpu":
        patch_interpreter()


def paged_batch(query_lens: list[int], seq_lens: list[int], dim: int, dtype, seed: int,
                block: int = BLOCK, spare: int = 3):  # fmt: skip
    """A random latent cache `[num_blocks, block, dim]` (every slot finite), shuffled block
    tables and the metadata of the step."""
    rng = random.Random(seed)
    tables_len = [-(-n // block) for n in seq_lens]
    ids = list(range(sum(tables_len) + spare))
    rng.shuffle(ids)
    tables, at = [], 0
    for n in tables_len:
        tables.append(ids[at : at + n])
        at += n
    cache = torch.randn(len(ids), block, dim, dtype=dtype, device=DEVICE)
    md = build_metadata(query_lens, seq_lens, tables, block, DEVICE)
    return cache, md


def torch_decode(query, cache, md, rank: int) -> torch.Tensor:
    """The torch path's output for the step (the cache already holds its rows), in fp32."""
    impl = MLATorchImpl(query.shape[1], cache.shape[-1], SCALE, 1)
    key = torch.zeros(query.shape[0], 1, cache.shape[-1], dtype=cache.dtype, device=DEVICE)
    out = impl.forward(query.float(), key, key[..., :rank], cache.float(), md, kv_written=True)
    return out


@pytest.mark.parametrize(
    "heads, rank, rope, dtype, splits, order",
    [
        (8, 64, 16, torch.float32, 1, False),
        (8, 64, 16, torch.float32, 3, True),
        (4, 32, 16, torch.float32, 2, False),
        (20, 32, 16, torch.float32, 4, True),  # two head blocks, the second partly masked
        (3, 13, 6, torch.float32, 2, False),  # padded lanes (the tiny models' widths)
        (8, 64, 16, torch.bfloat16, 3, False),
    ],
)
def test_decode_matches_torch_path(heads, rank, rope, dtype, splits, order) -> None:
    torch.manual_seed(heads + rank + splits)
    seq_lens = [1, 17, 50, 33, 16, 7]
    cache, md = paged_batch([1] * len(seq_lens), seq_lens, rank + rope, dtype, seed=splits)
    if order:
        md.decode_order = torch.from_numpy(decode_order(md.seq_lens_cpu.numpy())).to(DEVICE)
    query = torch.randn(len(seq_lens), heads, rank + rope, dtype=dtype, device=DEVICE)
    out = torch.full((len(seq_lens), heads, rank), float("nan"), dtype=dtype, device=DEVICE)
    mla_decode(query, cache, md, out, rank, SCALE, num_splits=splits)
    want = torch_decode(query, cache, md, rank)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), want, **tol)


def test_mixed_step_through_the_impl() -> None:
    """Prompt chunks after cached context beside decodes: the impl writes this step's latents,
    decodes in Triton, prompts in torch; both caches and outputs equal the torch impl's."""
    torch.manual_seed(3)
    heads, rank, rope = 4, 32, 16
    query_lens, seq_lens = [1, 9, 1, 23, 1], [40, 49, 1, 23, 18]
    cache, md = paged_batch(query_lens, seq_lens, rank + rope, torch.float32, seed=4)
    tokens = sum(query_lens)
    query = torch.randn(tokens + 2, heads, rank + rope, device=DEVICE)  # 2 padding rows
    key = torch.randn(tokens + 2, 1, rank + rope, device=DEVICE)
    triton_cache, torch_cache = cache.clone(), cache.clone()
    impl = MLATritonImpl(heads, rank + rope, SCALE, 1)
    got = impl.forward(query, key, key[..., :rank], triton_cache, md)
    want = MLATorchImpl(heads, rank + rope, SCALE, 1).forward(
        query, key, key[..., :rank], torch_cache, md
    )
    torch.testing.assert_close(triton_cache, torch_cache, atol=0, rtol=0)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert impl.cuda_graph_safe and not MLATorchImpl.cuda_graph_safe


def test_write_latents_skips_negative_slots() -> None:
    torch.manual_seed(5)
    cache = torch.randn(4, BLOCK, 24, device=DEVICE)
    latent = torch.randn(5, 24, device=DEVICE)
    slots = torch.tensor([3, -1, 40, 17, -1], dtype=torch.int64, device=DEVICE)
    want = cache.clone()
    want.view(-1, 24)[slots[slots >= 0]] = latent[slots >= 0]
    write_latents(latent, cache, slots, 5)
    torch.testing.assert_close(cache, want, atol=0, rtol=0)


# ----- GPU: DeepSeek-V2-Lite's shape -----

LITE = dict(heads=16, rank=512, rope=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("splits", [None, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seq_lens", [[1], [4096], [1, 15, 16, 17, 1000, 4096, 2049, 333]])
def test_v2_lite_shape_on_gpu(seq_lens, dtype, splits) -> None:
    torch.manual_seed(len(seq_lens))
    heads, rank, rope = LITE["heads"], LITE["rank"], LITE["rope"]
    cache, md = paged_batch([1] * len(seq_lens), seq_lens, rank + rope, dtype, seed=7)
    md.decode_order = torch.from_numpy(decode_order(md.seq_lens_cpu.numpy())).to(DEVICE)
    query = torch.randn(len(seq_lens), heads, rank + rope, dtype=dtype, device=DEVICE)
    out = torch.empty(len(seq_lens), heads, rank, dtype=dtype, device=DEVICE)
    mla_decode(query, cache, md, out, rank, 1 / 192**0.5, num_splits=splits)
    impl = MLATorchImpl(heads, rank + rope, 1 / 192**0.5, 1)
    want = impl.forward(query.float(), query[:, :1], query[:, :1, :rank], cache.float(), md,
                        kv_written=True)  # fmt: skip
    tol = dict(atol=3e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), want, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_with_new_metadata() -> None:
    """A step captured with one metadata's buffers, replayed after new lengths, tables and
    slots are copied in (and padding rows: slot -1, no query row), equals an eager step."""
    from pagedllm.attention.backend import AttentionMetadataBuilder, StepAttentionInputs

    torch.manual_seed(9)
    heads, rank, rope = LITE["heads"], LITE["rank"], LITE["rope"]
    dim, size, width = rank + rope, 8, 64
    builder = AttentionMetadataBuilder(torch.device(DEVICE), width * BLOCK)
    builder.init_graph_buffers(size, width)
    cache = torch.randn(size * width + 1, BLOCK, dim, dtype=torch.bfloat16, device=DEVICE)
    query = torch.randn(size, heads, dim, dtype=torch.bfloat16, device=DEVICE)
    key = torch.randn(size, 1, dim, dtype=torch.bfloat16, device=DEVICE)
    impl = MLATritonImpl(heads, dim, 0.07, 1)
    impl.num_kv_splits = 4  # NOTE: the same for the eager step (its batch is smaller)
    md = builder.graph_metadata(size)
    impl.forward(query, key, key[..., :rank], cache, md)  # warm up (compiles)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = impl.forward(query, key, key[..., :rank], cache, md)
    lens = np.array([700, 3, 1024, 17, 90], dtype=np.int32)
    perm = np.random.default_rng(0).permutation(size * width)[: len(lens) * width]
    table = perm.reshape(len(lens), width).astype(np.int32)
    slots = table[np.arange(len(lens)), (lens - 1) // BLOCK] * BLOCK + (lens - 1) % BLOCK
    inputs = StepAttentionInputs(
        query_start_loc=np.arange(len(lens) + 1, dtype=np.int32), seq_lens=lens,
        block_table=table, slot_mapping=slots.astype(np.int64), max_query_len=1,
    )  # fmt: skip
    dev = lambda a: torch.from_numpy(a).to(DEVICE)  # noqa: E731
    builder.fill_graph(inputs, size, lambda a, t: t.copy_(dev(a)), dev)
    eager_cache = cache.clone()
    graph.replay()
    eager_md = builder.build(inputs, dev)
    n = len(lens)
    want = impl.forward(query[:n], key[:n], key[:n, :, :rank], eager_cache, eager_md)
    torch.testing.assert_close(cache, eager_cache, atol=0, rtol=0)
    torch.testing.assert_close(out[:n], want, atol=0, rtol=0)
