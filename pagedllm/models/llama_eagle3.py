"""EAGLE-3 heads for Llama-family targets: the published layout of e.g.
yuhuili/EAGLE3-LLaMA3.1-Instruct-8B (vLLM's `llama_eagle3.py`).

The target's hidden states at three layers (`eagle_utils.target_hidden_layers`), concatenated,
are projected by `fc: Linear(3H -> H)` (`combine_hidden_states`); a draft step after the first
reads the head's own output instead. One decoder layer, `midlayer`, whose attention input is
`cat(input_layernorm(embed(token)), hidden_norm(hidden))` (2H; q/k/v project from 2H), its
residual stream starting from the hidden state (from its normed value where the config says
`norm_before_residual`); then the head's own `norm` and `lm_head` over a draft vocabulary of
`draft_vocab_size` ids, mapped to the target's by `d2t` (target id = draft id + d2t[draft id];
the other target ids get -inf logits). The token embedding is the target's (`share_target`).

Checkpoint names: `fc.weight`, `midlayer.self_attn.{q,k,v,o}_proj.weight`,
`midlayer.mlp.{gate,up,down}_proj.weight`, `midlayer.{input_layernorm,hidden_norm,
post_attention_layernorm}.weight`, `norm.weight`, `lm_head.weight`, `d2t` (int64
[draft_vocab_size]; absent: the identity), `t2d` (ignored), optionally `embed_tokens.weight`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pagedllm.layers.embedding import ParallelLMHead
from pagedllm.layers.layernorm import RMSNorm
from pagedllm.layers.linear import QKVParallelLinear
from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.models.llama import LlamaDecoderLayer, LlamaFlags
from pagedllm.models.llama_eagle import head_dim_and_rope, head_flags, load_head_weights
from pagedllm.models.utils import ModelContext, linear_kwargs


class Eagle3DecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose attention reads `cat(embeds, hidden)`."""

    def __init__(
        self, ctx: ModelContext, layer_idx: int, head_dim: int, rotary_emb: RotaryEmbedding,
        flags: LlamaFlags,
    ) -> None:  # fmt: skip
        super().__init__(ctx, layer_idx, head_dim, rotary_emb, flags)
        cfg = ctx.hf_config
        attn = self.self_attn
        heads = cfg.num_attention_heads
        attn.qkv_proj = QKVParallelLinear(
            2 * cfg.hidden_size, head_dim, heads, getattr(cfg, "num_key_value_heads", None) or heads,
            bias=flags.qkv_bias, **linear_kwargs(ctx.child("self_attn"), "qkv_proj"),
        )  # fmt: skip
        self.hidden_norm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, use_fused=ctx.kernel_config.fused_ops
        )
        self.norm_before_residual = bool(getattr(cfg, "norm_before_residual", False))

    def forward(  # type: ignore[override]
        self, positions: torch.Tensor, embeds: torch.Tensor, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.input_layernorm(embeds)
        if self.norm_before_residual:
            hidden_states = residual = self.hidden_norm(hidden_states)
        else:
            residual, hidden_states = hidden_states, self.hidden_norm(hidden_states)
        x = self.self_attn(positions, torch.cat([embeds, hidden_states], dim=-1))
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Eagle3LlamaForCausalLM(nn.Module):
    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        cfg = ctx.hf_config
        self.config = cfg
        h = cfg.hidden_size
        if getattr(cfg, "num_hidden_layers", 1) != 1:
            raise ValueError(
                f"an EAGLE-3 head has one layer (midlayer), got {cfg.num_hidden_layers}"
            )
        head_dim, self.rotary_emb = head_dim_and_rope(ctx)
        self.midlayer = Eagle3DecoderLayer(
            ctx.child("midlayer"), 0, head_dim, self.rotary_emb, head_flags(cfg)
        )
        target_h = getattr(cfg, "target_hidden_size", None) or h
        self.fc = nn.Linear(3 * target_h, h, bias=False)
        self.norm = RMSNorm(h, cfg.rms_norm_eps, use_fused=ctx.kernel_config.fused_ops)
        self.vocab_size = cfg.vocab_size
        draft_vocab = getattr(cfg, "draft_vocab_size", None) or cfg.vocab_size
        self.lm_head = ParallelLMHead(draft_vocab, h, use_gemv=ctx.kernel_config.gemv)
        self.d2t: torch.Tensor
        self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.int64))
        self.maps_ids = draft_vocab != cfg.vocab_size  # False: d2t is the identity
        self.embed_tokens: Any = None  # the target's (`share_target`)

    def share_target(self, target: Any) -> None:
        self.embed_tokens = target.model.embed_tokens

    def combine_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc(hidden_states)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        positions = self.rotary_emb.cache_rows(positions)
        x, residual = self.midlayer(positions, self.embed_tokens(input_ids), hidden_states)
        return self.norm(x, residual)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits over the target's vocabulary (-inf outside the draft vocabulary)."""
        draft = self.lm_head.compute_logits(hidden_states)
        if not self.maps_ids:
            return draft
        ids = torch.arange(draft.shape[-1], device=draft.device) + self.d2t
        logits = draft.new_full((draft.shape[0], self.vocab_size), float("-inf"))
        logits[:, ids] = draft
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def special(name: str, tensor: torch.Tensor) -> bool:
            if name == "d2t":
                if tensor.shape != self.d2t.shape:
                    raise ValueError(
                        f"d2t has shape {tuple(tensor.shape)}, the draft vocabulary "
                        f"{self.d2t.shape[0]} ids"
                    )
                if int((torch.arange(len(tensor)) + tensor.cpu()).max()) >= self.vocab_size:
                    raise ValueError("d2t maps a draft id past the target's vocabulary")
                self.d2t.copy_(tensor)
                self.maps_ids = self.maps_ids or bool(tensor.any())
                return True
            return name == "t2d"

        def rename(name: str) -> str | None:
            name = name.removeprefix("model.")
            return None if name.startswith("embed_tokens.") else name

        return load_head_weights(self, weights, rename, special)
