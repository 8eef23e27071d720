"""Unquantized linears: a `[output, input]` weight in the model dtype, as `nn.Linear`'s.

The product is `F.linear` (cuBLAS), except for inputs of a few rows on CUDA (decode steps), where
the Triton GEMV of `gemv_kernels` was measured faster: at batch 1 the step is bound by reading
the weights, and the GEMV streams them faster than cuBLAS does. `apply_silu_mul` also folds the
MLP's SiLU-and-mul into the down projection's GEMV (one launch). `apply_linear` is the same
product for a bare weight (the LM head's).

The GEMV switch is `UnquantizedLinearMethod(use_gemv=...)`: None follows `fused.gemv_enabled()`
(`PAGEDLLM_GEMV`), read at each call as before, so tests that flip the variable still see it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.layers import fused
from pagedllm.layers.activation import SiluAndMul
from pagedllm.layers.quantization.base import (
    LinearMethodBase,
    QuantizationConfig,
    set_weight_attrs,
)

# The most rows that may take the GEMV. Measured on the H200 (`python -m pagedllm.benchmarks.gemv`):
# one row always gains; 2-4 rows only for the shapes `gemv_kernels.wins` lists; 8 and more never.
GEMV_MAX_M = 4


def _gemv_kernels(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    use_gemv: bool | None,
    silu_mul: bool = False,
) -> ModuleType | None:
    """The GEMV module when it should compute this product, else None (cuBLAS)."""
    # NOTE: an explicit switch (the engine's KernelConfig.gemv, which implies its fused_ops) wins
    # over the environment's defaults.
    wanted = fused.enabled(x) and fused.gemv_enabled() if use_gemv is None else use_gemv
    if not (wanted and fused.enabled(x, use_gemv) and x.dim() > 0):
        return None
    m = math.prod(x.shape[:-1])
    if m > GEMV_MAX_M:
        return None
    kernels = fused.gemv_kernels()
    n, k = weight.shape
    act = "silu_mul" if silu_mul else ""
    if kernels.supports(x, weight, bias, silu_mul=silu_mul) and kernels.wins(m, n, k, act):
        return kernels
    return None


def apply_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    use_gemv: bool | None = None,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through the GEMV for a few rows on CUDA (see above)."""
    kernels = _gemv_kernels(x, weight, bias, use_gemv)
    if kernels is not None:
        return kernels.gemv(x, weight, bias)
    return F.linear(x, weight, bias)


class UnquantizedLinearMethod(LinearMethodBase):
    """One `weight [sum(output_partition_sizes), input_size_per_partition]` in `params_dtype`."""

    def __init__(self, use_gemv: bool | None = None, use_fused: bool | None = None) -> None:
        """`use_gemv`: the GEMV for few rows; `use_fused`: the fused SiLU-and-mul kernel (on
        CUDA). NOTE: None defers to the environment's defaults (a cached env read)."""
        self.use_gemv = use_gemv
        self.silu_and_mul = SiluAndMul(use_fused)

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: Sequence[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        # NOTE: inference only: no gradients, so loaders can copy into the parameter. Allocated
        # on the current default device (the loader builds the model under `torch.device`).
        weight = nn.Parameter(
            torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            requires_grad=False,
        )
        set_weight_attrs(weight, extra_weight_attrs)
        layer.register_parameter("weight", weight)

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        # NOTE: `apply_linear` inlined: this is every linear's hot path.
        weight: torch.Tensor = layer.weight  # type: ignore[assignment]
        kernels = _gemv_kernels(x, weight, bias, self.use_gemv)
        if kernels is not None:
            return kernels.gemv(x, weight, bias)
        return F.linear(x, weight, bias)

    def apply_silu_mul(
        self, layer: nn.Module, gate_up: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One GEMV launch when the fused GEMV applies, else the activation then `apply`."""
        weight: torch.Tensor = layer.weight  # type: ignore[assignment]
        kernels = _gemv_kernels(gate_up, weight, bias, self.use_gemv, silu_mul=True)
        if kernels is not None:
            return kernels.gemv_silu_mul(gate_up, weight, bias)
        return self.apply(layer, self.silu_and_mul(gate_up), bias)


class UnquantizedConfig(QuantizationConfig):
    """Every layer unquantized (as `quant_config=None`), with explicit kernel switches."""

    name: ClassVar[str] = "unquantized"

    def __init__(self, use_gemv: bool | None = None, use_fused: bool | None = None) -> None:
        self.use_gemv = use_gemv
        self.use_fused = use_fused

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase:
        return UnquantizedLinearMethod(use_gemv=self.use_gemv, use_fused=self.use_fused)
