"""Qwen3-MoE (`Qwen3MoeForCausalLM`, e.g. Qwen3-30B-A3B): Qwen3's attention (per-head q/k
RMSNorm before RoPE) and, in the sparse layers, a mixture of experts in place of the MLP: a
router over `num_experts` SwiGLU experts of `moe_intermediate_size`, `num_experts_per_tok` per
token, the weights renormalized over the chosen ones when `norm_topk_prob`. Layers listed in
`mlp_only_layers`, or off the `decoder_sparse_step` rhythm, keep a dense MLP.

Checkpoint names: `mlp.gate.weight` and `mlp.experts.{e}.gate_proj/up_proj/down_proj.weight`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagedllm.models.llama import LlamaDecoderLayer, LlamaFlags, Qwen3ForCausalLM
from pagedllm.models.mixtral import MixtralMoE, load_moe_weights
from pagedllm.models.utils import ModelContext


def is_sparse_layer(hf_config: Any, layer_idx: int) -> bool:
    """Whether layer `layer_idx` has experts (transformers' rule)."""
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    return (
        layer_idx not in (getattr(hf_config, "mlp_only_layers", None) or [])
        and hf_config.num_experts > 0
        and (layer_idx + 1) % step == 0
    )


class Qwen3MoeDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, ctx: ModelContext, layer_idx: int, flags: LlamaFlags) -> nn.Module:
        cfg = ctx.hf_config
        if not is_sparse_layer(cfg, layer_idx):
            return super().make_mlp(ctx, layer_idx, flags)
        return MixtralMoE(
            ctx,
            num_experts=cfg.num_experts,
            intermediate_size=cfg.moe_intermediate_size,
            renormalize=bool(getattr(cfg, "norm_topk_prob", True)),
        )


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    decoder_layer_cls = Qwen3MoeDecoderLayer

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_moe_weights(self, weights, self.config.num_experts)
