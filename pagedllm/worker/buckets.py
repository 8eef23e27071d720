"""Row buckets: the few row counts the GPU's GEMMs run at (eager steps, the LM head, and the
decode CUDA graphs' batch sizes), so that start-up can run each of them once.

Owns `row_bucket` (the grid), `padded_rows` (a count → its bucket, capped) and `row_buckets`
(every bucket up to a cap: what `ModelRunner.warm_up` runs and `cuda_graph.capture_sizes`
captures).
"""

from __future__ import annotations

# (up to this many rows, pad to a multiple of): at most 1/8 of padding past 512 rows.
_ROW_STEPS = ((512, 16), (2048, 64), (8192, 256))
_ROW_STEP_ABOVE = 512


def row_bucket(rows: int) -> int:
    """1, 2, 4 or 8 rows, then multiples of 16 up to 512, of 64 up to 2048, of 256 up to 8192,
    of 512 beyond: the few row counts the GPU's eager GEMMs run at (`ModelRunner.warm_up` runs
    them all).

    NOTE: cuBLAS picks its kernel by the GEMM's shape, row count included, and the first launch
    of a kernel not used before in the process loads its code (CUDA's lazy loading), which
    blocks the host until the GPU is idle: on an H200, a 100 ms wait for a GEMM at a new row
    count behind 100 ms of queued work. With the LM head at a new count in most steps (requests
    finish one by one; prompt steps sample any number of rows) and prompt steps of any token
    count, the host lost its lead on the GPU again and again. Padding to warmed buckets removes
    those waits (`python -m pagedllm.benchmarks.first_launch`); warming a coarser grid does not,
    as the kernel changes with the exact count."""
    if rows <= 8:
        return 1 << max(rows - 1, 0).bit_length()
    for limit, step in _ROW_STEPS:
        if rows <= limit:
            return -(-rows // step) * step
    return -(-rows // _ROW_STEP_ABOVE) * _ROW_STEP_ABOVE


def padded_rows(rows: int, cap: int) -> int:
    """The warmed row count a GEMM of `rows` rows runs at: its bucket, at most `cap` (the most
    rows a step has: its bucket could exceed the memory profile); past `cap`, `rows` itself."""
    return rows if rows > cap else min(row_bucket(rows), cap)


def row_buckets(cap: int) -> list[int]:
    """Every row count `padded_rows(rows, cap)` gives for `1 <= rows <= cap`, ascending."""
    buckets, rows = [], 1
    while rows <= cap:
        buckets.append(padded_rows(rows, cap))
        rows = buckets[-1] + 1
    return buckets
