"""Checks of an engine's options against its model, made by `EngineArgs` before anything is
loaded (a clear `ValueError` naming the option instead of a failure in a worker): tensor and
pipeline parallel sizes against the heads and layers, an EAGLE head against its target."""

from __future__ import annotations

from typing import Any

from pagedllm.config import ModelConfig


def check_tensor_parallel(mc: ModelConfig, tp: int) -> None:
    """Attention heads split evenly over the ranks; KV heads too, or are replicated evenly."""
    if tp == 1:
        return
    if mc.num_attention_heads % tp:
        raise ValueError(
            f"tensor_parallel_size={tp} must divide the model's {mc.num_attention_heads} "
            f"attention heads"
        )
    if mc.num_kv_heads % tp and tp % mc.num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size={tp} and the model's {mc.num_kv_heads} KV heads: one must "
            f"divide the other"
        )


def check_pipeline_parallel(mc: ModelConfig, pp: int, speculative: Any) -> None:
    """A stage per `pp` holds at least one layer, of an architecture that splits its layers."""
    if pp == 1:
        return
    from pagedllm.models.registry import resolve_model

    _, model_cls = resolve_model([mc.architecture], mc.model_impl)
    if not getattr(model_cls, "supports_pp", False):
        raise ValueError(
            f"pipeline_parallel_size={pp}: {mc.architecture} ({model_cls.__name__}) does not "
            f"split its layers over pipeline stages yet (the Llama family and its MoE models do)"
        )
    if mc.num_layers < pp:
        raise ValueError(
            f"pipeline_parallel_size={pp} is larger than the model's {mc.num_layers} layers"
        )
    if speculative is not None:
        raise ValueError("speculative_config with pipeline_parallel_size > 1 is not supported yet")


def check_eagle_head(method: str, hf_config: Any, target: ModelConfig) -> None:
    """An EAGLE / EAGLE-3 head's config against the target's: its architecture (set to the
    registered one), hidden size, vocabulary and the target layers it reads."""
    from pagedllm.models.eagle_utils import head_architecture, target_hidden_layers

    hf_config.architectures = [head_architecture(method, hf_config)]
    hidden = {hf_config.hidden_size, getattr(hf_config, "target_hidden_size", None)} - {None}
    if hidden != {target.hidden_size}:
        raise ValueError(
            f"the head's hidden size is {sorted(hidden)}, the target's {target.hidden_size}: "
            "an EAGLE head reads the target's hidden states and embedding"
        )
    if hf_config.vocab_size != target.vocab_size:
        raise ValueError(
            f"the head's vocabulary has {hf_config.vocab_size} tokens, the target's "
            f"{target.vocab_size}: an EAGLE head needs the target's vocabulary"
        )
    draft_vocab = getattr(hf_config, "draft_vocab_size", None) or hf_config.vocab_size
    if method == "eagle3" and not 0 < draft_vocab <= target.vocab_size:
        raise ValueError(f"draft_vocab_size={draft_vocab} exceeds the target's vocabulary")
    target_hidden_layers(method, hf_config, target.num_layers)
