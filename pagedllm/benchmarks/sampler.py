"""The one-pass sampling kernel (pagedllm/worker/sample/kernels.py) against the torch sampler.

    python -m pagedllm.benchmarks.sampler                          # rows 1-256, two vocabularies
    python -m pagedllm.benchmarks.sampler --chunk-sizes auto,2048,8192,32768 --blocks 1024,2048
    python -m pagedllm.benchmarks.sampler --device cpu --tiny      # script check, interpreter

For bf16 logits of 1, 16, 64 and 256 rows of the qwen3 (151936) and llama3 (128256)
vocabularies: `Sampler` on the torch path (temperature 0.6, unseeded: fp32 copy, division,
softmax, `exponential_`, division, argmax) and on the kernel path (one pass over the bf16
logits), then both all-greedy (`argmax_rows` of the fp32 copy, as today's path, vs the kernel
without noise). Time per call replayed from a CUDA graph (device time, as in a step), and the
logits bytes read over that time; the logits are cycled over copies (>= 256 MiB in all) so that
no call finds them in L2. With several chunk sizes, blocks or warps, the kernel is timed for
each (the sampling path; `auto` is `sample.kernels.chunking`). Under a minute on an H200
(estimated: not run on a GPU yet).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time
from collections.abc import Callable

import torch

from pagedllm.benchmarks.interpreter import use_interpreter

ROTATE_BYTES = 256 << 20
TEMPERATURE = 0.6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,16,64,256", help="row counts, comma separated")
    parser.add_argument("--vocab", default="151936,128256", help="vocabularies, comma separated")
    parser.add_argument("--chunk-sizes", default="auto", help="'auto' and/or entries per chunk")
    parser.add_argument("--blocks", default="", help="entries per loop step (default: BLOCK)")
    parser.add_argument("--warps", default="", help="warps per program (default: NUM_WARPS)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (with --device cpu)")
    ns = parser.parse_args(argv)
    if ns.device == "cpu":
        use_interpreter()
    from pagedllm.worker.sample import kernels as sk

    rows_list = [1, 4] if ns.tiny else _ints(ns.rows)
    vocabs = [3000] if ns.tiny else _ints(ns.vocab)
    chunks = [None if c == "auto" else int(c) for c in ns.chunk_sizes.split(",")]
    blocks = _ints(ns.blocks) or [sk.BLOCK]
    warps = _ints(ns.warps) or [sk.NUM_WARPS]
    configs = list(itertools.product(chunks, blocks, warps))
    print(f"{'vocab':>7}{'rows':>5}  {'torch':>8} {'GB/s':>5}  {'kernel':>8} {'GB/s':>5} "
          f"{'speedup':>7}  {'argmax':>8}  {'k.greedy':>8}  chunks x size   (µs per call)")  # fmt: skip
    start = time.perf_counter()
    for vocab in vocabs:
        for rows in rows_list:
            _case(ns.device, rows, vocab, configs, sk)
    print(f"# {time.perf_counter() - start:.0f} s")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _time_us(device: str, call: Callable[[torch.Tensor], object], xs: list[torch.Tensor]) -> float:
    from pagedllm.benchmarks.ops import rotating_call_us

    return rotating_call_us(device, call, xs)


def _case(device: str, rows: int, vocab: int, configs: list, sk) -> None:  # type: ignore[no-untyped-def]
    from pagedllm.worker.sample import Sampler, SamplingMetadata
    from pagedllm.worker.sample.ops import argmax_rows

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    nbytes = rows * vocab * dtype.itemsize
    copies = 1 if device == "cpu" else min(64, max(1, -(-ROTATE_BYTES // nbytes)))
    gen = torch.Generator(device).manual_seed(rows + vocab)
    xs = [
        (torch.randn(rows, vocab, device=device, generator=gen) * 3).to(dtype)
        for _ in range(copies)
    ]
    temperature = torch.full((rows,), TEMPERATURE, device=device)
    inv_temp = torch.full((rows,), 1 / TEMPERATURE, device=device)
    keys = torch.randint(-(2**62), 2**62, (rows,), device=device, generator=gen)
    md = SamplingMetadata(all_greedy=False, all_random=True, temperature=temperature,
                          inv_temperature=inv_temp, sample_keys=keys)  # fmt: skip
    torch_sampler, kernel_sampler = Sampler(use_kernel=False), Sampler(use_kernel=True)
    gbs = lambda us: nbytes / us / 1e3  # noqa: E731

    torch_us = _time_us(device, lambda x: torch_sampler(x, md), xs)
    argmax_us = _time_us(device, lambda x: argmax_rows(x.float()), xs)
    greedy_us = _time_us(device, lambda x: sk.sample_rows(x), xs)
    if not torch.equal(sk.sample_rows(xs[0]), xs[0].argmax(-1)):
        print(f"    WRONG RESULT: the kernel's greedy ids differ from argmax ({rows} x {vocab})")
    for chunk, block, warps in configs:
        if (chunk, block, warps) == (None, sk.BLOCK, sk.NUM_WARPS):
            call: Callable[[torch.Tensor], object] = lambda x: kernel_sampler(x, md)  # noqa: E731
        else:
            call = functools.partial(sk.sample_rows, inv_temperature=inv_temp, keys=keys,
                                     chunk_size=chunk, block=block, num_warps=warps)  # fmt: skip
        us = _time_us(device, call, xs)
        n, size = sk.chunking(rows, vocab, chunk, block)
        extra = "" if len(configs) == 1 else f"  block {block} warps {warps}"
        print(
            f"{vocab:>7}{rows:>5}  {torch_us:>8.1f} {gbs(torch_us):>5.0f}  {us:>8.1f} "
            f"{gbs(us):>5.0f} {torch_us / us:>7.1f}  {argmax_us:>8.1f}  {greedy_us:>8.1f}  "
            f"{n:>4} x {size}{extra}",
            flush=True,
        )
    del xs
    if device == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
