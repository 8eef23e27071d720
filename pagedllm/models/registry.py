"""Architecture name (HF `config.architectures`) → model class, imported lazily.

A new architecture is one model file plus one line in `_MODELS` (or a `register_model` call).
Every model class has the runner's interface: `Model(ctx)` (a `models.utils.ModelContext`: the
HF config, the attention backend, prefixes, the quantization, parallel and kernel configs),
`forward(input_ids [T], positions [T]) -> hidden [T, H]`, `compute_logits(hidden) -> logits`,
and `load_weights(Iterable[(hf_name, tensor)]) -> set[str]`. A model calls
`Attention(...)(q, k, v, positions)` and never touches the KV cache.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

_MODELS: dict[str, str] = {
    "LlamaForCausalLM": "pagedllm.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "pagedllm.models.llama:MistralForCausalLM",
    "MixtralForCausalLM": "pagedllm.models.mixtral:MixtralForCausalLM",
    "Olmo2ForCausalLM": "pagedllm.models.olmo2:Olmo2ForCausalLM",
    "Phi3ForCausalLM": "pagedllm.models.phi3:Phi3ForCausalLM",
    "Qwen2ForCausalLM": "pagedllm.models.llama:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "pagedllm.models.llama:Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM": "pagedllm.models.qwen3_moe:Qwen3MoeForCausalLM",
}


def register_model(architecture: str, target: str) -> None:
    """Registers `module:Class` for `architecture`; the module is imported on first use."""
    if ":" not in target:
        raise ValueError(f"target must be 'module:Class', got {target!r}")
    _MODELS[architecture] = target


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_model_cls(architectures: list[str]) -> type[nn.Module]:
    """The class of the first registered name in `architectures` (HF `config.architectures`)."""
    for arch in architectures or []:
        if arch in _MODELS:
            module_name, cls_name = _MODELS[arch].split(":")
            return getattr(importlib.import_module(module_name), cls_name)
    raise ValueError(
        f"model architectures {list(architectures or [])} are not supported; "
        f"supported architectures: {', '.join(supported_architectures())}"
    )
