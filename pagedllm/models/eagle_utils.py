"""EAGLE heads' configs, read without torch (by `EngineArgs`, before anything is loaded, and by
the proposer): which architecture a head checkpoint is, and which target hidden states it reads.

A head's `config.json` names its layout in `architectures`: EAGLE-1 checkpoints often say
`LlamaForCausalLM` (yuhuili/EAGLE-LLaMA3-Instruct-8B), so method "eagle" reads any Llama name
as `EagleLlamaForCausalLM`; EAGLE-3 ones say `LlamaForCausalLMEagle3` or
`Eagle3LlamaForCausalLM`.
"""

from __future__ import annotations

from typing import Any

EAGLE_ARCH = "EagleLlamaForCausalLM"
EAGLE3_ARCHS = ("Eagle3LlamaForCausalLM", "LlamaForCausalLMEagle3")


def head_architecture(method: str, hf_config: Any) -> str:
    """The registered architecture of an EAGLE (`method` "eagle") or EAGLE-3 ("eagle3") head."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    if method == "eagle3":
        if any(a in EAGLE3_ARCHS or "Eagle3" in a for a in archs):
            return EAGLE3_ARCHS[0]
        raise ValueError(
            f"an EAGLE-3 head's architectures are one of {', '.join(EAGLE3_ARCHS)}, got {archs}"
        )
    if any(a == EAGLE_ARCH or "Llama" in a for a in archs) and not any(
        "Eagle3" in a for a in archs
    ):
        return EAGLE_ARCH
    raise ValueError(f"an EAGLE head's architectures are {EAGLE_ARCH} (or Llama's), got {archs}")


def target_hidden_layers(method: str, hf_config: Any, num_target_layers: int) -> tuple[int, ...]:
    """The target's hidden states the head reads, as `LlamaModel.aux_hidden_state_layers`:
    EAGLE the final normed output (index num_layers), EAGLE-3 the inputs of three layers
    (`eagle_config.eagle_aux_hidden_state_layer_ids`, else vLLM's (2, n // 2, n - 3))."""
    n = num_target_layers
    if method == "eagle":
        return (n,)
    eagle_config = getattr(hf_config, "eagle_config", None) or {}
    ids = (
        eagle_config.get("eagle_aux_hidden_state_layer_ids")
        if isinstance(eagle_config, dict)
        else None
    )
    layers = tuple(int(i) for i in ids) if ids else (2, n // 2, n - 3)
    if len(set(layers)) != 3 or not all(0 <= i < n for i in layers):
        raise ValueError(
            f"an EAGLE-3 head reads 3 distinct target layers in [0, {n}); got {list(layers)} "
            "(the default (2, n // 2, n - 3) needs a target of at least 8 layers)"
        )
    return tuple(sorted(layers))  # NOTE: concatenated in layer order, as vLLM's
