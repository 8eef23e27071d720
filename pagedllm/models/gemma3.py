"""Gemma 3, text only (`Gemma3ForCausalLM`, config `Gemma3TextConfig`, model type
`gemma3_text`): Gemma 2's decoder (`models/gemma2.py`) with

- per-head q/k `GemmaRMSNorm` before the rotation;
- two rotaries: sliding (local) layers rotate with the local base (10k, no scaling), global
  layers with the global one (1M, with its scaling, e.g. linear by 8);
- five sliding layers to one global (`sliding_window_pattern` 6) unless `layer_types` says;
- no soft caps by default (the config may still set them; they apply as in Gemma 2).

The rope settings, read defensively across transformers versions: transformers 5 keeps
`rope_parameters` per layer type (`{"sliding_attention": {...}, "full_attention": {...}}`);
transformers 4 keeps `rope_theta` and `rope_scaling` (global) and `rope_local_base_freq` (local).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from pagedllm.layers.rotary import RotaryEmbedding, get_rope, get_rope_parameters
from pagedllm.models.gemma2 import GemmaForCausalLMBase, gemma_layer_is_sliding

# transformers' Gemma3TextConfig.default_theta
_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def gemma3_rope_parameters(hf_config: Any, layer_type: str) -> dict[str, Any]:
    """The flat rope dict (`get_rope_parameters`' form) of "full_attention" or
    "sliding_attention" layers."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and layer_type in params:  # transformers 5: per layer type
        own = dict(params[layer_type] or {})
        own.setdefault("rope_theta", _DEFAULT_THETA[layer_type])
        view = SimpleNamespace(
            rope_parameters=own, max_position_embeddings=hf_config.max_position_embeddings
        )
        return get_rope_parameters(view)
    if layer_type == "sliding_attention":  # transformers 4: the local rope is never scaled
        theta = getattr(hf_config, "rope_local_base_freq", None)
        return {"rope_type": "default", "rope_theta": theta or _DEFAULT_THETA[layer_type]}
    view = SimpleNamespace(
        rope_parameters=params or getattr(hf_config, "rope_scaling", None),
        rope_theta=getattr(hf_config, "rope_theta", None) or _DEFAULT_THETA[layer_type],
        max_position_embeddings=hf_config.max_position_embeddings,
    )
    return get_rope_parameters(view)


class Gemma3ForCausalLM(GemmaForCausalLMBase):
    """Gemma 3 text: q/k norms, a local and a global rotary, one global layer in six."""

    default_sliding_window_pattern = 6
    qk_norm = True

    @classmethod
    def rotary_embs(
        cls, hf_config: Any, head_dim: int, use_fused: bool | None
    ) -> dict[str, RotaryEmbedding]:
        max_position = hf_config.max_position_embeddings
        types = {"global": "full_attention", "local": "sliding_attention"}
        return {
            key: get_rope(
                head_dim,
                max_position,
                gemma3_rope_parameters(hf_config, layer_type),
                use_fused=use_fused,
            )
            for key, layer_type in types.items()
        }

    @classmethod
    def layer_spec(cls, hf_config: Any, layer_idx: int) -> tuple[int | None, str]:
        sliding = gemma_layer_is_sliding(hf_config, layer_idx, cls.default_sliding_window_pattern)
        window = getattr(hf_config, "sliding_window", None)
        # NOTE: the rotary goes by the layer's type, as HF's, even without a window.
        return (window if sliding and window else None), ("local" if sliding else "global")
