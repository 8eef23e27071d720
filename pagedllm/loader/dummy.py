"""Random weights without any files (load_format="dummy"), for benchmarks and tests.

Every parameter is uniform in `[-DUMMY_RANGE, DUMMY_RANGE]`, drawn from a generator seeded with
`model_config.seed`, except norm weights, which are 1 (and norm biases, 0).
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.config import ModelConfig
from pagedllm.layers.layernorm import RMSNorm

DUMMY_RANGE = 1e-3


def load_dummy_weights(model: nn.Module, model_config: ModelConfig) -> None:
    norm_params: dict[int, float] = {}
    for module in model.modules():
        if isinstance(module, (RMSNorm, nn.LayerNorm)):
            for name, param in module.named_parameters(recurse=False):
                norm_params[id(param)] = 1.0 if name == "weight" else 0.0
    generators: dict[torch.device, torch.Generator] = {}
    for param in model.parameters():
        if id(param) in norm_params:
            param.data.fill_(norm_params[id(param)])
            continue
        if param.device not in generators:
            generators[param.device] = torch.Generator(param.device).manual_seed(model_config.seed)
        param.data.uniform_(-DUMMY_RANGE, DUMMY_RANGE, generator=generators[param.device])
