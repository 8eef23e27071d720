"""OLMo 2 (`Olmo2ForCausalLM`): the Llama decoder with its norms moved.

What differs from Llama:
- no input layernorm: attention and the MLP read the residual stream as it is;
- `post_attention_layernorm` and `post_feedforward_layernorm` normalize the attention and MLP
  outputs before they are added to the residual stream;
- q and k are RMSNorm-ed over the whole projection (all heads together: weights of
  `num_heads * head_dim` and `num_kv_heads * head_dim`), not per head as in Qwen3, before RoPE.
  Tensor parallelism splits them by heads, so the mean square is summed over the ranks.
- `attention_bias` applies to q/k/v and o, as in Llama; the MLP has no bias.

NOTE: HF's `Olmo2RMSNorm` multiplies by the weight before rounding to the activation dtype,
where `RMSNorm` (Llama's order) rounds first: the same in float32, one rounding apart in bf16.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.distributed import get_tp_rank, get_tp_size, tensor_model_parallel_all_reduce
from pagedllm.layers.layernorm import RMSNorm
from pagedllm.layers.linear import QKVParallelLinear, default_weight_loader
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.models.llama import LlamaAttention, LlamaFlags, LlamaForCausalLM, LlamaMLP
from pagedllm.models.utils import ModelContext


class ProjectionRMSNorm(RMSNorm):
    """RMSNorm over a whole q or k projection (`part` "q" or "k" of `qkv_proj`), whose heads
    tensor parallelism splits: each rank keeps its heads' slice of the weight, and the sum of
    squares is all-reduced. A K head replicated on several ranks counts once per replica in
    both the sum and the element count, so the mean is unchanged."""

    def __init__(
        self, qkv_proj: QKVParallelLinear, part: str, eps: float, use_fused: bool | None
    ) -> None:
        if part not in ("q", "k"):
            raise ValueError(f"part must be 'q' or 'k', got {part!r}")
        size = qkv_proj.q_size if part == "q" else qkv_proj.kv_size
        super().__init__(size, eps, use_fused)
        self.tp_size = get_tp_size()
        replicas = 1 if part == "q" else qkv_proj.num_kv_head_replicas
        self.shard_index = get_tp_rank() // replicas
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        """Copies this rank's heads' slice of the whole projection's norm weight."""
        size = self.hidden_size
        default_weight_loader(param, loaded_weight.narrow(0, self.shard_index * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.tp_size == 1:
            return super().forward(x)
        x32 = x.float()
        square_sum = tensor_model_parallel_all_reduce(x32.pow(2).sum(-1, keepdim=True))
        x32 = x32 * torch.rsqrt(square_sum / (self.hidden_size * self.tp_size) + self.eps)
        return self.weight * x32.to(x.dtype)


class Olmo2Attention(LlamaAttention):
    """Llama's attention with q and k normalized over the whole projection before RoPE."""

    def __init__(
        self,
        ctx: ModelContext,
        layer_idx: int,
        head_dim: int,
        rotary_emb: RotaryEmbedding,
        flags: LlamaFlags,
    ) -> None:
        super().__init__(ctx, layer_idx, head_dim, rotary_emb, flags)
        eps, fused_ops = ctx.hf_config.rms_norm_eps, ctx.kernel_config.fused_ops
        # NOTE: not handed to `Attention`, whose q/k norms are per head.
        self.q_norm = ProjectionRMSNorm(self.qkv_proj, "q", eps, fused_ops)
        self.k_norm = ProjectionRMSNorm(self.qkv_proj, "k", eps, fused_ops)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], -1)
        return self.o_proj(self.attn(self.q_norm(q), self.k_norm(k), v, positions))


class Olmo2DecoderLayer(nn.Module):
    """`h + post_attention_layernorm(attn(h))`, then `h + post_feedforward_layernorm(mlp(h))`."""

    def __init__(
        self, ctx: ModelContext, layer_idx: int, head_dim: int, rotary_emb: RotaryEmbedding,
        flags: LlamaFlags,
    ) -> None:  # fmt: skip
        super().__init__()
        cfg, fused_ops = ctx.hf_config, ctx.kernel_config.fused_ops
        self.self_attn = Olmo2Attention(
            ctx.child("self_attn"), layer_idx, head_dim, rotary_emb, flags
        )
        self.mlp = LlamaMLP(ctx.child("mlp"), flags.mlp_bias)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, use_fused=fused_ops
        )
        self.post_feedforward_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, use_fused=fused_ops
        )

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(normalized mlp output, residual stream before it)`, as `LlamaDecoderLayer` returns:
        their sum is the layer output, and this layer's input is the sum of the two it got."""
        if residual is not None:
            hidden_states = hidden_states + residual
        attn_out = self.post_attention_layernorm(self.self_attn(positions, hidden_states))
        hidden_states = hidden_states + attn_out
        return self.post_feedforward_layernorm(self.mlp(hidden_states)), hidden_states


class Olmo2ForCausalLM(LlamaForCausalLM):
    """Llama's model with OLMo 2's decoder layer; the flags are Llama's (`attention_bias`)."""

    decoder_layer_cls = Olmo2DecoderLayer
