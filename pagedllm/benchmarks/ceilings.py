"""The GPU's measured ceilings and the lower bounds on a workload's time they give.

Measured in the same run as the figure they judge (machines drift):
- copy bandwidth: a device-to-device copy of 1 GiB, bytes read + written per second;
- matmul rate: an 8192³ matmul in the model's dtype, FLOP/s.

The bound on a workload's time is the larger of two floors, each at its ceiling:
- compute: 2 × (parameters in matmuls, a MoE token's top-k experts only) FLOPs per token
  processed (prompt and output), plus attention's FLOPs per (token, context position) pair;
- memory: the weights read once per engine step (at least one step per output token of the
  longest request, all running requests of a step share that read, and a MoE step reads every
  expert that one of its tokens routes to: the expected count under uniform routing), plus each
  decode token reading its request's K/V context once (within a layer's sliding window).
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


@dataclass(frozen=True)
class ModelShape:
    """The matmul parameters of a model, split into those every step reads (`dense`: attention
    projections, dense MLPs, shared experts, routers, the LM head) and the routed experts
    (`expert` parameters each, `num_experts` per MoE layer, `top_k` of them per token); and the
    K/V bytes per token of each layer with its sliding window (None: full attention)."""

    dense: int
    expert: int
    moe_layers: int
    num_experts: int
    top_k: int
    kv_layers: tuple[tuple[int, int | None], ...]
    attn_flops_per_pair: int

    def active_params(self) -> int:
        """Parameters one token multiplies by: the dense ones and its top-k experts."""
        return self.dense + self.moe_layers * self.top_k * self.expert

    def params_read(self, batch: int) -> float:
        """Expected parameters one step of `batch` tokens reads: the dense ones and every expert
        that at least one token routes to (tokens routed uniformly at random)."""
        if not self.moe_layers:
            return float(self.dense)
        e, k = self.num_experts, self.top_k
        distinct = e * (1.0 - (1.0 - k / e) ** batch)
        return self.dense + self.moe_layers * distinct * self.expert


def _experts(cfg) -> tuple[int, int, int]:
    """(routed experts, experts per token, one expert's intermediate size); (0, 0, 0) if dense."""
    num = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    num = num or getattr(cfg, "n_routed_experts", None)
    if not num:
        return 0, 0, 0
    top_k = getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "experts_per_token", 1)
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    return int(num), int(top_k), int(inter)


def _is_moe_layer(cfg, i: int) -> bool:
    if i in (getattr(cfg, "mlp_only_layers", None) or []):  # Qwen2/3-MoE
        return False
    if getattr(cfg, "decoder_sparse_step", None):
        return (i + 1) % cfg.decoder_sparse_step == 0
    if i < (getattr(cfg, "first_k_dense_replace", None) or 0):  # DeepSeek
        return False
    return i % (getattr(cfg, "moe_layer_freq", None) or 1) == 0


def _window(cfg, i: int) -> int | None:
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return None
    types = getattr(cfg, "layer_types", None)
    if types:
        return window if types[i] == "sliding_attention" else None
    pattern = getattr(cfg, "sliding_window_pattern", None)
    if pattern:
        return window if (i + 1) % pattern else None
    return window


def model_shape(mc: ModelConfig) -> ModelShape:
    cfg = mc.hf_config
    h, heads, dsize = mc.hidden_size, mc.num_attention_heads, dtype_size(mc.dtype)
    if getattr(cfg, "kv_lora_rank", None):  # multi-head latent attention (DeepSeek V2/V3)
        rope, nope, v = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
        lora, q_lora = cfg.kv_lora_rank, getattr(cfg, "q_lora_rank", None)
        q_proj = (
            h * q_lora + q_lora * heads * (nope + rope) if q_lora else h * heads * (nope + rope)
        )
        attn = q_proj + h * (lora + rope) + lora * heads * (nope + v) + heads * v * h
        kv_bytes = (lora + rope) * dsize
        # NOTE: per (token, position) pair, scores over nope + rope and values over v, per head.
        flops_pair = 2 * heads * (nope + rope + v)
    else:
        q, kv = heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
        attn = h * (q + 2 * kv) + q * h
        kv_bytes = 2 * kv * dsize
        flops_pair = 4 * mc.head_dim * heads
    num_experts, top_k, moe_inter = _experts(cfg)
    shared = getattr(cfg, "shared_expert_intermediate_size", None) or 0
    shared += (getattr(cfg, "n_shared_experts", None) or 0) * moe_inter
    dense = h * mc.vocab_size
    moe_layers = 0
    for i in range(mc.num_layers):
        dense += attn
        if num_experts and _is_moe_layer(cfg, i):
            moe_layers += 1
            dense += 3 * h * shared + h * num_experts  # shared experts and the router
        else:
            dense += 3 * h * cfg.intermediate_size
    return ModelShape(
        dense=dense,
        expert=3 * h * moe_inter,
        moe_layers=moe_layers,
        num_experts=num_experts,
        top_k=top_k,
        kv_layers=tuple((kv_bytes, _window(cfg, i)) for i in range(mc.num_layers)),
        attn_flops_per_pair=flops_pair * mc.num_layers,
    )


def weight_bytes(mc: ModelConfig, batch: int = 1) -> float:
    """Bytes of the weights that one step of `batch` tokens reads: layers (the experts the
    tokens route to), final norm and the LM head. A quantized checkpoint's layers take its
    method's bytes per parameter (`weight_bytes_per_param`); the LM head stays unquantized."""
    from pagedllm.layers.quantization.base import quantization_config_from_hf

    size = dtype_size(mc.dtype)
    params = model_shape(mc).params_read(batch)
    quant = quantization_config_from_hf(mc.hf_config, getattr(mc, "quantization", None))
    if quant is None:
        return params * size
    head = mc.hidden_size * mc.vocab_size
    return (params - head) * quant.weight_bytes_per_param(size) + head * size


def _positions_read(first: int, count: int, window: int | None) -> int:
    """Sum over the contexts first, first + 1, …, first + count - 1 of the positions read:
    the context itself, or the window where it is smaller."""
    full = count if window is None else max(0, min(count, window - first))
    return full * first + full * (full - 1) // 2 + (count - full) * (window or 0)


def lower_bound_s(mc: ModelConfig, requests: list[BenchRequest], ceilings: Ceilings) -> float:
    """The least time the requests can take on a device with these ceilings (see the module)."""
    shape = model_shape(mc)
    tokens = pairs = kv_bytes = 0
    for r in requests:
        p, o = len(r.prompt_token_ids), r.output_len
        tokens += p + o
        # Position i attends to i + 1 positions: sum over all p + o positions.
        pairs += (p + o) * (p + o + 1) // 2
        # Decode token j (0-based) reads the p + j positions before it (within the windows).
        kv_bytes += sum(b * _positions_read(p, o, w) for b, w in shape.kv_layers)
    flops = 2 * shape.active_params() * tokens + shape.attn_flops_per_pair * pairs
    # Step j runs every request whose output is longer than j: all at once is the fewest reads.
    lengths = sorted((r.output_len for r in requests), reverse=True)
    weights, running = 0.0, len(lengths)
    for j in range(lengths[0]):
        while lengths[running - 1] <= j:
            running -= 1
        weights += shape.params_read(running)
    bytes_moved = weights * dtype_size(mc.dtype) + kv_bytes
    return max(flops / ceilings.matmul_flop_per_s, bytes_moved / ceilings.copy_bytes_per_s)
