"""gpt-oss (`GptOssForCausalLM`, OpenAI's gpt-oss-20b / -120b): a Llama-shaped decoder with

- attention with q/k/v and o biases, GQA, an explicit `head_dim`, and *sinks*: one learned
  logit per head (`self_attn.sinks [num_heads]`) in the softmax denominator, carrying no value;
- layers alternating `sliding_attention` (window `sliding_window`) and `full_attention`, as
  `config.layer_types` lists them;
- YaRN rope (`rope_type` "yarn", `truncate` False; the rotate-half form, as HF's
  `_apply_rotary_emb` on the two halves), RMSNorm, an untied lm_head;
- a mixture of experts in every layer: a router with a bias (`mlp.router`, the top-k logits
  then a softmax over those k) and experts with biases and gpt-oss's clamped SwiGLU
  (`FusedMoE(bias=True, activation="swigluoai", routing="topk_softmax")`).

Checkpoint names (transformers' bf16/fp32 layout): `mlp.router.weight/bias`,
`mlp.experts.gate_up_proj [E, H, 2 I]` (`x @ W`, gate and up interleaved in the columns),
`gate_up_proj_bias [E, 2 I]`, `down_proj [E, I, H]`, `down_proj_bias [E, H]`; the experts'
loader transposes them and de-interleaves gate/up into `FusedMoE`'s halves. NOTE: OpenAI's
published checkpoints hold the experts in MXFP4 (`*_blocks` / `*_scales`), not supported here:
such a checkpoint is refused with that message.

NOTE: HF's `GptOssRMSNorm` multiplies by the weight before rounding to the activation dtype,
where `RMSNorm` rounds first: the same in float32, one rounding apart in bf16.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagedllm.attention.layer import Attention
from pagedllm.distributed import get_tp_rank
from pagedllm.layers.fused_moe import FusedMoE
from pagedllm.layers.linear import QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.models.llama import (
    LlamaDecoderLayer,
    LlamaFlags,
    LlamaForCausalLM,
    layer_sliding_window,
)
from pagedllm.models.utils import ModelContext, linear_kwargs

# A packed expert tensor → (FusedMoE parameter, transposed, interleaved).
_EXPERT_TENSORS = {
    "gate_up_proj": ("w13_weight", True, True),
    "gate_up_proj_bias": ("w13_bias", False, True),
    "down_proj": ("w2_weight", True, False),
    "down_proj_bias": ("w2_bias", False, False),
}
_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)(_bias)?$")
_MXFP4 = re.compile(r"\.mlp\.experts\..*_(blocks|scales)$")


class GptOssAttention(nn.Module):
    """q/k/v/o with biases, the rotation (YaRN), the layer's window and the sinks."""

    def __init__(
        self,
        ctx: ModelContext,
        layer_idx: int,
        head_dim: int,
        rotary_emb: RotaryEmbedding,
        flags: LlamaFlags,
    ) -> None:
        super().__init__()
        cfg = ctx.hf_config
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, head_dim, cfg.num_attention_heads, cfg.num_key_value_heads,
            bias=flags.qkv_bias, **linear_kwargs(ctx, "qkv_proj"),
        )  # fmt: skip
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * head_dim, cfg.hidden_size, bias=flags.o_bias,
            **linear_kwargs(ctx, "o_proj"),
        )  # fmt: skip
        num_heads = self.qkv_proj.num_heads  # this rank's query heads
        # NOTE: fp32 whatever the model dtype: one logit per head, added to fp32 scores.
        self.sinks = nn.Parameter(torch.empty(num_heads, dtype=torch.float32), requires_grad=False)
        self.sinks.weight_loader = self._load_sinks  # type: ignore[attr-defined]
        self.rotary_emb = rotary_emb
        self.attn = Attention(
            num_heads,
            head_dim,
            head_dim**-0.5,
            self.qkv_proj.num_kv_heads,
            ctx.attn_backend,
            rotary_emb=rotary_emb,
            sliding_window=layer_sliding_window(cfg, layer_idx),
            sinks=self.sinks,
            use_fused=ctx.kernel_config.fused_ops,
            prefix=ctx.child("attn").prefix,
        )

    def _load_sinks(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        """This rank's heads of the checkpoint's `[total_num_heads]` sinks, copied in place
        (the attention impl holds the parameter by reference)."""
        num_heads = param.shape[0]
        shard = loaded_weight.narrow(0, get_tp_rank() * num_heads, num_heads)
        param.data.copy_(shard.to(param.dtype))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], -1)
        return self.o_proj(self.attn(q, k, v, positions))


class GptOssMoE(nn.Module):
    """The router (a linear with a bias) and the experts of one layer."""

    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        cfg = ctx.hf_config
        self.router = ReplicatedLinear(
            cfg.hidden_size, cfg.num_local_experts, bias=True, **linear_kwargs(ctx, "router")
        )
        self.experts = FusedMoE(
            num_experts=cfg.num_local_experts,
            top_k=cfg.num_experts_per_tok,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            prefix=ctx.child("experts").prefix,
            bias=True,
            activation="swigluoai",
            # NOTE: configs of transformers < 5 have no `swiglu_alpha` (it was a constant).
            swiglu_alpha=float(getattr(cfg, "swiglu_alpha", 1.702)),
            swiglu_limit=float(cfg.swiglu_limit),
            routing="topk_softmax",
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden_states, self.router(hidden_states))


class GptOssDecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm layer with gpt-oss's attention (sinks, its window) and MoE."""

    def make_attention(
        self, ctx: ModelContext, layer_idx: int, head_dim: int, rotary_emb: RotaryEmbedding,
        flags: LlamaFlags,
    ) -> nn.Module:  # fmt: skip
        return GptOssAttention(ctx, layer_idx, head_dim, rotary_emb, flags)

    def make_mlp(self, ctx: ModelContext, layer_idx: int, flags: LlamaFlags) -> nn.Module:
        return GptOssMoE(ctx)


class GptOssForCausalLM(LlamaForCausalLM):
    """Llama's model (embedding, rope, layers, norm, lm_head) with gpt-oss's decoder layer."""

    decoder_layer_cls = GptOssDecoderLayer

    @classmethod
    def arch_flags(cls, hf_config: Any) -> LlamaFlags:
        bias = bool(getattr(hf_config, "attention_bias", True))
        return LlamaFlags(qkv_bias=bias, o_bias=bias)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The packed experts through `FusedMoE.weight_loader` (transposed, gate/up
        de-interleaved); the rest (router, sinks included) as the Llama family loads them."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        rest = []
        for name, tensor in weights:
            if _MXFP4.search(name):
                raise NotImplementedError(
                    f"checkpoint tensor {name!r}: MXFP4-quantized experts are not supported; "
                    "use a checkpoint with bf16 (dequantized) experts"
                )
            if match := _EXPERTS.match(name):
                which = match.group(2) + (match.group(3) or "")
                param_name, transposed, interleaved = _EXPERT_TENSORS[which]
                param_name = f"{match.group(1)}.{param_name}"
                param = params[param_name]
                param.weight_loader(  # type: ignore[attr-defined]
                    param, tensor, transposed=transposed, interleaved=interleaved
                )
                loaded.add(param_name)
            else:
                rest.append((name, tensor))
        return loaded | super().load_weights(rest)
