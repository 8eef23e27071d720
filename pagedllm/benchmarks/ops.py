"""The fused kernels against the eager torch ops they replace (GPU), at llama3-8b shapes.

    python -m pagedllm.benchmarks.ops

For each op and token count: the time per call replayed from a CUDA graph (device time only, as
in decode steps) and called eagerly (what a prompt step pays, launches included), torch ops vs
the fused Triton kernel, in bf16.
"""

from __future__ import annotations

import torch

from pagedllm.layers import fused_kernels
from pagedllm.layers.layernorm import RMSNorm
from pagedllm.layers.rotary import get_rope

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128
ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _per_call_us(fn, graph: bool, reps: int = 20, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        run = g.replay
    else:

        def run() -> None:
            for _ in range(reps):
                fn()

    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (iters * reps)


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    norm = RMSNorm(HIDDEN, 1e-5).to(dev, dt)
    rope = get_rope(HEAD_DIM, 8192, ROPE).to(dev)
    print(f"{'op':<28}{'tokens':>7}  {'torch graph':>12}{'fused graph':>12}  "
          f"{'torch eager':>12}{'fused eager':>12}   (µs per call)")  # fmt: skip
    for tokens in (1, 256, 4096):
        _bench(tokens, norm, rope)


def _bench(tokens: int, norm: RMSNorm, rope: torch.nn.Module) -> None:
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(tokens, HIDDEN, device=dev, dtype=dt)
    res = torch.randn_like(x)
    gate_up = torch.randn(tokens, 2 * INTER, device=dev, dtype=dt)
    qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, device=dev, dtype=dt)
    q, k, _ = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
    pos = torch.randint(0, 8192, (tokens,), device=dev)
    cases = {
        "rmsnorm + residual": (
            lambda: norm._norm(x + res),
            lambda: fused_kernels.fused_add_rms_norm(x, res, norm.weight, 1e-5),
        ),
        "silu_and_mul": (
            lambda: _silu_ref(gate_up),
            lambda: fused_kernels.silu_and_mul(gate_up),
        ),
        "rotary (q and k)": (
            lambda: _rotary_ref(rope, pos, q, k),
            lambda: fused_kernels.rotary_embedding_(
                pos, q, k, rope.cos_cache, rope.sin_cache, HEAD_DIM
            ),
        ),
    }
    for name, (ref, fused) in cases.items():
        times = [_per_call_us(f, g) for g in (True, False) for f in (ref, fused)]
        print(
            f"{name:<28}{tokens:>7}  {times[0]:>12.1f}{times[1]:>12.1f}  "
            f"{times[2]:>12.1f}{times[3]:>12.1f}"
        )


def _silu_ref(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :d]) * x[..., d:]


def _rotary_ref(rope, pos, q, k):
    cos = rope.cos_cache[pos].unsqueeze(-2)
    sin = rope.sin_cache[pos].unsqueeze(-2)
    return rope._rotate(q, cos, sin), rope._rotate(k, cos, sin)


if __name__ == "__main__":
    main()
