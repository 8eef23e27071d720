"""Random weights without any files (load_format="dummy"), for benchmarks and tests.

Every float parameter is uniform in `[-DUMMY_RANGE, DUMMY_RANGE]`, drawn from a generator seeded
with `model_config.seed`, except norm weights, which are 1 (and norm biases, 0). Quantized
parameters get valid values: one that carries `dummy_init(data, generator, DUMMY_RANGE)` (set by
its quantization method: positive scales that keep the dequantized weight within about
`DUMMY_RANGE`, group indices in range, the weight shape) is filled by it; other integer
parameters (packed weights, zero points) get random bits, FP8 ones random finite e4m3 values.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.config import ModelConfig
from pagedllm.layers.layernorm import RMSNorm

DUMMY_RANGE = 1e-3
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _fill(data: torch.Tensor, gen: torch.Generator) -> None:
    if data.dtype in FP8_DTYPES:
        fmax = float(torch.finfo(data.dtype).max)
        values = torch.empty(data.shape, dtype=torch.float32, device=data.device)
        data.copy_(values.uniform_(-fmax, fmax, generator=gen).to(data.dtype))
    elif data.dtype.is_floating_point:
        data.uniform_(-DUMMY_RANGE, DUMMY_RANGE, generator=gen)
    elif data.dtype == torch.bool:
        data.random_(0, 2, generator=gen)
    else:
        info = torch.iinfo(data.dtype)
        data.random_(info.min, info.max, generator=gen)


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
        gen = generators[param.device]
        dummy_init = getattr(param, "dummy_init", None)
        if dummy_init is not None:
            dummy_init(param.data, gen, DUMMY_RANGE)
        else:
            _fill(param.data, gen)
