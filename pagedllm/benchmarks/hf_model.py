"""The HF transformers baseline model for benchmarks: the same weights (or the same shape with
random weights under load_format='dummy') in the same dtype, on the same device."""

from __future__ import annotations

from typing import Any

from pagedllm.config import EngineConfig


def load_hf_model(config: EngineConfig) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from pagedllm.transformers_utils.config import to_transformers_config

    mc = config.model_config
    device = torch.device(config.device_config.device)
    dtype = getattr(torch, mc.dtype)
    if mc.load_format == "dummy":
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(
                to_transformers_config(mc.hf_config), dtype=dtype
            )
    else:
        model = AutoModelForCausalLM.from_pretrained(mc.model, dtype=dtype).to(device)
    return model.eval(), device
