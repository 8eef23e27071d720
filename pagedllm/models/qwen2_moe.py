"""Qwen2-MoE (`Qwen2MoeForCausalLM`, e.g. Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention
(q/k/v biases: `qkv_bias`) and, in the sparse layers, a mixture of experts plus a *shared
expert*: a router over `num_experts` SwiGLU experts of `moe_intermediate_size`,
`num_experts_per_tok` per token (weights renormalized when `norm_topk_prob`), and beside them
one SwiGLU MLP of `shared_expert_intermediate_size` that every token goes through, scaled by
`sigmoid(shared_expert_gate(x))` (a linear to one logit). Layers listed in `mlp_only_layers`,
or off the `decoder_sparse_step` rhythm, keep a dense MLP of `intermediate_size`.

`GatedMLP` (a SwiGLU MLP of any intermediate size) is also DeepSeek's shared experts.

Checkpoint names: `mlp.gate.weight`, `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`,
`mlp.shared_expert.gate_proj/up_proj/down_proj.weight`, `mlp.shared_expert_gate.weight`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagedllm.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from pagedllm.models.llama import LlamaDecoderLayer, LlamaFlags, LlamaForCausalLM
from pagedllm.models.mixtral import MixtralMoE, load_moe_weights
from pagedllm.models.qwen3_moe import is_sparse_layer
from pagedllm.models.utils import ModelContext, linear_kwargs


class GatedMLP(nn.Module):
    """`down(silu(gate(x)) * up(x))` of a given intermediate size (`gate_up_proj` fused, as in
    `LlamaMLP`, which always takes the config's `intermediate_size`)."""

    def __init__(self, ctx: ModelContext, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        cfg = ctx.hf_config
        hidden_act = getattr(cfg, "hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {hidden_act!r}; only 'silu' is supported")
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [intermediate_size] * 2, bias, **linear_kwargs(ctx, "gate_up_proj")
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, cfg.hidden_size, bias, **linear_kwargs(ctx, "down_proj")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward_silu_mul(self.gate_up_proj(x))


class Qwen2MoeSparseMoeBlock(MixtralMoE):
    """The router and routed experts (`MixtralMoE`'s `gate` and `experts`), plus the gated
    shared expert."""

    def __init__(self, ctx: ModelContext) -> None:
        cfg = ctx.hf_config
        super().__init__(
            ctx,
            num_experts=cfg.num_experts,
            intermediate_size=cfg.moe_intermediate_size,
            renormalize=bool(getattr(cfg, "norm_topk_prob", False)),
        )
        self.shared_expert = GatedMLP(
            ctx.child("shared_expert"), cfg.shared_expert_intermediate_size
        )
        self.shared_expert_gate = ReplicatedLinear(
            cfg.hidden_size, 1, bias=False, **linear_kwargs(ctx, "shared_expert_gate")
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        routed = super().forward(hidden_states)
        gate = torch.sigmoid(self.shared_expert_gate(hidden_states))
        return routed + gate * self.shared_expert(hidden_states)


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, ctx: ModelContext, layer_idx: int, flags: LlamaFlags) -> nn.Module:
        if is_sparse_layer(ctx.hf_config, layer_idx):
            return Qwen2MoeSparseMoeBlock(ctx)
        return super().make_mlp(ctx, layer_idx, flags)


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    decoder_layer_cls = Qwen2MoeDecoderLayer

    @classmethod
    def arch_flags(cls, hf_config: Any) -> LlamaFlags:
        return LlamaFlags(qkv_bias=bool(getattr(hf_config, "qkv_bias", True)), o_bias=False)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_moe_weights(self, weights, self.config.num_experts)
