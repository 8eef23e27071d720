"""Mixtral (`MixtralForCausalLM`): Llama/Mistral attention, and a sparse mixture of experts in
place of the MLP: a router (`gate`, a linear to the experts' logits) sends each token to its
top-k experts (`num_experts_per_tok`, softmax weights renormalized over the chosen ones), each a
SwiGLU MLP; the layer's output is their weighted sum (`layers/fused_moe`).

Checkpoint names: `block_sparse_moe.gate.weight` and `block_sparse_moe.experts.{e}.w1/w2/w3`
(gate, down, up projections of expert e; HF's format, also what transformers 5 saves), or
transformers 5's packed `mlp.experts.gate_up_proj [E, 2 I, H]` / `mlp.experts.down_proj
[E, H, I]` with `mlp.gate.weight`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagedllm.layers.fused_moe import FusedMoE
from pagedllm.layers.linear import ReplicatedLinear
from pagedllm.models.llama import LlamaDecoderLayer, LlamaFlags, LlamaForCausalLM
from pagedllm.models.utils import ModelContext, linear_kwargs

_EXPERT = re.compile(
    r"\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w[123]|gate_proj|up_proj|down_proj)\.weight$"
)
# Each expert's checkpoint names (Mixtral's, then Qwen-MoE's) → FusedMoE's shard ids.
_SHARDS = {
    "w1": "w1",
    "w2": "w2",
    "w3": "w3",
    "gate_proj": "w1",
    "up_proj": "w3",
    "down_proj": "w2",
}
_PACKED = re.compile(r"\.(?:block_sparse_moe|mlp)\.experts\.(gate_up_proj|down_proj)$")
_GATE = re.compile(r"\.(?:block_sparse_moe|mlp)\.gate\.weight$")


class MixtralMoE(nn.Module):
    """The router and the experts of one layer (Mixtral's sizes by default)."""

    def __init__(
        self,
        ctx: ModelContext,
        num_experts: int | None = None,
        intermediate_size: int | None = None,
        renormalize: bool = True,
    ) -> None:
        super().__init__()
        cfg = ctx.hf_config
        num_experts = num_experts or cfg.num_local_experts
        self.gate = ReplicatedLinear(
            cfg.hidden_size, num_experts, bias=False, **linear_kwargs(ctx, "gate")
        )
        self.experts = FusedMoE(
            num_experts=num_experts,
            top_k=cfg.num_experts_per_tok,
            hidden_size=cfg.hidden_size,
            intermediate_size=intermediate_size or cfg.intermediate_size,
            renormalize=renormalize,
            prefix=ctx.child("experts").prefix,
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden_states, self.gate(hidden_states))


class MixtralDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose MLP is `MixtralMoE` (`self.mlp`, named `block_sparse_moe` in
    the checkpoint)."""

    def make_mlp(self, ctx: ModelContext, layer_idx: int, flags: LlamaFlags) -> nn.Module:
        return MixtralMoE(ctx)


class MixtralForCausalLM(LlamaForCausalLM):
    decoder_layer_cls = MixtralDecoderLayer

    @classmethod
    def arch_flags(cls, hf_config: Any) -> LlamaFlags:
        return LlamaFlags()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_moe_weights(self, weights, self.config.num_local_experts)


def load_moe_weights(
    model: LlamaForCausalLM, weights: Iterable[tuple[str, torch.Tensor]], num_experts: int
) -> set[str]:
    """The experts' and routers' tensors of a Llama-family MoE (each layer's `mlp` a
    `MixtralMoE`); the rest as the Llama family loads them."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    expert_parts: dict[str, set[tuple[int, str]]] = {}
    rest = []
    for name, tensor in weights:
        layer = name.split(".experts.")[0].rsplit(".", 1)[0] if ".experts." in name else ""
        if match := _EXPERT.search(name):
            expert, shard = int(match.group(1)), _SHARDS[match.group(2)]
            param_name = f"{layer}.mlp.experts.{'w2' if shard == 'w2' else 'w13'}_weight"
            param = params[param_name]
            param.weight_loader(param, tensor, shard, expert)  # type: ignore[attr-defined]
            parts = expert_parts.setdefault(param_name, set())
            parts.add((expert, shard))
            if len(parts) == (num_experts if shard == "w2" else 2 * num_experts):
                loaded.add(param_name)
        elif match := _PACKED.search(name):
            which = "w13" if match.group(1) == "gate_up_proj" else "w2"
            param_name = f"{layer}.mlp.experts.{which}_weight"
            param = params[param_name]
            param.weight_loader(param, tensor)  # type: ignore[attr-defined]
            loaded.add(param_name)
        elif _GATE.search(name):
            prefix = name[: _GATE.search(name).start()]  # type: ignore[union-attr]
            param_name = f"{prefix}.mlp.gate.weight"
            params[param_name].data.copy_(tensor.to(params[param_name].dtype))
            loaded.add(param_name)
        else:
            rest.append((name, tensor))
    return loaded | LlamaForCausalLM.load_weights(model, rest)
