"""EAGLE (EAGLE-1) heads for Llama-family targets: the published layout of e.g.
yuhuili/EAGLE-LLaMA3-Instruct-8B (vLLM's `llama_eagle.py`).

A head is `num_hidden_layers` (one) Llama decoder layers whose input is
`fc(cat(embed(token), target_hidden))` (`fc: Linear(2H -> H)`), layer 0 without its
`input_layernorm` (identity, as EAGLE's `cnets.py` has it: a checkpoint's copy is ignored). Its
output is the residual stream after the last layer (no final norm): the target's LM head reads
it for the logits, and the next draft step takes it as its hidden state. The token embedding and
the LM head are the target's (`share_target`; a checkpoint's copy of the embedding is ignored).

Checkpoint names: `fc.weight` (and `fc.bias` where the config says `"bias": true`),
`layers.0.self_attn.{q,k,v,o}_proj.weight`, `layers.0.mlp.{gate,up,down}_proj.weight`,
`layers.0.post_attention_layernorm.weight`, optionally `embed_tokens.weight`.

The head interface the proposer (`worker/eagle.py`) uses:
`combine_hidden_states(target_hidden) -> [T, H]` (what the first draft step reads),
`forward(ids, positions, hidden) -> (for the logits, for the next step)`, `compute_logits`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from pagedllm.layers.linear import default_weight_loader
from pagedllm.layers.rotary import get_rope, get_rope_parameters
from pagedllm.models.llama import LlamaDecoderLayer, LlamaFlags, LlamaForCausalLM, _param_name
from pagedllm.models.utils import ModelContext


def head_dim_and_rope(ctx: ModelContext) -> tuple[int, Any]:
    """A head's attention head size and rotary module (as `LlamaModel` builds them)."""
    cfg = ctx.hf_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = get_rope(
        head_dim,
        cfg.max_position_embeddings,
        get_rope_parameters(cfg),
        use_fused=ctx.kernel_config.fused_ops,
    )
    return head_dim, rope


def head_flags(hf_config: Any) -> LlamaFlags:
    return LlamaForCausalLM.arch_flags(hf_config)


def load_head_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    rename: Callable[[str], str | None],
    special: Callable[[str, torch.Tensor], bool] = lambda name, tensor: False,
) -> set[str]:
    """Loads a head checkpoint (q/k/v and gate/up into the fused parameters): `rename` maps a
    checkpoint name to the model's (None: ignored), `special` takes a tensor itself (True).
    Returns the parameters filled (a fused one once all of its parts were)."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    parts: dict[str, int] = {}
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name or special(name, tensor):
            continue
        renamed = rename(name)
        if renamed is None:
            continue
        param_name, shard_id = _param_name(renamed)
        if param_name not in params:
            raise ValueError(
                f"checkpoint tensor {name!r} has no parameter in {type(model).__name__}"
            )
        param = params[param_name]
        loader = getattr(param, "weight_loader", default_weight_loader)
        if shard_id is None:
            loader(param, tensor)
            loaded.add(param_name)
            continue
        loader(param, tensor, shard_id)
        parts[param_name] = parts.get(param_name, 0) + 1
        if parts[param_name] == (3 if ".qkv_proj." in param_name else 2):
            loaded.add(param_name)
    return loaded


class EagleLlamaForCausalLM(nn.Module):
    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        cfg = ctx.hf_config
        self.config = cfg
        h = cfg.hidden_size
        head_dim, self.rotary_emb = head_dim_and_rope(ctx)
        flags = head_flags(cfg)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(ctx.child(f"layers.{i}"), i, head_dim, self.rotary_emb, flags)
            for i in range(cfg.num_hidden_layers)
        )
        self.layers[0].input_layernorm = nn.Identity()
        self.fc = nn.Linear(2 * h, h, bias=bool(getattr(cfg, "bias", False)))
        # The target's (`share_target`): not parameters of the head's checkpoint.
        self.embed_tokens: Any = None
        self.lm_head: Any = None

    def share_target(self, target: Any) -> None:
        """Takes the target's token embedding and LM head."""
        self.embed_tokens = target.model.embed_tokens
        self.lm_head = target.lm_head

    def combine_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.fc(torch.cat([self.embed_tokens(input_ids), hidden_states], dim=-1))
        positions = self.rotary_emb.cache_rows(positions)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual)
        x = x + residual
        return x, x

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def rename(name: str) -> str | None:
            name = name.removeprefix("model.")
            if name.startswith(("embed_tokens.", "lm_head.", "layers.0.input_layernorm.")):
                return None  # the target's; layer 0 has no input norm
            return name

        return load_head_weights(self, weights, rename)
