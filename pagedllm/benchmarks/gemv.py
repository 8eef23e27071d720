"""The Triton GEMV (pagedllm/layers/gemv_kernels.py) against `F.linear` at decode shapes.

    python -m pagedllm.benchmarks.gemv            # table's configs vs F.linear (cuBLAS)
    python -m pagedllm.benchmarks.gemv --sweep    # + a config grid; prints the `_TABLE` to paste
    python -m pagedllm.benchmarks.gemv --device cpu --tiny [--sweep]   # script check, interpreter

For the llama3-8b and qwen3-0.6b linears (and the down projection fused with SiLU-and-mul, whose
baseline is `silu_and_mul` + `F.linear`), M = 1, 2, 4, 8, 16 rows, bf16: the time per call
replayed from a CUDA graph (device time, as in decode steps) and the weight bytes over that time.
Weights are cycled over enough copies (>= 256 MiB in all) that no call finds its weight in L2,
as in a real step, where a layer's weights are evicted long before they are read again.

The sweep runs in two rounds per (shape, M): block shapes x warps (x stages for tl.dot), then
the best three again with split-K where the output blocks alone do not fill the GPU; about 15-30
configs per (shape, M). Kernels compile per padded M and config (~0.3 s each), not per shape, so
most of its time is the first shape's compiles: about two minutes in all (estimated, CPU-side
compiles for sm_90), or less with `--m` / `--shapes`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

from pagedllm.benchmarks.interpreter import use_interpreter

# name -> (K, N, act)
SHAPES: dict[str, tuple[int, int, str]] = {
    "llama3-8b qkv": (4096, 6144, ""),
    "llama3-8b o": (4096, 4096, ""),
    "llama3-8b gate_up": (4096, 28672, ""),
    "llama3-8b down": (14336, 4096, ""),
    "llama3-8b down+silu": (14336, 4096, "silu_mul"),
    "llama3-8b lm_head": (4096, 128256, ""),
    "qwen3-0.6b qkv": (1024, 4096, ""),
    "qwen3-0.6b o": (2048, 1024, ""),
    "qwen3-0.6b gate_up": (1024, 6144, ""),
    "qwen3-0.6b down": (3072, 1024, ""),
    "qwen3-0.6b down+silu": (3072, 1024, "silu_mul"),
    "qwen3-0.6b lm_head": (1024, 151936, ""),
}
TINY_SHAPES: dict[str, tuple[int, int, str]] = {
    "tiny": (96, 40, ""),
    "tiny+silu": (96, 40, "silu_mul"),
}
ROTATE_BYTES = 256 << 20
SMS = 132  # H100 / H200


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="search configs, print the table")
    parser.add_argument("--m", default="1,2,4,8,16", help="row counts, comma separated")
    parser.add_argument("--shapes", default="", help="substring filter on shape names")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (with --device cpu)")
    parser.add_argument(
        "--wide", action="store_true", help="a wider one-row grid (1-8 warps, split-K always)"
    )
    ns = parser.parse_args(argv)
    if ns.device == "cpu":
        use_interpreter()
    from pagedllm.layers import gemv_kernels

    shapes = TINY_SHAPES if ns.tiny else SHAPES
    shapes = {k: v for k, v in shapes.items() if ns.shapes in k}
    ms = [int(m) for m in ns.m.split(",")]
    bench = _Bench(ns.device, gemv_kernels)
    table: dict[tuple[str, int, int, int], Any] = {}
    print(f"{'shape':<22}{'M':>3}  {'F.linear':>9} {'GB/s':>6}  {'gemv':>9} {'GB/s':>6}  "
          f"{'speedup':>7}  config   (µs per call)")  # fmt: skip
    start = time.perf_counter()
    for name, (k, n, act) in shapes.items():
        for m in ms:
            row = bench.case(name, m, k, n, act, ns.sweep, tiny=ns.tiny, wide=ns.wide)
            if row is not None:
                table[(act, n, k, m)] = row
        bench.release()
    if ns.sweep:
        print(f"\n# swept in {time.perf_counter() - start:.0f} s; paste into gemv_kernels._TABLE:")
        print("_TABLE: dict[tuple[str, int, int, int], GemvConfig] = {")
        for key, cfg in table.items():
            print(f"    {key!r}: {cfg!r},")
        print("}")


class _Bench:
    def __init__(self, device: str, kernels: Any) -> None:
        self.device = device
        self.kernels = kernels
        self.dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self._weights: tuple[tuple[int, int], list[torch.Tensor]] | None = None

    def weights(self, n: int, k: int) -> list[torch.Tensor]:
        """Copies of one random `[n, k]` weight, enough to defeat L2 when cycled."""
        if self._weights is None or self._weights[0] != (n, k):
            self._weights = None
            nbytes = n * k * self.dtype.itemsize
            count = 1 if self.device == "cpu" else min(128, max(1, -(-ROTATE_BYTES // nbytes)))
            gen = torch.Generator(self.device).manual_seed(n + k)
            ws = [
                torch.randn(n, k, device=self.device, dtype=self.dtype, generator=gen) * k**-0.5
                for _ in range(count)
            ]
            self._weights = ((n, k), ws)
        return self._weights[1]

    def release(self) -> None:
        self._weights = None
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def time_us(self, make_call: Callable[[torch.Tensor], object], ws: list[torch.Tensor]) -> float:
        from pagedllm.benchmarks.ops import rotating_call_us

        return rotating_call_us(self.device, make_call, ws)

    def case(
        self,
        name: str,
        m: int,
        k: int,
        n: int,
        act: str,
        sweep: bool,
        tiny: bool,
        wide: bool = False,
    ) -> Any | None:
        kern = self.kernels
        ws = self.weights(n, k)
        x = torch.randn(m, 2 * k if act else k, device=self.device, dtype=self.dtype)
        fn = kern.gemv_silu_mul if act else kern.gemv

        def baseline(w: torch.Tensor) -> torch.Tensor:
            return F.linear(_silu_and_mul(x) if act else x, w)

        def with_config(cfg: Any) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda w: fn(x, w, None, cfg)

        gbs = lambda us: n * k * self.dtype.itemsize / us / 1e3  # noqa: E731
        ref_us = self.time_us(baseline, ws)
        expected = baseline(ws[0])
        cfg = kern._config(m, n, k, self.dtype, act)
        _check(with_config(cfg)(ws[0]), expected, name, cfg)
        best = (self.time_us(with_config(cfg), ws), cfg)
        if sweep:
            best = self.sweep(m, n, with_config, ws, best, expected, name, tiny, wide)
        us, cfg = best
        print(
            f"{name:<22}{m:>3}  {ref_us:>9.1f} {gbs(ref_us):>6.0f}  {us:>9.1f} {gbs(us):>6.0f}  "
            f"{ref_us / us:>7.2f}  {tuple(cfg)}",
            flush=True,
        )
        return cfg if sweep else None

    def sweep(self, m, n, with_config, ws, best, expected, name, tiny, wide=False):  # type: ignore[no-untyped-def]
        """Round 1: the candidates; round 2: the best three with split-K. A config whose result
        is wrong or that fails to compile or launch is reported and skipped."""
        kern = self.kernels
        k = ws[0].shape[1]
        results = [best]

        def run(cfg: Any) -> None:
            try:
                if _check(with_config(cfg)(ws[0]), expected, name, cfg):
                    results.append((self.time_us(with_config(cfg), ws), cfg))
            except Exception as e:  # out of registers / shared memory: skip the config
                print(f"    skipped {tuple(cfg)}: {type(e).__name__}: {str(e)[:80]}")

        for cfg in candidates(m, k, kern.GemvConfig, tiny, wide):
            run(cfg)
        # NOTE: num_stages only pipelines loads that feed tl.dot (checked in the PTX); split-K
        # only pays when the output blocks alone do not fill the GPU.
        top = [cfg for _, cfg in sorted(results)[: 1 if tiny else 3]]
        for cfg in top:
            if tiny or wide or n // cfg.block_n < 4 * SMS:
                for split in (2,) if tiny else (2, 4):
                    run(cfg._replace(split_k=split))
        return min(results)


def candidates(
    m: int, k: int, config_cls: Any, tiny: bool = False, wide: bool = False
) -> list[Any]:
    """Round-1 configs for `m` bf16 rows. Elementwise (up to 4 rows): `BLOCK_K` a multiple of 8
    elements x 32 threads x warps (no layout conversion in the loop, see gemv_kernels), 16 to
    64 fp32 accumulators per thread (`wide`: 8 to 128, and 1 warp too). `tl.dot` from 4 rows."""
    if tiny:  # a few, to check the script under the interpreter
        return [config_cls(4, 32), config_cls(16, 64, dot=m >= 4)]
    m_pad = 1 << (m - 1).bit_length()
    out = []
    lo, hi = (1, 16) if wide else (2, 8)
    if m <= 4:
        for warps in (1, 2, 4, 8) if wide else (2, 4, 8):
            for mult in (1, 2, 4) if wide else (1, 2):
                for bn in (1, 2, 4, 8, 16):
                    bk = 8 * 32 * warps * mult
                    if lo <= m_pad * bn * mult <= hi and bk <= k:
                        out.append(config_cls(bn, bk, warps))
    if m >= 4:
        for bk in (128, 256):
            for bn in (16, 32, 64):
                for stages in (1, 3):
                    out.append(config_cls(bn, bk, 4, stages, dot=True))
    return out


def _silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        from pagedllm.layers import fused_kernels

        return fused_kernels.silu_and_mul(x)
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def _check(y: torch.Tensor, ref: torch.Tensor, name: str, cfg: Any) -> bool:
    """A wrong result is reported, not timed silently (a few bf16 rounding steps allowed)."""
    err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
    if err > 3e-2:
        print(f"    WRONG RESULT {name} {tuple(cfg)}: max error {err:.3g} of max |y|")
    return err <= 3e-2


if __name__ == "__main__":
    main()
