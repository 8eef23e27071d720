"""`pagedllm bench quant-gemm`: the quantized GEMMs (pagedllm/layers/quantization/kernels/)
against the bf16 product, at llama3-8b's linear shapes.

    pagedllm bench quant-gemm                       # M = 1, 4, 8, 16, 256, 4096; every shape
    pagedllm bench quant-gemm --m 1 --sweep         # + a W4A16 / block-FP8 config grid per (shape, M)
    pagedllm bench quant-gemm --m 1,4,8 --sweep-gemv  # + the GEMVs' config grids (`_TABLE` lines)
    pagedllm bench quant-gemm --device cpu --tiny   # script check, under Triton's interpreter

Per (shape, M), µs per call replayed from a CUDA graph (device time, as in decode steps), each
call with its activation quantization included, as a layer computes it:
- `bf16`: the unquantized method's product (`apply_linear`: cuBLAS, or the GEMV for few rows);
- `fp8`: W8A8 per-channel weights, per-token dynamic activations (`quant_per_token` +
  `torch._scaled_mm`, compressed-tensors FP8_DYNAMIC);
- `fp8-blk`: 128 x 128 block weights, 1 x 128 activation groups (`quant_per_group` +
  `block_scaled_mm`, DeepSeek-V3 / Qwen3-FP8);
- `w4a16`: int4, group 128, symmetric (`int_gemm`, compressed-tensors W4A16);
- `fp8-gemv` / `w4-gemv`: the few-row GEMVs of the same weights (`gemv_quant.fp8_gemv` after
  `quant_per_token`, `gemv_quant.int_gemv`), which the methods take for M <= `FP8_MAX_M` /
  `INT_MAX_M` ("-" above); x: over bf16's `apply_linear` (the bf16 GEMV up to its rows, else
  cuBLAS).
Weights are cycled over copies of at least 256 MiB in all, so no call finds its weight in L2;
GB/s is the weight bytes (scales included) over the time. `--sweep-gemv` times a grid of
launch configs of each GEMV (30-54 per format, shape and M) and prints the best as a
`gemv_quant._TABLE` entry to paste. `--sweep` also times a grid of
W4A16 configs (about 60 for M <= 16, 80 above; each compiles once, ~1 s) and 32 block-FP8 ones
per (shape, M) and prints the best beside the default's time: a few minutes per M value (an
estimate, not measured: run `--m 1 --sweep`, then `--m 16`, … within the 10-minute limit).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from typing import Any

import torch

from pagedllm.benchmarks.interpreter import use_interpreter

# name -> (K, N)
SHAPES: dict[str, tuple[int, int]] = {
    "llama3-8b qkv": (4096, 6144),
    "llama3-8b o": (4096, 4096),
    "llama3-8b gate_up": (4096, 28672),
    "llama3-8b down": (14336, 4096),
}
TINY_SHAPES = {"tiny": (256, 96)}
ROTATE_BYTES = 256 << 20
GROUP = 128
COLUMNS = ("fp8", "fp8-blk", "w4a16", "fp8-gemv", "w4-gemv")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--m", default="1,4,8,16,256,4096", help="row counts, comma separated")
    parser.add_argument("--shapes", default="", help="substring filter on shape names")
    parser.add_argument("--sweep", action="store_true", help="+ W4A16 / block-FP8 config grids")
    parser.add_argument(
        "--sweep-gemv", action="store_true", help="+ config grids of the FP8 / W4A16 GEMVs"
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (with --device cpu)")


def main(ns: argparse.Namespace) -> None:
    if ns.device == "cpu":
        use_interpreter()
    shapes = TINY_SHAPES if ns.tiny else SHAPES
    ms = [int(m) for m in ns.m.split(",")] if not ns.tiny else [1, 3, 17]
    heads = "".join(f"  {key:>8} {'x':>5}" for key in COLUMNS)
    print(f"{'shape':<20}{'M':>5}  {'bf16':>8}{heads}   µs per call (x: speedup over bf16), "
          "weight GB/s")  # fmt: skip
    for name, (k, n) in shapes.items():
        if ns.shapes not in name:
            continue
        weights = _Weights(ns.device, n, k)
        for m in ms:
            _case(name, m, weights, ns.sweep, ns.device, ns.sweep_gemv)
        del weights
        if ns.device == "cuda":
            torch.cuda.empty_cache()


class _Weights:
    """Copies of each format's `[n, k]` weight (enough bytes to defeat L2 when cycled)."""

    def __init__(self, device: str, n: int, k: int) -> None:
        from pagedllm.layers.quantization.packed import IntWeights

        self.n, self.k = n, k
        gen = torch.Generator(device).manual_seed(n + k)

        def copies(nbytes: int) -> int:
            return 1 if device == "cpu" else min(64, max(2, -(-ROTATE_BYTES // nbytes)))

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device=device, generator=gen)

        self.bf16 = [(randn(n, k) * k**-0.5).to(torch.bfloat16) for _ in range(copies(2 * n * k))]
        self.fp8 = [
            ((randn(n, k) * 100).clamp(-448, 448).to(torch.float8_e4m3fn), randn(1, n).abs() * 1e-4)
            for _ in range(copies(n * k))
        ]
        blocks = (-(-n // 128), -(-k // 128))
        self.fp8_blk = [(w, randn(*blocks).abs() * 1e-4) for w, _ in self.fp8]
        groups = -(-k // GROUP)
        self.w4 = [
            IntWeights(
                qweight=torch.randint(
                    -(2**31),
                    2**31 - 1,
                    (k // 8, n),
                    device=device,
                    dtype=torch.int32,
                    generator=gen,
                ),
                scales=randn(groups, n).abs() * 1e-3,
                zeros=None,
                bits=4,
                group_size=GROUP,
                n=n,
                k=k,
            )
            for _ in range(copies(n * k // 2))
        ]


def _time(device: str, call: Callable[[Any], object], inputs: list[Any]) -> float:
    from pagedllm.benchmarks.ops import rotating_call_us

    return rotating_call_us(device, call, inputs)


def _case(
    name: str, m: int, w: _Weights, sweep: bool, device: str, sweep_gemv: bool = False
) -> None:
    from pagedllm.layers.quantization.kernels import fp8_gemm, fp8_quant, gemv_quant, w4a16
    from pagedllm.layers.quantization.unquantized import apply_linear

    n, k = w.n, w.k
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    dt = torch.bfloat16

    def fp8_call(ws: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, s = fp8_quant.quant_per_token(x)
        return fp8_gemm.scaled_mm(q, s, ws[0], ws[1], dt)

    def blk_call(ws: tuple[torch.Tensor, torch.Tensor], config: Any = None) -> torch.Tensor:
        q, s = fp8_quant.quant_per_group(x, 128)
        return fp8_gemm.block_scaled_mm(q, s, ws[0], ws[1], (128, 128), dt, config=config)

    def fp8_gemv_call(ws: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, s = fp8_quant.quant_per_token(x)
        return gemv_quant.fp8_gemv(q, s, ws[0], ws[1], dt)

    times = {
        "bf16": _time(device, lambda wt: apply_linear(x, wt), w.bf16),
        "fp8": _time(device, fp8_call, w.fp8),
        "fp8-blk": _time(device, blk_call, w.fp8_blk),
        "w4a16": _time(device, lambda iw: w4a16.int_gemm(x, iw), w.w4),
    }
    if m <= gemv_quant.FP8_MAX_M:
        times["fp8-gemv"] = _time(device, fp8_gemv_call, w.fp8)
    if m <= gemv_quant.INT_MAX_M:
        times["w4-gemv"] = _time(device, lambda iw: gemv_quant.int_gemv(x, iw), w.w4)
    w4_bytes = n * k // 2 + 4 * n * (-(-k // GROUP))
    nbytes = {
        "bf16": 2 * n * k,
        "fp8": n * k + 4 * n,
        "fp8-blk": n * k + 4 * (n // 128 + 1) * (k // 128 + 1),
        "w4a16": w4_bytes,
        "fp8-gemv": n * k + 4 * n,
        "w4-gemv": w4_bytes,
    }
    base = times["bf16"]
    cells = [f"{times['bf16']:8.1f}"]
    for key in COLUMNS:
        t = times.get(key)
        cells.append(f"{t:8.1f} {base / t:5.2f}" if t else f"{'-':>8} {'-':>5}")
    gbs = "  ".join(f"{key} {nbytes[key] / times[key] / 1e3:6.0f}" for key in times)
    print(f"{name:<20}{m:>5}  " + "  ".join(cells) + f"   {gbs}")
    if sweep:
        _sweep_w4a16(device, x, w, times["w4a16"])
        _sweep_block(device, blk_call, w, times["fp8-blk"], m)
    if sweep_gemv:
        _sweep_gemv(device, x, w, times)


def _sweep_w4a16(device: str, x: torch.Tensor, w: _Weights, default_us: float) -> None:
    from pagedllm.layers.quantization.kernels import w4a16

    m = x.shape[0]
    ref = w4a16.int_gemm(x, w.w4[0]).float()
    if m <= w4a16.GEMV_MAX_M:
        grid = itertools.product(
            (16,), (32, 64, 128), (64, 128), (1, 2, 4, 8, 16), (4,), (3, 4), (False, True)
        )
    else:
        grid = itertools.product(
            (64, 128), (128, 256), (32, 64, 128), (1,), (4, 8), (3, 4), (False, True)
        )
    best: tuple[float, Any] | None = None
    for bm, bn, bk, split, warps, stages, split_dot in grid:
        if bm > max(16, 2 * m) or (split_dot and bk < 128):
            continue
        cfg = w4a16.IntGemmConfig(bm, bn, bk, split, warps, stages, split_dot)
        try:
            got = w4a16.int_gemm(x, w.w4[0], config=cfg).float()
            if (got - ref).abs().max() > 2**-6 * ref.abs().max():
                print(f"    w4a16 {cfg}: differs from the default config, skipped")
                continue
            us = _time(device, lambda iw, c=cfg: w4a16.int_gemm(x, iw, config=c), w.w4)
        except Exception as e:  # NOTE: configs past the shared memory: skipped
            print(f"    w4a16 {cfg}: {type(e).__name__}")
            continue
        if best is None or us < best[0]:
            best = (us, cfg)
    if best is not None:
        print(f"    w4a16 best {best[0]:.1f} µs (default {default_us:.1f}): {best[1]}")


def _sweep_block(device: str, blk_call: Any, w: _Weights, default_us: float, m: int) -> None:
    best: tuple[float, Any] | None = None
    for bm, bn, warps, stages in itertools.product((16, 32, 64, 128), (64, 128), (4, 8), (3, 4)):
        if bm > max(16, 2 * m):
            continue
        cfg = (bm, bn, warps, stages)
        try:
            us = _time(device, lambda ws, c=cfg: blk_call(ws, c), w.fp8_blk)
        except Exception as e:
            print(f"    fp8-blk {cfg}: {type(e).__name__}")
            continue
        if best is None or us < best[0]:
            best = (us, cfg)
    if best is not None:
        print(f"    fp8-blk best {best[0]:.1f} µs (default {default_us:.1f}): {best[1]}")


def _sweep_gemv(device: str, x: torch.Tensor, w: _Weights, times: dict[str, float]) -> None:
    """The FP8 / W4A16 GEMVs over a config grid; the best as a `gemv_quant._TABLE` line."""
    from pagedllm.layers.quantization.kernels import fp8_quant, gemv_quant

    m, (n, k) = x.shape[0], (w.n, w.k)
    m_pad = 1 << (m - 1).bit_length()
    c = gemv_quant.QuantGemvConfig
    q, s = fp8_quant.quant_per_token(x)
    grids: dict[str, tuple[list[Any], Callable[..., torch.Tensor], list[Any]]] = {}
    if m <= gemv_quant.FP8_MAX_M:
        if m <= 4:  # elementwise: 16 bytes per thread per tile, 1-2 vectors
            shapes = [(512, 1), (1024, 1), (1024, 2), (2048, 2), (2048, 4), (4096, 4)]
            grid = [
                c(bn, bk, wp, sp)
                for bk, wp in shapes
                for bn in (1, 2, 4)
                for sp in (1, 2)
                if bn * bk // (32 * wp) * m_pad <= 128
            ]  # NOTE: only configs whose accumulators fit in registers
        else:
            grid = [c(bn, bk, 4, sp, True) for bn in (16, 32, 64) for bk in (128, 256)
                    for sp in (1, 2, 4)]  # fmt: skip
        grids["fp8-gemv"] = (
            grid,
            lambda ws, cfg: gemv_quant.fp8_gemv(q, s, ws[0], ws[1], x.dtype, config=cfg),
            w.fp8,
        )
    if m <= gemv_quant.INT_MAX_M:
        kw = k // 8
        split = gemv_quant.int_default_config(m, n, kw).split_k
        grid = [
            c(bn, br, wp, sp)
            for bn in (128, 256)
            for br in (8, 16, 32)
            for wp in (1, 2, 4)
            for sp in dict.fromkeys((max(1, split // 2), split, 2 * split))
            if br * bn // (32 * wp) * 2 * m_pad <= 128
        ]  # NOTE: only configs whose accumulators fit in registers
        grids["w4-gemv"] = (grid, lambda iw, cfg: gemv_quant.int_gemv(x, iw, config=cfg), w.w4)
    for key, (grid, call, inputs) in grids.items():
        ref = call(inputs[0], None).float()
        best: tuple[float, Any] | None = None
        for cfg in grid:
            try:
                got = call(inputs[0], cfg).float()
                if (got - ref).abs().max() > 2**-6 * ref.abs().max():
                    print(f"    {key} {cfg}: differs from the default config, skipped")
                    continue
                us = _time(device, lambda ws, cf=cfg, f=call: f(ws, cf), inputs)
            except Exception as e:  # NOTE: configs past the registers: skipped
                print(f"    {key} {cfg}: {type(e).__name__}")
                continue
            if best is None or us < best[0]:
                best = (us, cfg)
        if best is not None:
            kind = "fp8" if key == "fp8-gemv" else "int4"
            print(f"    {key} best {best[0]:.1f} µs (default {times[key]:.1f}): "
                  f'("{kind}", {n}, {k}, {m_pad}): C{tuple(best[1])},')  # fmt: skip
