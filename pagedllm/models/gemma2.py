"""Gemma 2 (`Gemma2ForCausalLM`), and the Gemma decoder that Gemma 3 (`models/gemma3.py`) reuses.

What differs from Llama (HF transformers' modeling_gemma2.py):
- `GemmaRMSNorm` everywhere (`x / rms(x) * (1 + w)` in float32), four per layer: input,
  post-attention (on the attention output, before the residual add), pre-feedforward and
  post-feedforward (on the MLP output, before the residual add);
- token embeddings times `sqrt(hidden_size)`, that factor rounded to the model dtype (as HF);
- a GeGLU MLP (`gelu_pytorch_tanh` of the gate times the up projection);
- attention scale `query_pre_attn_scalar ** -0.5` (not `head_dim ** -0.5`), scores
  soft-capped (`attn_logit_softcapping`), and the logits too (`final_logit_softcapping`);
- sliding-window and global layers alternating: `config.layer_types` when present, else every
  `sliding_window_pattern`-th layer global (2 for Gemma 2: even layers slide);
- tied embeddings by default.

Module and parameter names follow the HF checkpoints, with q/k/v fused into `qkv_proj` and
gate/up into `gate_up_proj` (the Llama family's loader).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagedllm.attention.layer import Attention
from pagedllm.layers.activation import GeluAndMul
from pagedllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.layers.layernorm import GemmaRMSNorm
from pagedllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagedllm.layers.rotary import RotaryEmbedding, get_rope, get_rope_parameters
from pagedllm.models.llama import LlamaForCausalLM
from pagedllm.models.utils import ModelContext, linear_kwargs

# HF's activation names → `GeluAndMul`'s `approximate`.
_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}


def gemma_layer_is_sliding(hf_config: Any, layer_idx: int, default_pattern: int) -> bool:
    """Whether layer `layer_idx` attends over the sliding window.

    `layer_types` (transformers >= 4.53) when the config has it; else every `pattern`-th layer
    is global (`sliding_window_pattern`, or the config class's default: 2 for Gemma 2, 6 for
    Gemma 3), as the older modeling files decided it."""
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        return layer_types[layer_idx] == "sliding_attention"
    pattern = getattr(hf_config, "sliding_window_pattern", None)
    pattern = pattern or getattr(hf_config, "_sliding_window_pattern", None) or default_pattern
    return bool((layer_idx + 1) % pattern)


def _check_causal(hf_config: Any) -> None:
    if getattr(hf_config, "use_bidirectional_attention", False):
        raise NotImplementedError(
            "Gemma with use_bidirectional_attention (an encoder) is not supported"
        )


class GemmaMLP(nn.Module):
    """`down(gelu(gate(x)) * up(x))`, gate and up fused."""

    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        cfg = ctx.hf_config
        act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
        if act not in _GELU:
            raise ValueError(f"unsupported Gemma activation {act!r}; supported: {sorted(_GELU)}")
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size,
            [cfg.intermediate_size] * 2,
            False,
            **linear_kwargs(ctx, "gate_up_proj"),
        )
        self.down_proj = RowParallelLinear(
            cfg.intermediate_size, cfg.hidden_size, False, **linear_kwargs(ctx, "down_proj")
        )
        self.act_fn = GeluAndMul(_GELU[act])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class GemmaAttention(nn.Module):
    """q/k/v, paged attention (scale `query_pre_attn_scalar ** -0.5`, the config's logit soft
    cap, the layer's window), o. With `qk_norm` (Gemma 3), per-head `GemmaRMSNorm` of q and k
    before the rotation."""

    def __init__(
        self,
        ctx: ModelContext,
        head_dim: int,
        rotary_emb: RotaryEmbedding,
        sliding_window: int | None,
        qk_norm: bool,
    ) -> None:
        super().__init__()
        cfg = ctx.hf_config
        bias = bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, bias=bias,
            **linear_kwargs(ctx, "qkv_proj"),
        )  # fmt: skip
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * head_dim, cfg.hidden_size, bias=bias,
            **linear_kwargs(ctx, "o_proj"),
        )  # fmt: skip
        fused_ops = ctx.kernel_config.fused_ops
        self.q_norm = self.k_norm = None
        if qk_norm:
            self.q_norm = GemmaRMSNorm(head_dim, cfg.rms_norm_eps, use_fused=fused_ops)
            self.k_norm = GemmaRMSNorm(head_dim, cfg.rms_norm_eps, use_fused=fused_ops)
        self.rotary_emb = rotary_emb
        self.attn = Attention(
            self.qkv_proj.num_heads,
            head_dim,
            float(cfg.query_pre_attn_scalar) ** -0.5,
            self.qkv_proj.num_kv_heads,
            ctx.attn_backend,
            rotary_emb=rotary_emb,
            q_norm=self.q_norm,
            k_norm=self.k_norm,
            sliding_window=sliding_window,
            logits_soft_cap=getattr(cfg, "attn_logit_softcapping", None),
            use_fused=fused_ops,
            prefix=ctx.child("attn").prefix,
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], -1)
        return self.o_proj(self.attn(q, k, v, positions))


class GemmaDecoderLayer(nn.Module):
    """`h + post_attention_norm(attn(input_norm(h)))`, then
    `h + post_feedforward_norm(mlp(pre_feedforward_norm(h)))`.

    `rope_key` names the model's rotary (and its cache rows) this layer rotates by."""

    def __init__(
        self,
        ctx: ModelContext,
        head_dim: int,
        rotary_emb: RotaryEmbedding,
        sliding_window: int | None,
        qk_norm: bool,
        rope_key: str,
    ) -> None:
        super().__init__()
        cfg, fused_ops = ctx.hf_config, ctx.kernel_config.fused_ops
        self.rope_key = rope_key
        self.self_attn = GemmaAttention(
            ctx.child("self_attn"), head_dim, rotary_emb, sliding_window, qk_norm
        )
        self.mlp = GemmaMLP(ctx.child("mlp"))

        def norm() -> GemmaRMSNorm:
            return GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, use_fused=fused_ops)

        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(normalized mlp output, residual stream before it)`, as `LlamaDecoderLayer` returns:
        their sum is the layer output, and this layer's input is the sum of the two it got."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.post_attention_layernorm(self.self_attn(positions, hidden_states))
        hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden_states)), residual


class GemmaModel(nn.Module):
    """Scaled embedding, decoder layers and the final norm: `(input_ids, positions) -> hidden`.

    `rotary_embs` maps a key to a rotary module (Gemma 2: one, "global"; Gemma 3: "global" and
    "local"); `layer_spec(i) -> (sliding_window, rope_key)` says what layer `i` attends over and
    rotates by. The rotaries are modules of this model (`rotary_emb`, `rotary_emb_local`)."""

    def __init__(
        self,
        ctx: ModelContext,
        head_dim: int,
        rotary_embs: dict[str, RotaryEmbedding],
        layer_spec: Any,
        qk_norm: bool,
    ) -> None:
        super().__init__()
        cfg = ctx.hf_config
        _check_causal(cfg)
        self.rotary_emb = rotary_embs["global"]
        if "local" in rotary_embs:
            self.rotary_emb_local = rotary_embs["local"]
        self._rotary_embs = rotary_embs
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.normalizer = math.sqrt(cfg.hidden_size)
        layers = []
        for i in range(cfg.num_hidden_layers):
            window, rope_key = layer_spec(i)
            layers.append(
                GemmaDecoderLayer(ctx.child(f"layers.{i}"), head_dim, rotary_embs[rope_key],
                                  window, qk_norm, rope_key)
            )  # fmt: skip
        self.layers = nn.ModuleList(layers)
        self.norm = GemmaRMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, use_fused=ctx.kernel_config.fused_ops
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        # NOTE: HF multiplies by the factor rounded to the weights' dtype (sqrt(3072) in bf16).
        hidden_states = hidden_states * torch.tensor(self.normalizer, dtype=hidden_states.dtype)
        rows = {key: rope.cache_rows(positions) for key, rope in self._rotary_embs.items()}
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(rows[layer.rope_key], hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class GemmaForCausalLMBase(nn.Module):
    """A Gemma causal LM over a flat batch of tokens; subclasses say the rotaries and the
    layers (`build_model`). Logits soft-capped by `final_logit_softcapping` when set."""

    default_sliding_window_pattern = 2
    qk_norm = False

    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        cfg = ctx.hf_config
        self.config = cfg
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        rotary_embs = self.rotary_embs(cfg, head_dim, ctx.kernel_config.fused_ops)
        self.model = GemmaModel(
            ctx.child("model"), head_dim, rotary_embs, lambda i: self.layer_spec(cfg, i),
            self.qk_norm,
        )  # fmt: skip
        self.lm_head = ParallelLMHead(
            cfg.vocab_size, cfg.hidden_size, use_gemv=ctx.kernel_config.gemv
        )
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_logit_softcapping = getattr(cfg, "final_logit_softcapping", None)

    @classmethod
    def rotary_embs(
        cls, hf_config: Any, head_dim: int, use_fused: bool | None
    ) -> dict[str, RotaryEmbedding]:
        """Gemma 2: one rotary for every layer."""
        params = get_rope_parameters(hf_config)
        rope = get_rope(head_dim, hf_config.max_position_embeddings, params, use_fused=use_fused)
        return {"global": rope}

    @classmethod
    def layer_spec(cls, hf_config: Any, layer_idx: int) -> tuple[int | None, str]:
        """(sliding window or None, rotary key) of layer `layer_idx`."""
        sliding = gemma_layer_is_sliding(hf_config, layer_idx, cls.default_sliding_window_pattern)
        window = getattr(hf_config, "sliding_window", None)
        return (window if sliding and window else None), "global"

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`input_ids [T]`, `positions [T]` → hidden states `[T, hidden_size]`."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[N, hidden_size]` → logits `[N, vocab_size]` in the model dtype, soft-capped."""
        logits = self.lm_head.compute_logits(hidden_states)
        cap = self.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The Llama family's loader: the same checkpoint names, q/k/v and gate/up fused, a tied
        `lm_head.weight` skipped; the norms' loaders add Gemma's one (`GemmaRMSNorm`)."""
        return LlamaForCausalLM.load_weights(self, weights)  # type: ignore[arg-type]


class Gemma2ForCausalLM(GemmaForCausalLMBase):
    """Gemma 2: the attention and final logits soft-capped, even layers sliding."""
