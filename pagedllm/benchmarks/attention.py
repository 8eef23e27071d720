"""Attention micro-benchmark (CUDA): `TritonAttention` vs `TorchRefAttention` vs dense torch SDPA.

Owns the standard attention shapes (Llama-3-8B layer: 32 query heads, 8 KV heads, head_dim 128,
bf16, block size 16; the `qwen3_*` decode cases: Qwen3-0.6B's 16 query heads over 8 KV heads,
GQA 2) and how they are timed: `triton.testing.do_bench` medians (L2 flushed
between runs), the Triton backend both eager and replayed from a CUDA graph (what a captured
decode step costs, without Python launch overhead). Prints time, achieved K/V bandwidth
(bytes of K/V attended / time) and, for prefill, TFLOP/s, plus the max |error| vs the reference.

Run: `python -m pagedllm.benchmarks.attention [--dtype bf16] [--only decode_b1_8k] [--tune]`.
Needs only torch and triton.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from pagedllm.attention.backend import AttentionImpl, AttentionMetadata
from pagedllm.attention.torch_ref import TorchRefAttention
from pagedllm.attention.utils import build_metadata

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Case:
    """A batch of requests as (cached context, query length), all of one shape."""

    name: str
    specs: list[tuple[int, int]]
    dense: bool  # equal lengths: dense SDPA applies
    heads: int = NUM_HEADS
    kv_heads: int = NUM_KV_HEADS


CASES = [
    Case("decode_b1_8k", [(8191, 1)], True),
    Case("decode_b8_8k", [(8191, 1)] * 8, True),
    Case("decode_b64_1k", [(1023, 1)] * 64, True),
    Case("decode_b64_2k", [(2047, 1)] * 64, True),
    Case("decode_b256_1k", [(1023, 1)] * 256, True),
    Case("decode_b256_2k", [(2047, 1)] * 256, True),
    Case("prefill_4k", [(0, 4096)], True),
    Case("mixed_chunk512_b128_1k", [(2048, 512)] + [(1023, 1)] * 128, False),
    # Qwen3-0.6B: the same K/V bytes per token as Llama-3-8B, half the query heads.
    Case("qwen3_decode_b128_1k", [(1023, 1)] * 128, True, heads=16),
    Case("qwen3_decode_b256_1k", [(1023, 1)] * 256, True, heads=16),
    Case("qwen3_decode_b256_2k", [(2047, 1)] * 256, True, heads=16),
    # T1-like: 256 requests of random context lengths (300-2000), in random order.
    Case(
        "qwen3_decode_b256_mixed",
        [(random.Random(i).randint(300, 2000) - 1, 1) for i in range(256)],
        False,
        heads=16,
    ),
]


@dataclass
class Inputs:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    kv_cache: torch.Tensor
    metadata: AttentionMetadata
    kv_bytes: int  # K and V bytes the batch attends to
    flops: float  # 2 matmuls, causal


def make_inputs(case: Case, dtype: torch.dtype, device: str = "cuda") -> Inputs:
    gen = torch.Generator().manual_seed(0)
    seq_lens = [c + q for c, q in case.specs]
    blocks_per_req = [-(-s // BLOCK_SIZE) for s in seq_lens]
    num_blocks = sum(blocks_per_req)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in blocks_per_req:
        tables.append(perm[used : used + n])
        used += n
    query_lens = [q for _, q in case.specs]
    metadata = build_metadata(query_lens, seq_lens, tables, BLOCK_SIZE, device)
    num_tokens = sum(query_lens)
    shape = (2, num_blocks, BLOCK_SIZE, case.kv_heads, HEAD_DIM)
    kv_cache = torch.randn(shape, device=device, dtype=dtype)
    kv_bytes = 2 * sum(seq_lens) * case.kv_heads * HEAD_DIM * kv_cache.element_size()
    flops = sum(
        4.0 * case.heads * HEAD_DIM * q * (c + (q + 1) / 2) for c, q in case.specs
    )  # each query row attends to its position + 1 keys on average
    return Inputs(
        query=torch.randn(num_tokens, case.heads, HEAD_DIM, device=device, dtype=dtype),
        key=torch.randn(num_tokens, case.kv_heads, HEAD_DIM, device=device, dtype=dtype),
        value=torch.randn(num_tokens, case.kv_heads, HEAD_DIM, device=device, dtype=dtype),
        kv_cache=kv_cache,
        metadata=metadata,
        kv_bytes=kv_bytes,
        flops=flops,
    )


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of `fn` (L2 flushed between runs)."""
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def as_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` captured once in a CUDA graph (after warm-up on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def dense_sdpa_fn(case: Case, inp: Inputs) -> Callable[[], torch.Tensor]:
    """Plain SDPA on contiguous `[B, H, S, D]` K/V of the same sizes (no paging)."""
    batch, (ctx, q_len) = len(case.specs), case.specs[0]
    seq = ctx + q_len
    q = inp.query.view(batch, q_len, case.heads, HEAD_DIM).transpose(1, 2)
    kv = torch.randn(2, batch, case.kv_heads, seq, HEAD_DIM, device="cuda", dtype=q.dtype)
    causal = q_len > 1 and ctx == 0
    return lambda: F.scaled_dot_product_attention(
        q, kv[0], kv[1], is_causal=causal, scale=HEAD_DIM**-0.5, enable_gqa=True
    )


def forward_fn(impl: AttentionImpl, inp: Inputs) -> Callable[[], torch.Tensor]:
    return lambda: impl.forward(inp.query, inp.key, inp.value, inp.kv_cache, inp.metadata)


def triton_impl(
    num_kv_splits: int | None = None, heads: int = NUM_HEADS, kv_heads: int = NUM_KV_HEADS
) -> AttentionImpl:
    from pagedllm.attention.triton.backend import TritonAttention

    impl = TritonAttention(heads, HEAD_DIM, HEAD_DIM**-0.5, kv_heads)
    impl.num_kv_splits = num_kv_splits
    return impl


def report(case: Case, label: str, ms: float, inp: Inputs, err: float | None = None) -> None:
    gbs = inp.kv_bytes / (ms * 1e-3) / 1e9
    tflops = inp.flops / (ms * 1e-3) / 1e12
    err_s = "" if err is None else f"  max|err| {err:.2e}"
    print(
        f"{case.name:<24} {label:<22} {ms * 1e3:10.1f} us {gbs:8.0f} GB/s {tflops:7.1f} TFLOP/s{err_s}",
        flush=True,
    )


def run_case(case: Case, dtype: torch.dtype) -> None:
    inp = make_inputs(case, dtype)
    ref = TorchRefAttention(case.heads, HEAD_DIM, HEAD_DIM**-0.5, case.kv_heads)
    expected = forward_fn(ref, inp)().float()
    tri = triton_impl(heads=case.heads, kv_heads=case.kv_heads)
    err = (forward_fn(tri, inp)().float() - expected).abs().max().item()
    report(case, "triton (graph)", bench(as_graph(forward_fn(tri, inp))), inp, err)
    report(case, "triton (eager)", bench(forward_fn(tri, inp)), inp)
    is_decode = all(q == 1 for _, q in case.specs)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    if is_decode and len(case.specs) * case.kv_heads < num_sms:  # auto splits: show without
        no_split = triton_impl(1, case.heads, case.kv_heads)
        report(case, "triton no-split (graph)", bench(as_graph(forward_fn(no_split, inp))), inp)
    if is_decode and not case.dense:  # lengths differ: show the requests in their given order
        inp.metadata.decode_order = None
        report(case, "triton req order (graph)", bench(as_graph(forward_fn(tri, inp))), inp)
    report(case, "torch_ref (eager)", bench(forward_fn(ref, inp)), inp)
    if case.dense:
        report(case, "dense sdpa (graph)", bench(as_graph(dense_sdpa_fn(case, inp))), inp)


def sweep_splits(dtype: torch.dtype) -> None:
    """Decode at 8k context, batch 1 and 4: time against the number of KV splits."""
    for batch in (1, 4):
        case = Case(f"decode_b{batch}_8k", [(8191, 1)] * batch, True)
        inp = make_inputs(case, dtype)
        for splits in (1, 2, 4, 8, 16, 32, 64, None):
            ms = bench(as_graph(forward_fn(triton_impl(splits), inp)))
            report(case, f"splits={splits or 'auto'}", ms, inp)


def tune(dtype: torch.dtype) -> None:
    """Tile configurations of the varlen (prefill) and decode launches, timed directly."""
    from pagedllm.attention.triton import kernels

    def launch(inp: Inputs, **tiles: kernels.TileConfig) -> Callable[[], None]:
        out = torch.empty_like(inp.query)
        return lambda: kernels.paged_attention(
            inp.query, inp.kv_cache, inp.metadata, out, HEAD_DIM**-0.5, None, **tiles
        )

    prefill = make_inputs(CASES[6], dtype)
    for bm, bn, warps, stages in [
        (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (64, 128, 4, 2), (64, 32, 4, 2),
        (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (32, 64, 4, 2),
    ]:  # fmt: skip
        tiles = kernels.TileConfig(bm, bn, warps, stages)
        report(
            CASES[6],
            f"varlen {bm}x{bn} w{warps} s{stages}",
            bench(as_graph(launch(prefill, varlen_tiles=tiles))),
            prefill,
        )
    decode_cases = {c.name: c for c in CASES}
    for name in ("decode_b64_2k", "decode_b1_8k", "qwen3_decode_b256_1k"):
        case = decode_cases[name]
        inp = make_inputs(case, dtype)
        for bn, warps, stages in [
            (32, 4, 2),
            (64, 4, 2),
            (64, 4, 3),
            (128, 4, 2),
            (128, 8, 2),
            (64, 2, 2),
        ]:
            tiles = kernels.TileConfig(16, bn, warps, stages)
            report(
                case,
                f"decode 16x{bn} w{warps} s{stages}",
                bench(as_graph(launch(inp, decode_tiles=tiles))),
                inp,
            )


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, GB/s counting bytes read and written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--only", nargs="*", help="case names (default: all)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the KV-split sweep")
    parser.add_argument("--tune", action="store_true", help="also sweep tile configurations")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the attention benchmark needs a CUDA device")
    dtype = DTYPES[args.dtype]
    props = torch.cuda.get_device_properties(0)
    import triton

    print(
        f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
        f"triton {triton.__version__}, {args.dtype}; layer: {NUM_HEADS} heads, "
        f"{NUM_KV_HEADS} KV heads, head_dim {HEAD_DIM}, block {BLOCK_SIZE} (qwen3_*: 16 heads)"
    )
    print(f"device-to-device copy: {copy_bandwidth():.0f} GB/s (read + write)", flush=True)
    for case in CASES:
        if not args.only or case.name in args.only:
            run_case(case, dtype)
    if not args.no_sweep:
        sweep_splits(dtype)
    if args.tune:
        tune(dtype)


if __name__ == "__main__":
    main()
