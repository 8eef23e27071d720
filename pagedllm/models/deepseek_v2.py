"""DeepSeek V2 / V3 (`DeepseekV2ForCausalLM`, `DeepseekV3ForCausalLM`; also V2-Lite, V2.5, R1,
Kimi-K2-style checkpoints of the same architectures): multi-head latent attention and a
mixture of experts with shared experts.

Attention (`DeepseekV2Attention`, MLA: see `attention/mla.py`): queries from `q_proj`, or with
`q_lora_rank` from `q_a_proj` → `q_a_layernorm` → `q_b_proj`, each head `qk_nope_head_dim +
qk_rope_head_dim` wide; `kv_a_proj_with_mqa` gives the latent `c_kv [kv_lora_rank]` (then
`kv_a_layernorm`) and one rotated key part `k_pe [qk_rope_head_dim]` shared by the heads;
`kv_b_proj` holds each head's W_UK / W_UV, which the attention absorbs. Only c_kv and k_pe are
cached. RoPE rotates the `qk_rope_head_dim` dimensions in interleaved pairs (V2 always; V3 when
`rope_interleave`, its default). The softmax scale is `qk_head_dim ** -0.5`, times
`yarn_mscale(factor, mscale_all_dim) ** 2` under a rope scaling with `mscale_all_dim`.

MLP: layers from `first_k_dense_replace` on (every `moe_layer_freq`-th) are `DeepseekV2MoE`:
`n_routed_experts` SwiGLU experts of `moe_intermediate_size`, routed as HF transformers routes
(`GroupedTopK`: V2 softmax scores, "greedy" or "group_limited_greedy" top-k over `n_group`
groups, never renormalized; V3 sigmoid scores with `e_score_correction_bias` for the choice,
top-2-sum group scores, `norm_topk_prob`; both times `routed_scaling_factor`), plus
`n_shared_experts` shared experts as one SwiGLU MLP of `moe_intermediate_size *
n_shared_experts`. The others are dense MLPs of `intermediate_size`.

Checkpoint names are HF's (`self_attn.{q_proj, q_a_proj, q_a_layernorm, q_b_proj,
kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}`, `mlp.gate.weight`,
`mlp.gate.e_score_correction_bias`, `mlp.experts.{e}.{gate,up,down}_proj.weight` or the packed
`mlp.experts.{gate_up_proj, down_proj}`, `mlp.shared_experts.*`); layers past
`num_hidden_layers` (V3's multi-token-prediction layer) are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.attention.mla import MLAAttention
from pagedllm.distributed import get_tp_size
from pagedllm.layers.fused_moe import FusedMoE
from pagedllm.layers.fused_moe.router import GroupedTopK, select_experts
from pagedllm.layers.layernorm import RMSNorm
from pagedllm.layers.linear import (
    ColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    default_weight_loader,
    divide,
)
from pagedllm.layers.rotary import RotaryEmbedding, get_rope_parameters, yarn_mscale
from pagedllm.models.llama import LlamaDecoderLayer, LlamaFlags, LlamaForCausalLM
from pagedllm.models.qwen2_moe import GatedMLP
from pagedllm.models.utils import ModelContext, linear_kwargs

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_PACKED = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")
_GATE_UP = re.compile(r"\.(gate_proj|up_proj)\.weight$")
_EXPERT_SHARDS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def is_moe_layer(hf_config: Any, layer_idx: int) -> bool:
    """DeepSeek's rule: experts from `first_k_dense_replace` on, every `moe_layer_freq`-th."""
    freq = getattr(hf_config, "moe_layer_freq", 1) or 1
    return (
        bool(getattr(hf_config, "n_routed_experts", None))
        and layer_idx >= (getattr(hf_config, "first_k_dense_replace", 0) or 0)
        and layer_idx % freq == 0
    )


def routing_of(hf_config: Any, version: int) -> tuple[GroupedTopK, bool]:
    """The routing of a V2 or V3 config (`version`), and whether it renormalizes."""
    scaling = float(getattr(hf_config, "routed_scaling_factor", 1.0) or 1.0)
    if version == 3:
        groups = hf_config.n_group or 1
        grouped = GroupedTopK(
            scoring="sigmoid",
            num_groups=groups,
            topk_groups=hf_config.topk_group or groups,
            group_score="top2_sum",
            scaling_factor=scaling,
        )
        return grouped, bool(hf_config.norm_topk_prob)
    method = getattr(hf_config, "topk_method", "greedy") or "greedy"
    if method == "greedy":
        return GroupedTopK(scoring="softmax", scaling_factor=scaling), False
    if method == "group_limited_greedy":
        grouped = GroupedTopK(
            scoring="softmax",
            num_groups=hf_config.n_group,
            topk_groups=hf_config.topk_group,
            group_score="max",
            scaling_factor=scaling,
        )
        # NOTE: HF's DeepseekV2TopkRouter ignores `norm_topk_prob` (False in V2 checkpoints).
        return grouped, False
    raise ValueError(
        f"DeepSeek-V2 topk_method {method!r} unsupported; 'greedy' or 'group_limited_greedy'"
    )


def mla_softmax_scale(hf_config: Any) -> float:
    """`qk_head_dim ** -0.5`, times `mscale(factor, mscale_all_dim) ** 2` under a rope scaling
    (HF's `yarn_apply_mscale`)."""
    scale = float((hf_config.qk_nope_head_dim + hf_config.qk_rope_head_dim) ** -0.5)
    params = get_rope_parameters(hf_config)
    mscale_all_dim = params.get("mscale_all_dim")
    if params["rope_type"] != "default" and mscale_all_dim:
        scale *= yarn_mscale(float(params["factor"]), float(mscale_all_dim)) ** 2
    return scale


class DeepseekRouter(nn.Module):
    """The router's fp32 weight (HF keeps it fp32 in every dtype) and V3's per-expert
    `e_score_correction_bias`: `forward(x) -> fp32 logits`."""

    def __init__(self, hidden_size: int, num_experts: int, correction_bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, dtype=torch.float32), requires_grad=False
        )
        self.e_score_correction_bias = (
            nn.Parameter(torch.empty(num_experts, dtype=torch.float32), requires_grad=False)
            if correction_bias
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states.float(), self.weight)


class GroupedTopKMoE(FusedMoE):
    """`FusedMoE` routed by `GroupedTopK` (its `route` hook), with the router's correction bias
    held by reference."""

    def __init__(
        self,
        *args: Any,
        grouped: GroupedTopK,
        router: DeepseekRouter,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.grouped = grouped
        # NOTE: a tuple, so nn.Module does not register the router a second time.
        self._router: tuple[DeepseekRouter] = (router,)

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bias = self._router[0].e_score_correction_bias
        return select_experts(router_logits, self.top_k, self.renormalize, self.grouped, bias)


class DeepseekV2MoE(nn.Module):
    """The router, the routed experts and the shared experts of one layer."""

    def __init__(self, ctx: ModelContext, version: int) -> None:
        super().__init__()
        cfg = ctx.hf_config
        grouped, renormalize = routing_of(cfg, version)
        self.gate = DeepseekRouter(cfg.hidden_size, cfg.n_routed_experts, version == 3)
        self.experts = GroupedTopKMoE(
            cfg.n_routed_experts,
            cfg.num_experts_per_tok,
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            renormalize,
            prefix=ctx.child("experts").prefix,
            grouped=grouped,
            router=self.gate,
        )
        shared = getattr(cfg, "n_shared_experts", 0) or 0
        self.shared_experts = (
            GatedMLP(ctx.child("shared_experts"), cfg.moe_intermediate_size * shared)
            if shared
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = self.experts(hidden_states, self.gate(hidden_states))
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out


class DeepseekV2Attention(nn.Module):
    """MLA's projections around `MLAAttention` (see the module docstring)."""

    def __init__(
        self, ctx: ModelContext, rotary_emb: RotaryEmbedding, rope_interleaved: bool
    ) -> None:
        super().__init__()
        cfg = ctx.hf_config
        fused_ops = ctx.kernel_config.fused_ops
        bias = bool(getattr(cfg, "attention_bias", False))
        total_heads = cfg.num_attention_heads
        self.num_heads = divide(total_heads, get_tp_size())
        self.nope, self.rope = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.kv_lora_rank, self.v_head_dim = cfg.kv_lora_rank, cfg.v_head_dim
        qk_head_dim = self.nope + self.rope
        self.q_lora_rank = getattr(cfg, "q_lora_rank", None)
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(
                cfg.hidden_size, total_heads * qk_head_dim, False, **linear_kwargs(ctx, "q_proj")
            )
        else:
            self.q_a_proj = ReplicatedLinear(
                cfg.hidden_size, self.q_lora_rank, bias, **linear_kwargs(ctx, "q_a_proj")
            )
            # NOTE: HF's latent norms take RMSNorm's default eps, not `rms_norm_eps`.
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6, use_fused=fused_ops)
            self.q_b_proj = ColumnParallelLinear(
                self.q_lora_rank, total_heads * qk_head_dim, False,
                **linear_kwargs(ctx, "q_b_proj"),
            )  # fmt: skip
        self.kv_a_proj_with_mqa = ReplicatedLinear(
            cfg.hidden_size, self.kv_lora_rank + self.rope, bias,
            **linear_kwargs(ctx, "kv_a_proj_with_mqa"),
        )  # fmt: skip
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, 1e-6, use_fused=fused_ops)
        self.kv_b_proj = ColumnParallelLinear(
            self.kv_lora_rank, total_heads * (self.nope + self.v_head_dim), False,
            **linear_kwargs(ctx, "kv_b_proj"),
        )  # fmt: skip
        self.o_proj = RowParallelLinear(
            total_heads * self.v_head_dim, cfg.hidden_size, bias, **linear_kwargs(ctx, "o_proj")
        )
        self.mla = MLAAttention(
            self.num_heads, self.nope, self.rope, self.v_head_dim, self.kv_lora_rank,
            mla_softmax_scale(cfg), self.kv_b_proj, rotary_emb,
            rope_interleaved=rope_interleaved, prefix=ctx.child("mla").prefix,
        )  # fmt: skip

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        kv_c, k_pe = self.kv_a_proj_with_mqa(hidden_states).split(
            [self.kv_lora_rank, self.rope], dim=-1
        )
        kv_c = self.kv_a_layernorm(kv_c.contiguous())
        return self.o_proj(self.mla(q, kv_c, k_pe, positions))


class DeepseekV2DecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm layer with MLA and an MLP (dense, or `DeepseekV2MoE` from
    `first_k_dense_replace` on)."""

    # Which HF architecture's routing and rope layout the layer follows.
    version = 2

    def make_attention(
        self, ctx: ModelContext, layer_idx: int, head_dim: int, rotary_emb: RotaryEmbedding,
        flags: LlamaFlags,
    ) -> nn.Module:  # fmt: skip
        interleaved = self.version == 2 or bool(getattr(ctx.hf_config, "rope_interleave", True))
        return DeepseekV2Attention(ctx, rotary_emb, interleaved)

    def make_mlp(self, ctx: ModelContext, layer_idx: int, flags: LlamaFlags) -> nn.Module:
        if is_moe_layer(ctx.hf_config, layer_idx):
            return DeepseekV2MoE(ctx, self.version)
        return super().make_mlp(ctx, layer_idx, flags)


class DeepseekV3DecoderLayer(DeepseekV2DecoderLayer):
    version = 3


class DeepseekV2ForCausalLM(LlamaForCausalLM):
    """`LlamaModel` (embedding, one rotary module of `qk_rope_head_dim`, final norm) over
    DeepSeek's decoder layers.

    NOTE: `LlamaModel` sizes the rotary module by the config's `head_dim`, which transformers'
    DeepSeek configs set to `qk_rope_head_dim`; `MLAAttention` checks it."""

    decoder_layer_cls = DeepseekV2DecoderLayer

    @classmethod
    def arch_flags(cls, hf_config: Any) -> LlamaFlags:
        # V2's dense MLPs take `mlp_bias`; V3's have none.
        return LlamaFlags(mlp_bias=bool(getattr(hf_config, "mlp_bias", False)))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF-named tensors into the parameters (see the module docstring); returns the names
        of those filled (a fused or stacked one once all its parts came)."""
        params = dict(self.named_parameters())
        num_experts = getattr(self.config, "n_routed_experts", None) or 0
        loaded: set[str] = set()
        parts: dict[str, set[Any]] = {}

        def add_part(param_name: str, part: Any, total: int) -> None:
            got = parts.setdefault(param_name, set())
            got.add(part)
            if len(got) == total:
                loaded.add(param_name)

        for name, tensor in weights:
            layer = _LAYER.match(name)
            if "rotary_emb.inv_freq" in name or (
                layer is not None and int(layer.group(1)) >= self.config.num_hidden_layers
            ):
                continue
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue
            if match := _EXPERT.search(name):
                expert, shard = int(match.group(1)), _EXPERT_SHARDS[match.group(2)]
                prefix = name[: match.start()]
                param_name = f"{prefix}.mlp.experts.{'w2' if shard == 'w2' else 'w13'}_weight"
                param = _param(params, param_name, name)
                param.weight_loader(param, tensor, shard, expert)  # type: ignore[attr-defined]
                add_part(param_name, (expert, shard), num_experts * (1 if shard == "w2" else 2))
            elif match := _PACKED.search(name):
                which = "w13" if match.group(1) == "gate_up_proj" else "w2"
                param_name = f"{name[: match.start()]}.mlp.experts.{which}_weight"
                param = _param(params, param_name, name)
                param.weight_loader(param, tensor)  # type: ignore[attr-defined]
                loaded.add(param_name)
            elif match := _GATE_UP.search(name):
                param_name = f"{name[: match.start()]}.gate_up_proj.weight"
                param = _param(params, param_name, name)
                shard_id = 0 if match.group(1) == "gate_proj" else 1
                param.weight_loader(param, tensor, shard_id)  # type: ignore[attr-defined]
                add_part(param_name, shard_id, 2)
            else:
                param = _param(params, name, name)
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        return loaded


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    decoder_layer_cls = DeepseekV3DecoderLayer


def _param(params: dict[str, nn.Parameter], param_name: str, checkpoint_name: str) -> nn.Parameter:
    if param_name not in params:
        raise ValueError(f"checkpoint tensor {checkpoint_name!r} has no parameter in the model")
    return params[param_name]
