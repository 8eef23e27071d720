"""`pagedllm bench moe`: the fused-MoE Triton kernels (pagedllm/layers/fused_moe/kernels.py)
against the torch reference (`FusedMoE.forward_torch`), and the sweep that writes their table.

    pagedllm bench moe --model qwen3-30b-a3b          # E 128, H 2048, I 768, top-k 8, bf16
    pagedllm bench moe -E 8 -H 4096 -I 14336 -k 2     # any shape (Mixtral 8x7B's)
    pagedllm bench moe --model qwen3-30b-a3b --sweep  # + search configs, write the JSON table
    pagedllm bench moe --device cpu --tiny [--sweep]  # script check, under Triton's interpreter

For each token count (1 … 4096, random routing by the layer's router): the reference (eager:
it reads the expert counts back on the host, so it cannot be graph-captured), the kernels eager
(host launch overhead included) and replayed from a CUDA graph (device time, as in decode
steps), the alignment alone (graph), and the bandwidth of the distinct experts' weights over
the graph time.

`--sweep` picks per token count the `MoEConfig` of least total device time: for each candidate
`BLOCK_M` (the alignment's block, shared by both GEMMs) it times each GEMM alone over its own
candidate tiles (`GEMM_CANDIDATES`, those whose pipeline fits in shared memory), keeps each
GEMM's best, and compares the sums. A config whose output differs from the default config's by
more than a few rounding steps is reported and skipped. It then writes
`configs/<config_file_name>.json` in the package (or `--output`), which `tuning.get_config`
reads at run time. Compiles dominate (each `BLOCK_M` x tile config compiles once, then serves
every token count): about 20 tile configs x 2 GEMMs x 4 `BLOCK_M` values at ~1 s each, so
about 3-4 minutes for the 13 token counts (estimated from a partial sweep on an H200).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pagedllm.benchmarks.interpreter import use_interpreter

# name -> (E, H, I, top_k, bias, activation)
MODELS: dict[str, tuple[int, int, int, int, bool, str]] = {
    "qwen3-30b-a3b": (128, 2048, 768, 8, False, "silu"),
    "mixtral-8x7b": (8, 4096, 14336, 2, False, "silu"),
    "gpt-oss-20b": (32, 2880, 2880, 4, True, "swigluoai"),
    "tiny": (4, 40, 24, 2, False, "silu"),
}
TOKENS = "1,2,4,8,16,32,64,128,256,512,1024,2048,4096"
TINY_TOKENS = "1,5,17"
SMEM_BYTES = 227 * 1024  # H100 / H200: per block, opt-in
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="qwen3-30b-a3b", choices=sorted(MODELS), help="a preset shape"
    )
    parser.add_argument("-E", "--num-experts", type=int, help="overrides the preset's")
    parser.add_argument("-H", "--hidden-size", type=int, help="overrides the preset's")
    parser.add_argument("-I", "--intermediate-size", type=int, help="overrides the preset's")
    parser.add_argument("-k", "--top-k", type=int, help="overrides the preset's")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--tokens", default=TOKENS, help="token counts, comma separated")
    parser.add_argument("--sweep", action="store_true", help="search configs, write the table")
    parser.add_argument("--output", help="the table's path (default: the package's configs/)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny preset and few token counts (with cpu)"
    )


def main(ns: argparse.Namespace) -> None:
    if ns.device == "cpu":
        use_interpreter()
    from pagedllm.layers.fused_moe import kernels

    preset = MODELS["tiny" if ns.tiny else ns.model]
    num_experts = ns.num_experts or preset[0]
    hidden = ns.hidden_size or preset[1]
    inter = ns.intermediate_size or preset[2]
    top_k = ns.top_k or preset[3]
    bias, activation = preset[4], preset[5]
    dtype = DTYPES[ns.dtype]
    tokens = [
        int(t) for t in (TINY_TOKENS if ns.tiny and ns.tokens == TOKENS else ns.tokens).split(",")
    ]
    bench = _Bench(ns.device, kernels, num_experts, hidden, inter, top_k, bias, activation, dtype)
    print(
        f"E {num_experts}  H {hidden}  I {inter}  top-k {top_k}  {ns.dtype}  {activation}"
        f"{' +bias' if bias else ''}  on {kernels.device_name(torch.device(ns.device))}"
    )
    print(f"{'tokens':>6}  {'torch':>9}  {'eager':>9}  {'graph':>9}  {'align':>6}  {'GB/s':>6}  "
          f"{'speedup':>7}  config   (µs per call; speedup: torch / graph)")  # fmt: skip
    table: dict[int, Any] = {}
    start = time.perf_counter()
    for t in tokens:
        table[t] = bench.case(t, ns.sweep)
    if ns.sweep:
        device = kernels.device_name(torch.device(ns.device))
        name = kernels.config_file_name(num_experts, inter, hidden, dtype, device)
        path = Path(ns.output) if ns.output else Path(str(kernels.configs_dir())) / name
        write_table(path, table, top_k)
        print(f"# swept in {time.perf_counter() - start:.0f} s; wrote {path}")


def write_table(path: Path, table: dict[int, Any], top_k: int) -> None:
    """The JSON `tuning.load_table` reads: token count → `MoEConfig.to_json()`; keys starting
    with "_" are notes (the top-k it was swept at: the best tiles follow the slots per expert)."""
    entries = [f'"_swept_top_k": {top_k}']
    entries += [f'"{t}": {json.dumps(cfg.to_json())}' for t, cfg in sorted(table.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{\n  " + ",\n  ".join(entries) + "\n}\n")  # one line per token count


class _Bench:
    def __init__(  # type: ignore[no-untyped-def]
        self, device, kernels, num_experts, hidden, inter, top_k, bias, activation, dtype
    ) -> None:
        from pagedllm.layers.fused_moe import FusedMoE

        self.device, self.kern, self.dtype = device, kernels, dtype
        self.top_k, self.activation = top_k, activation
        gen = torch.Generator(device).manual_seed(0)
        moe = FusedMoE(num_experts, top_k, hidden, inter, bias=bias, activation=activation)
        moe = moe.to(device=device, dtype=dtype)
        for p in moe.parameters():
            p.data.normal_(generator=gen).mul_(p.shape[-1] ** -0.5)
        self.moe, self.gen = moe, gen

    def inputs(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        moe = self.moe
        x = torch.randn(num_tokens, moe.hidden_size, device=self.device, generator=self.gen)
        logits = torch.randn(num_tokens, moe.num_experts, device=self.device, generator=self.gen)
        weights, ids = moe.route(logits)
        return x.to(self.dtype), weights, ids

    def case(self, num_tokens: int, sweep: bool) -> Any:
        kern, moe = self.kern, self.moe
        x, weights, ids = self.inputs(num_tokens)
        expected = moe.forward_torch(x, weights, ids)
        ref_us = self.time_us(lambda: moe.forward_torch(x, weights, ids), graph=False)
        cfg = kern.get_config(
            num_tokens, moe.num_experts, moe.intermediate_size, moe.hidden_size, self.dtype,
            kern.device_name(x.device), self.top_k,
        )  # fmt: skip
        if sweep:
            cfg = self.sweep(x, weights, ids, cfg)
        run = lambda: self.call(x, weights, ids, cfg)  # noqa: E731
        _check(run(), expected, f"{num_tokens} tokens", cfg)
        eager_us = self.time_us(run, graph=False)
        graph_us = self.time_us(run, graph=True)
        align_us = self.time_us(
            lambda: kern.align_tokens(ids, moe.num_experts, cfg.block_m), graph=True
        )
        experts = int(torch.unique(ids).numel())
        bytes_ = experts * sum(p[0].numel() * p.element_size() for p in moe.parameters())
        print(
            f"{num_tokens:>6}  {ref_us:>9.1f}  {eager_us:>9.1f}  {graph_us:>9.1f}  "
            f"{align_us:>6.1f}  {bytes_ / graph_us / 1e3:>6.0f}  {ref_us / graph_us:>7.2f}  "
            f"{_short(cfg)}",
            flush=True,
        )
        return cfg

    def call(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, cfg: Any) -> Any:
        moe = self.moe
        return self.kern.fused_moe(
            x, moe.w13_weight, moe.w2_weight, weights, ids,
            w13_bias=moe.w13_bias, w2_bias=moe.w2_bias, activation=moe.activation,
            alpha=moe.swiglu_alpha, limit=moe.swiglu_limit, config=cfg,
        )  # fmt: skip

    def time_us(self, fn: Callable[[], object], graph: bool) -> float:
        if self.device == "cpu":  # the interpreter: one call, a smoke test
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e6
        return device_time_us(fn, graph)

    def sweep(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, default: Any) -> Any:
        """Per candidate `BLOCK_M`: each GEMM's best tiles, timed alone on the same alignment;
        the config of least total time (the alignment's and the slot sum's included)."""
        kern, moe = self.kern, self.moe
        inter, hidden = moe.intermediate_size, moe.hidden_size
        flat_w = weights.reshape(-1).float().contiguous()
        w13b, w2b = moe.w13_bias, moe.w2_bias
        align = kern.align_tokens(ids, moe.num_experts, default.block_m)
        ref_act = kern._w13(x, moe.w13_weight, w13b, align, self.top_k, self.activation,
                            moe.swiglu_alpha, moe.swiglu_limit, default)  # fmt: skip
        ref_out = torch.empty(ref_act.shape[0], hidden, dtype=x.dtype, device=x.device)
        kern._w2(ref_act, moe.w2_weight, w2b, flat_w, ref_out, align, default)
        best: tuple[float, Any] | None = None
        for block_m in block_m_candidates(x.shape[0] * self.top_k / moe.num_experts, self.device):
            align = kern.align_tokens(ids, moe.num_experts, block_m)
            out = torch.empty_like(ref_out)

            def w13(g: Any, block_m: int = block_m, align: Any = align) -> torch.Tensor:
                cfg = kern.MoEConfig(block_m, g, g)
                return kern._w13(x, moe.w13_weight, w13b, align, self.top_k, self.activation,
                                 moe.swiglu_alpha, moe.swiglu_limit, cfg)  # fmt: skip

            def w2(g: Any, block_m: int = block_m, align: Any = align, out: Any = out) -> Any:
                kern._w2(
                    ref_act, moe.w2_weight, w2b, flat_w, out, align, kern.MoEConfig(block_m, g, g)
                )
                return out

            t13, g13 = self.best_gemm(w13, ref_act, block_m, True, hidden, inter)
            t2, g2 = self.best_gemm(w2, ref_out, block_m, False, inter, hidden)
            if g13 is None or g2 is None:
                continue
            cfg = kern.MoEConfig(block_m, g13, g2)
            total = self.time_us(lambda cfg=cfg: self.call(x, weights, ids, cfg), graph=True)
            print(f"    BLOCK_M {block_m:>3}: w13 {t13:8.1f}  w2 {t2:8.1f}  all {total:8.1f}  "
                  f"{_short(cfg)}", flush=True)  # fmt: skip
            if best is None or total < best[0]:
                best = (total, cfg)
        return default if best is None else best[1]

    def best_gemm(self, fn, expected, block_m, gated, k_size, n_size):  # type: ignore[no-untyped-def]
        """The fastest correct `GemmConfig` of `gemm_candidates` for one GEMM."""
        best: tuple[float, Any] = (float("inf"), None)
        for g in gemm_candidates(block_m, gated, self.dtype, self.device, k_size, n_size):
            try:
                if not _check(fn(g), expected, "gemm", g, quiet=False):
                    continue
                us = self.time_us(lambda g=g: fn(g), graph=True)
            except Exception as e:  # out of resources: skip the config
                print(f"    skipped {tuple(g)}: {type(e).__name__}: {str(e)[:80]}")
                continue
            best = min(best, (us, g), key=lambda r: r[0])
        return best


def block_m_candidates(slots_per_expert: float, device: str) -> list[int]:
    """Rows per block: the largest up to twice the slots per expert (padding beyond that is
    wasted work) and the one below it."""
    if device == "cpu":
        return [16]
    out = [bm for bm in (16, 32, 64, 128) if bm <= max(16.0, 2 * slots_per_expert)]
    return out[-2:]


def gemm_candidates(  # type: ignore[no-untyped-def]
    block_m: int, gated: bool, dtype: torch.dtype, device: str, k_size: int, n_size: int
) -> list[Any]:
    """Tiles for one GEMM whose pipelined stages fit in shared memory (w13 loads two weight
    tiles per step): 4 warps and no row groups for 16-32-row blocks (decode: weight streaming);
    above, 8 warps for tiles wider than 64 and row groups of 1 or 16 (L2 reuse of the weights).
    At most 18-24 per GEMM and `BLOCK_M`: a wider grid (5 stages, 4 warps everywhere, BLOCK_K
    32) was pruned after a first sweep on an H200 (Qwen3-30B-A3B at 1 and 4096 tokens, Mixtral
    8x7B at 4096), where those lost."""
    from pagedllm.layers.fused_moe.kernels import GemmConfig

    if device == "cpu":
        return [GemmConfig(16, 16), GemmConfig(32, 32, 1, 4, 1)]
    size = dtype.itemsize
    out = []
    small = block_m <= 32
    for bn in (32, 64, 128) if small else (64, 128, 256):
        for bk in (64, 128, 256) if small else (64, 128):
            for stages in (3, 4):
                for group in (1,) if small else (1, 16):
                    warps = 4 if small or bn == 64 else 8
                    tile = (block_m + (2 if gated else 1) * bn) * bk * size
                    if stages * tile > SMEM_BYTES or bk > 2 * k_size or bn > 2 * n_size:
                        continue
                    out.append(GemmConfig(bn, bk, group, warps, stages))
    return out


def device_time_us(fn: Callable[[], object], graph: bool) -> float:
    """µs per call: from a CUDA graph of `n` calls (device time), or eager (launch overhead
    included); `n` chosen so that one timed pass takes ~10 ms."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    n = max(3, min(100, int(10e3 / max(start.elapsed_time(end) * 1e3, 1.0))))
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                fn()
        run: Callable[[], object] = g.replay
    else:

        def run() -> None:
            for _ in range(n):
                fn()

    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n)
    return min(times)


def _short(cfg: Any) -> str:
    if not hasattr(cfg, "w13"):
        return str(tuple(cfg))
    return f"M{cfg.block_m} w13{tuple(cfg.w13)} w2{tuple(cfg.w2)}"


def _check(y: torch.Tensor, ref: torch.Tensor, name: str, cfg: Any, quiet: bool = False) -> bool:
    """A wrong result is reported, not timed (a few bf16 rounding steps allowed)."""
    err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
    if err > 3e-2 and not quiet:
        print(f"    WRONG RESULT {name} {_short(cfg)}: max error {err:.3g} of max |y|")
    return err <= 3e-2
