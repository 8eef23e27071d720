"""The fused kernels against the ops they replace (GPU), at llama3-8b (and qwen3-0.6b) shapes.

    python -m pagedllm.benchmarks.ops

For each op and token count: the time per call replayed from a CUDA graph (device time only, as
in decode steps) and called eagerly (what a prompt step pays, launches included), in bf16.
First the elementwise kernels against eager torch ops; then the attention prologue
(`rope_norm_and_cache_`, one launch) against the sequence it replaces, the separate kernels
(q/k `rms_norm` for Qwen3, `rotary_embedding_`, the Triton backend's `reshape_and_cache`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pagedllm.attention.triton.kernels import reshape_and_cache
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


def rotating_call_us(device: str, call, inputs: list[torch.Tensor]) -> float:  # type: ignore[no-untyped-def]
    """µs per `call(x)`, cycling through `inputs` (so that they come from memory, not L2): from a
    CUDA graph on the GPU; on the CPU (Triton's interpreter) one timed call, a smoke test."""
    if device == "cpu":
        t0 = time.perf_counter()
        call(inputs[0])
        return (time.perf_counter() - t0) * 1e6
    i = 0

    def step() -> None:
        nonlocal i
        call(inputs[i % len(inputs)])
        i += 1

    return _per_call_us(step, graph=True, reps=max(10, len(inputs)), iters=5)


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    norm = RMSNorm(HIDDEN, 1e-5).to(dev, dt)
    rope = get_rope(HEAD_DIM, 8192, ROPE).to(dev)
    print(f"{'op':<28}{'tokens':>7}  {'torch graph':>12}{'fused graph':>12}  "
          f"{'torch eager':>12}{'fused eager':>12}   (µs per call)")  # fmt: skip
    for tokens in (1, 256, 4096):
        _bench(tokens, norm, rope)
    print(f"\n{'attention prologue':<28}{'tokens':>7}  {'split graph':>12}{'fused graph':>12}  "
          f"{'split eager':>12}{'fused eager':>12}   (µs per call)")  # fmt: skip
    for shape in PROLOGUE_SHAPES:
        for tokens in (1, 256):
            _bench_prologue(shape, tokens)


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


@dataclass(frozen=True)
class PrologueShape:
    """One layer's attention prologue: heads, KV heads, head dim, rope, per-head q/k norm."""

    name: str
    heads: int
    kv_heads: int
    head_dim: int
    rope: dict
    qk_norm: bool


PROLOGUE_SHAPES = [
    PrologueShape("llama3-8b", HEADS, KV_HEADS, HEAD_DIM, ROPE, False),
    PrologueShape(
        "qwen3-0.6b", 16, 8, 128, {"rope_type": "default", "rope_theta": 1000000.0}, True
    ),
]


def _bench_prologue(
    shape: PrologueShape, tokens: int, block_size: int = 16, dev: str = "cuda"
) -> None:
    """The fused prologue vs the separate kernels, on views of one qkv projection output."""
    dt = torch.bfloat16
    d = shape.head_dim
    q_size, kv_size = shape.heads * d, shape.kv_heads * d
    rope = get_rope(d, 8192, shape.rope).to(dev)
    qkv = torch.randn(tokens, q_size + 2 * kv_size, device=dev, dtype=dt)
    q, k, v = qkv.split([q_size, kv_size, kv_size], -1)
    pos = torch.randint(0, 8192, (tokens,), device=dev)
    num_blocks = max(64, 4 * tokens // block_size)
    kv_cache = torch.zeros(2, num_blocks, block_size, shape.kv_heads, d, device=dev, dtype=dt)
    slots = torch.randperm(num_blocks * block_size, device=dev)[:tokens]
    w_q = torch.ones(d, device=dev, dtype=dt) if shape.qk_norm else None
    w_k = torch.ones(d, device=dev, dtype=dt) if shape.qk_norm else None

    def split() -> None:
        qq, kk = q, k
        if w_q is not None and w_k is not None:
            qq = fused_kernels.rms_norm(q.view(tokens, -1, d), w_q, 1e-6).view(tokens, q_size)
            kk = fused_kernels.rms_norm(k.view(tokens, -1, d), w_k, 1e-6).view(tokens, kv_size)
        fused_kernels.rotary_embedding_(pos, qq, kk, rope.cos_cache, rope.sin_cache, d)
        heads = (tokens, shape.kv_heads, d)
        reshape_and_cache(kk.view(heads), v.view(heads), kv_cache, slots, tokens)

    def fused() -> None:
        fused_kernels.rope_norm_and_cache_(
            pos, q, k, v, rope.cos_cache, rope.sin_cache, kv_cache, slots, tokens,
            q_norm_weight=w_q, k_norm_weight=w_k, eps=1e-6,
        )  # fmt: skip

    times = [_per_call_us(f, g) for g in (True, False) for f in (split, fused)]
    name = f"{shape.name}{' (+q/k norm)' if shape.qk_norm else ''}"
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
