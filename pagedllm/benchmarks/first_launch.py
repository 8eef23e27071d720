"""How long the host blocks when a GEMM runs at a row count new to the process (GPU).

    python -m pagedllm.benchmarks.first_launch

CUDA loads a kernel's code at its first launch (lazy loading), and that load waits until the GPU
is idle: a host that queues work ahead of the GPU (async scheduling) then loses its lead, and
the GPU idles while the host catches up. cuBLAS picks its kernel by the GEMM's shape, so a new
row count may mean a new kernel. Prints, behind ~QUEUED_MS of queued GPU work:
1. the LM head (qwen3-0.6b's 151,936 x 1,024) at new row counts, then at the same ones again,
   and at the row buckets `ModelRunner.warm_up` runs (`row_bucket`);
2. qwen3-0.6b's four layer GEMMs at random row counts up to 16,384 (what eager prompt steps
   see): how many still block with no warm-up, after warming a grid, and padded to the runner's
   warmed buckets.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time

import torch
from torch.nn import functional as F

from pagedllm.worker.buckets import padded_rows, row_buckets

HIDDEN, VOCAB = 1024, 151936
LAYER_SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]  # qkv, o, gate_up, down
QUEUED_MS = 20
BLOCKED_MS = 4.0


def _queue_work() -> None:
    """Keeps the GPU busy for about QUEUED_MS (a spin kernel)."""
    torch.cuda._sleep(int(QUEUED_MS * 2e6))  # ~2 GHz clock: cycles


def _host_ms(weights: list[torch.Tensor], rows: int) -> float:
    """Host ms of `rows`-row GEMMs with each weight, issued behind queued GPU work."""
    inputs = [torch.zeros(rows, w.shape[1], device="cuda", dtype=w.dtype) for w in weights]
    torch.cuda.synchronize()
    _queue_work()
    start = time.perf_counter()
    for x, w in zip(inputs, weights):
        F.linear(x, w)
    elapsed = (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    return elapsed


def lm_head() -> None:
    weight = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16)
    print(f"LM head {VOCAB} x {HIDDEN}, behind ~{QUEUED_MS} ms of queued work (host ms):")
    for rows in (29, 57, 85, 285, 300):
        first, again = _host_ms([weight], rows), _host_ms([weight], rows)
        print(f"  {rows:4d} rows: first call {first:7.2f}, again {again:6.2f}")
    for rows in row_buckets(512):
        _host_ms([weight], rows)
    worst = max(_host_ms([weight], padded_rows(r, 512)) for r in range(1, 513, 7))
    print(f"  after warming the buckets, row counts 1-512 padded to theirs: worst {worst:.2f}")


MODES = {
    "none": "no warm-up",
    "grid": "a grid warmed (multiples of 16 to 512, of 128 to 16,384), counts as they are",
    "buckets": "`row_buckets(16384)` warmed, counts padded to theirs (what the runner does)",
}


def layer_grid(mode: str) -> None:
    """Warms qwen3's layer GEMMs as `mode` says; counts the random row counts whose four GEMMs
    still block."""
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for n, k in LAYER_SHAPES]
    cap = 16384
    warmed = {
        "none": [],
        "grid": list(range(16, 513, 16)) + list(range(640, cap + 1, 128)),
        "buckets": row_buckets(cap),
    }[mode]
    for rows in warmed:
        for w in weights:
            F.linear(torch.zeros(rows, w.shape[1], device="cuda", dtype=w.dtype), w)
    rng = random.Random(0)
    counts = [rng.randint(1, cap) for _ in range(100)]
    if mode == "buckets":
        counts = [padded_rows(rows, cap) for rows in counts]
    blocked = sum(_host_ms(weights, rows) > BLOCKED_MS for rows in counts)
    print(f"  {MODES[mode]}: {blocked} of 100 block")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(MODES), help="(internal) one layer test only")
    ns = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    if ns.mode is not None:
        layer_grid(ns.mode)
        return
    print(torch.cuda.get_device_name(), f"torch {torch.__version__}")
    lm_head()
    print("qwen3-0.6b layer GEMMs at 100 random row counts (1-16,384):")
    for mode in MODES:  # NOTE: one process each: loaded kernels stay loaded
        subprocess.run([sys.executable, "-m", __spec__.name, "--mode", mode], check=True)


if __name__ == "__main__":
    main()
