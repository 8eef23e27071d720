"""The GPU's measured ceilings and the lower bounds on a workload's time they give.

Measured in the same run as the figure they judge (machines drift):
- copy bandwidth: a device-to-device copy of 1 GiB, bytes read + written per second;
- matmul rate: an 8192³ matmul in the model's dtype, FLOP/s.

The bound on a workload's time is the larger of two floors, each at its ceiling:
- compute: 2 × (parameters in matmuls) FLOPs per token processed (prompt and output), plus
  attention's 4 × head_dim × heads FLOPs per (token, context position) pair, per layer;
- memory: the weights read once per engine step (at least one step per output token of the
  longest request, and all requests of a step share that read), plus each decode token reading
  its request's whole K/V context once.
The "lower bound" throughput is the workload's output tokens over that time: no engine can beat
it on this device, so the fraction reached measures the engine, not the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.benchmarks.workloads import BenchRequest
from pagedllm.config import ModelConfig, dtype_size


@dataclass
class Ceilings:
    copy_bytes_per_s: float
    matmul_flop_per_s: float

    def line(self) -> str:
        return (
            f"ceilings: copy {self.copy_bytes_per_s / 1e12:.2f} TB/s (read + write), "
            f"{self.matmul_flop_per_s / 1e12:.0f} TFLOP/s matmul"
        )


def _time_cuda(fn, iters: int) -> float:
    """Seconds per call of `fn`, by CUDA events, after a warm-up."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def measure_ceilings(dtype: torch.dtype = torch.bfloat16, device: str = "cuda") -> Ceilings:
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = _time_cuda(lambda: dst.copy_(src), 20)
    n = 8192
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    mm_s = _time_cuda(lambda: a @ b, 20)
    return Ceilings(copy_bytes_per_s=2 * (1 << 30) / copy_s, matmul_flop_per_s=2 * n**3 / mm_s)


def weight_bytes(mc: ModelConfig) -> int:
    """Bytes of the weights that every step reads: layers, final norm and the LM head."""
    return matmul_params(mc) * dtype_size(mc.dtype)


def matmul_params(mc: ModelConfig) -> int:
    """Parameters of the per-token matmuls (projections, MLP, LM head; not the embedding)."""
    cfg = mc.hf_config
    h, q, kv = mc.hidden_size, mc.num_attention_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size
    return mc.num_layers * per_layer + h * mc.vocab_size


def lower_bound_s(mc: ModelConfig, requests: list[BenchRequest], ceilings: Ceilings) -> float:
    """The least time the requests can take on a device with these ceilings (see the module)."""
    params = matmul_params(mc)
    attn_flops_per_pair = 4 * mc.head_dim * mc.num_attention_heads * mc.num_layers
    tokens = pairs = kv_reads = 0
    for r in requests:
        p, o = len(r.prompt_token_ids), r.output_len
        tokens += p + o
        # Position i attends to i + 1 positions: sum over all p + o positions.
        pairs += (p + o) * (p + o + 1) // 2
        # Decode token j (0-based) reads the p + j positions before it.
        kv_reads += o * p + o * (o - 1) // 2
    flops = 2 * params * tokens + attn_flops_per_pair * pairs
    steps = max(r.output_len for r in requests)
    bytes_moved = weight_bytes(mc) * steps + kv_reads * mc.kv_bytes_per_token()
    return max(flops / ceilings.matmul_flop_per_s, bytes_moved / ceilings.copy_bytes_per_s)
