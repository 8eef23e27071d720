"""The Llama family: Llama, Mistral, Qwen2 and Qwen3 decoder-only models in one file.

They differ only in small flags read from the HF config: q/k/v (and o) biases, per-head q/k
RMSNorm (Qwen3, applied before RoPE), an explicit `head_dim`, tied embeddings and per-layer
sliding windows. Module and parameter names follow the HF checkpoints, except that q/k/v are
fused into `qkv_proj` and gate/up into `gate_up_proj`.

Architectures in their own files build on these classes: Phi-3 (`models/phi3.py`) as a
`LlamaForCausalLM` whose checkpoint is already fused, OLMo 2 (`models/olmo2.py`) through
`decoder_layer_cls`, its own decoder layer in `LlamaModel`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
from torch import nn

from pagedllm.attention.layer import Attention
from pagedllm.distributed import get_pp_group
from pagedllm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagedllm.layers.layernorm import RMSNorm
from pagedllm.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    default_weight_loader,
)
from pagedllm.layers.rotary import RotaryEmbedding, get_rope, get_rope_parameters
from pagedllm.models.utils import (
    IntermediateTensors,
    ModelContext,
    PPMissingLayer,
    linear_kwargs,
    pp_layer_range,
)

# (fused parameter, checkpoint module, shard id)
_STACKED_PARAMS: tuple[tuple[str, str, str | int], ...] = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)
_FUSED_PARTS: dict[str, set[str | int]] = {}
for _fused, _, _shard_id in _STACKED_PARAMS:
    _FUSED_PARTS.setdefault(_fused, set()).add(_shard_id)


@dataclass(frozen=True)
class LlamaFlags:
    """What one architecture of the family changes."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


def layer_sliding_window(hf_config: Any, layer_idx: int) -> int | None:
    """The attention window of layer `layer_idx`, or None for full attention.

    transformers 5 lists `layer_types`; transformers-4 Qwen configs say `use_sliding_window`
    (then layers from `max_window_layers` on slide); Mistral slides in every layer.
    """
    window = getattr(hf_config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if hasattr(hf_config, "use_sliding_window"):
        use = hf_config.use_sliding_window and layer_idx >= hf_config.max_window_layers
        return window if use else None
    return window


class LlamaMLP(nn.Module):
    def __init__(self, ctx: ModelContext, bias: bool) -> None:
        super().__init__()
        cfg = ctx.hf_config
        hidden_act = getattr(cfg, "hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {hidden_act!r}; only 'silu' is supported")
        sizes = [cfg.intermediate_size] * 2
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, sizes, bias, **linear_kwargs(ctx, "gate_up_proj")
        )
        self.down_proj = RowParallelLinear(
            cfg.intermediate_size, cfg.hidden_size, bias, **linear_kwargs(ctx, "down_proj")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SiLU-and-mul folded into the down projection (one GEMV at small batch).
        return self.down_proj.forward_silu_mul(self.gate_up_proj(x))


class LlamaAttention(nn.Module):
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
        total_heads = cfg.num_attention_heads
        total_kv_heads = getattr(cfg, "num_key_value_heads", None) or total_heads
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, head_dim, total_heads, total_kv_heads, bias=flags.qkv_bias,
            **linear_kwargs(ctx, "qkv_proj"),
        )  # fmt: skip
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(
            total_heads * head_dim,
            cfg.hidden_size,
            bias=flags.o_bias,
            **linear_kwargs(ctx, "o_proj"),
        )
        fused_ops = ctx.kernel_config.fused_ops
        self.q_norm = self.k_norm = None
        if flags.qk_norm:
            self.q_norm = RMSNorm(head_dim, cfg.rms_norm_eps, use_fused=fused_ops)
            self.k_norm = RMSNorm(head_dim, cfg.rms_norm_eps, use_fused=fused_ops)
        self.rotary_emb = rotary_emb
        self.attn = Attention(
            self.qkv_proj.num_heads,
            head_dim,
            head_dim**-0.5,
            self.qkv_proj.num_kv_heads,
            ctx.attn_backend,
            rotary_emb=rotary_emb,
            q_norm=self.q_norm,
            k_norm=self.k_norm,
            sliding_window=layer_sliding_window(cfg, layer_idx),
            use_fused=fused_ops,
            prefix=ctx.child("attn").prefix,
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], -1)
        return self.o_proj(self.attn(q, k, v, positions))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, ctx: ModelContext, layer_idx: int, head_dim: int, rotary_emb: RotaryEmbedding,
        flags: LlamaFlags,
    ) -> None:  # fmt: skip
        super().__init__()
        cfg, fused_ops = ctx.hf_config, ctx.kernel_config.fused_ops
        self.self_attn = self.make_attention(
            ctx.child("self_attn"), layer_idx, head_dim, rotary_emb, flags
        )
        self.mlp = self.make_mlp(ctx.child("mlp"), layer_idx, flags)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, use_fused=fused_ops)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, use_fused=fused_ops
        )

    def make_attention(
        self, ctx: ModelContext, layer_idx: int, head_dim: int, rotary_emb: RotaryEmbedding,
        flags: LlamaFlags,
    ) -> nn.Module:  # fmt: skip
        """The layer's `self_attn` (a model with another attention overrides this)."""
        return LlamaAttention(ctx, layer_idx, head_dim, rotary_emb, flags)

    def make_mlp(self, ctx: ModelContext, layer_idx: int, flags: LlamaFlags) -> nn.Module:
        """The layer's `mlp` (an MoE model overrides this, for its sparse layers)."""
        return LlamaMLP(ctx, flags.mlp_bias)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(mlp output, residual stream before it)`; their sum is the layer output."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers and the final norm: `(input_ids, positions) -> hidden`.

    `decoder_layer_cls` is built as `cls(ctx, layer_idx, head_dim, rotary_emb, flags)` and
    called as `layer(positions, hidden, residual) -> (hidden, residual)`, the sum of the two
    being the layer's output (an architecture with another layer layout keeps that contract).
    """

    def __init__(
        self,
        ctx: ModelContext,
        flags: LlamaFlags,
        decoder_layer_cls: type[nn.Module] = LlamaDecoderLayer,
    ) -> None:
        super().__init__()
        cfg = ctx.hf_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        fused_ops = ctx.kernel_config.fused_ops
        # NOTE: one rotary module (one cos/sin cache) is shared by all layers.
        self.rotary_emb = get_rope(
            head_dim, cfg.max_position_embeddings, get_rope_parameters(cfg), use_fused=fused_ops
        )
        # Pipeline parallelism: this stage's layers; the others' are placeholders (the first
        # stage embeds, the last one normalizes).
        self.start_layer, self.end_layer = pp_layer_range(cfg.num_hidden_layers)
        pp = get_pp_group()
        self.is_first_stage, self.is_last_stage = pp.is_first_rank, pp.is_last_rank
        self.embed_tokens = (
            VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
            if self.is_first_stage
            else PPMissingLayer()
        )
        self.layers = nn.ModuleList(
            decoder_layer_cls(ctx.child(f"layers.{i}"), i, head_dim, self.rotary_emb, flags)
            if self.start_layer <= i < self.end_layer
            else PPMissingLayer()
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = (
            RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, use_fused=fused_ops)
            if self.is_last_stage
            else PPMissingLayer()
        )
        # EAGLE speculative decoding (`worker/eagle.py` sets these): each forward copies the
        # hidden states of these layers into rows [0, T) of `hidden_state_buffer` [N, k * H],
        # side by side in this order: layer i < num_layers gives its input (the residual
        # stream after layer i - 1), i == num_layers the final normed output. A static buffer,
        # so that CUDA graph replays fill it too (the return type stays).
        self.aux_hidden_state_layers: tuple[int, ...] = ()
        self.hidden_state_buffer: torch.Tensor | None = None

    def _keep_hidden(self, layer_idx: int, hidden: torch.Tensor) -> None:
        buf = self.hidden_state_buffer
        slot = self.aux_hidden_state_layers.index(layer_idx)
        t, h = hidden.shape
        if buf is not None and t <= buf.shape[0]:  # NOTE: a profile run may be longer
            buf[:t, slot * h : (slot + 1) * h].copy_(hidden)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """The final hidden states; a stage before the last returns its `IntermediateTensors`
        (and one after the first starts from the previous stage's)."""
        if self.is_first_stage:
            hidden_states, residual = self.embed_tokens(input_ids), None
        else:
            assert intermediate is not None, "a later pipeline stage needs the previous one's"
            hidden_states, residual = intermediate.hidden_states, intermediate.residual
        # The layers rotate by cos/sin cache rows: the positions, but for LongRoPE's long ones.
        positions = self.rotary_emb.cache_rows(positions)
        aux = self.aux_hidden_state_layers
        for idx in range(self.start_layer, self.end_layer):
            if idx in aux:
                self._keep_hidden(
                    idx, hidden_states if residual is None else hidden_states + residual
                )
            hidden_states, residual = self.layers[idx](positions, hidden_states, residual)
        if not self.is_last_stage:
            assert residual is not None, "a stage holds at least one layer"
            return IntermediateTensors(hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        if len(self.layers) in aux:
            self._keep_hidden(len(self.layers), hidden_states)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    """A causal LM over a flat batch of tokens (no batch dimension); see `models/registry.py`."""

    # Pipeline parallelism: `LlamaModel` splits its layers over the stages.
    supports_pp: ClassVar[bool] = True
    # The decoder layer an architecture builds (see `LlamaModel`).
    decoder_layer_cls: ClassVar[type[nn.Module]] = LlamaDecoderLayer

    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        hf_config = ctx.hf_config
        self.config = hf_config
        self.flags = self.arch_flags(hf_config)
        self.model = LlamaModel(ctx.child("model"), self.flags, self.decoder_layer_cls)
        self.lm_head: nn.Module = PPMissingLayer()
        if self.model.is_last_stage:
            self.lm_head = ParallelLMHead(
                hf_config.vocab_size, hf_config.hidden_size, use_gemv=ctx.kernel_config.gemv
            )
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        if self.tie_word_embeddings and self.model.is_first_stage and self.model.is_last_stage:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def arch_flags(cls, hf_config: Any) -> LlamaFlags:
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return LlamaFlags(
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate: IntermediateTensors | None = None,
    ) -> Any:
        """`input_ids [T]`, `positions [T]` → hidden states `[T, hidden_size]` (a pipeline
        stage before the last: its `IntermediateTensors`)."""
        return self.model(input_ids, positions, intermediate)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[N, hidden_size]` → logits `[N, vocab_size]` in the model dtype (the last pipeline
        stage's: the others hold no LM head)."""
        return cast(ParallelLMHead, self.lm_head).compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads HF-named checkpoint tensors; returns the names of the parameters filled.

        A fused parameter counts as filled once all of its parts were loaded.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        parts_loaded: dict[str, set[str | int]] = {}
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if self.tie_word_embeddings and name == "lm_head.weight" and self.model.is_first_stage:
                continue  # the embedding's, shared
            param_name, shard_id = _param_name(name)
            if param_name not in params:
                raise ValueError(
                    f"checkpoint tensor {name!r} has no parameter in {type(self).__name__}"
                )
            param = params[param_name]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard_id is None:
                loader(param, tensor)
                loaded.add(param_name)
                continue
            loader(param, tensor, shard_id)
            parts = parts_loaded.setdefault(param_name, set())
            parts.add(shard_id)
            if parts == _FUSED_PARTS[param_name.split(".")[-2]]:
                loaded.add(param_name)
        return loaded


def _param_name(checkpoint_name: str) -> tuple[str, str | int | None]:
    """Our parameter name for an HF checkpoint name, and its shard id in a fused parameter."""
    for fused_name, part, shard_id in _STACKED_PARAMS:
        if f".{part}." in checkpoint_name:
            return checkpoint_name.replace(f".{part}.", f".{fused_name}."), shard_id
    return checkpoint_name, None


class MistralForCausalLM(LlamaForCausalLM):
    """Llama without biases and with a sliding window in every layer (`config.sliding_window`)."""

    @classmethod
    def arch_flags(cls, hf_config: Any) -> LlamaFlags:
        return LlamaFlags()


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Llama with q/k/v biases (always) and no o_proj bias."""

    @classmethod
    def arch_flags(cls, hf_config: Any) -> LlamaFlags:
        return LlamaFlags(qkv_bias=True, o_bias=False)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Llama with per-head RMSNorm of q and k before RoPE."""

    @classmethod
    def arch_flags(cls, hf_config: Any) -> LlamaFlags:
        return LlamaFlags(
            qkv_bias=bool(getattr(hf_config, "attention_bias", False)),
            o_bias=bool(getattr(hf_config, "attention_bias", False)),
            qk_norm=True,
        )
