"""Architecture name (HF `config.architectures`) → model class, imported lazily.

A new architecture is one model file plus one line in `_MODELS` (or a `register_model` call).
Every model class has the runner's interface: `Model(ctx)` (a `models.utils.ModelContext`: the
HF config, the attention backend, prefixes, the quantization, parallel and kernel configs),
`forward(input_ids [T], positions [T]) -> hidden [T, H]`, `compute_logits(hidden) -> logits`,
and `load_weights(Iterable[(hf_name, tensor)]) -> set[str]`. A model calls
`Attention(...)(q, k, v, positions)` and never touches the KV cache.

An architecture without a model file that transformers implements as a causal LM runs through
the Transformers fallback (`models/transformers.py`); `model_impl` picks (`resolve_model`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pagedllm.config import MODEL_IMPLS

if TYPE_CHECKING:
    from torch import nn

_MODELS: dict[str, str] = {
    "DeepseekV2ForCausalLM": "pagedllm.models.deepseek_v2:DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM": "pagedllm.models.deepseek_v2:DeepseekV3ForCausalLM",
    # EAGLE heads (speculative decoding's methods "eagle" and "eagle3": `worker/eagle.py`).
    "EagleLlamaForCausalLM": "pagedllm.models.llama_eagle:EagleLlamaForCausalLM",
    "Eagle3LlamaForCausalLM": "pagedllm.models.llama_eagle3:Eagle3LlamaForCausalLM",
    "LlamaForCausalLMEagle3": "pagedllm.models.llama_eagle3:Eagle3LlamaForCausalLM",
    "Qwen2MoeForCausalLM": "pagedllm.models.qwen2_moe:Qwen2MoeForCausalLM",
    "Gemma2ForCausalLM": "pagedllm.models.gemma2:Gemma2ForCausalLM",
    "Gemma3ForCausalLM": "pagedllm.models.gemma3:Gemma3ForCausalLM",
    "GptOssForCausalLM": "pagedllm.models.gpt_oss:GptOssForCausalLM",
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


def resolve_model_cls(architectures: list[str], model_impl: str = "auto") -> type[nn.Module]:
    """The class of `architectures` (HF `config.architectures`) under `model_impl`; see
    `resolve_model`."""
    return resolve_model(architectures, model_impl)[1]


def resolve_model(
    architectures: list[str], model_impl: str = "auto"
) -> tuple[str, type[nn.Module]]:
    """(the architecture used, its class). `native` and `auto`: the first registered name in
    `architectures`; `transformers`, or `auto` when none is registered: the Transformers
    fallback (`models/transformers.py`) for the first name transformers knows as a causal LM."""
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl must be one of {', '.join(MODEL_IMPLS)}, got {model_impl!r}")
    archs = list(architectures or [])
    if model_impl != "transformers":
        for arch in archs:
            if arch in _MODELS:
                module_name, cls_name = _MODELS[arch].split(":")
                return arch, getattr(importlib.import_module(module_name), cls_name)
    if model_impl != "native":
        for arch in archs:
            if is_transformers_causal_lm(arch):
                from pagedllm.models.transformers import TransformersForCausalLM

                return arch, TransformersForCausalLM
    if model_impl == "native":
        hint = "; model_impl='auto' or 'transformers' runs any causal LM transformers implements"
    else:
        hint = " (transformers implements none of them as a causal LM either)"
    raise ValueError(
        f"model architectures {archs} are not supported (model_impl={model_impl!r}); native "
        f"architectures: {', '.join(supported_architectures())}{hint}"
    )


def is_transformers_causal_lm(architecture: str) -> bool:
    """Whether transformers implements `architecture` as a causal LM (no model is imported)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return False
    return architecture in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
