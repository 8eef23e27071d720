"""Gated activations of MLPs whose gate and up projections are fused into one output: SwiGLU
(`SiluAndMul`) and GeGLU (`GeluAndMul`, Gemma)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.layers import fused


class SiluAndMul(nn.Module):
    """`[..., 2 * d] → [..., d]`: `silu(x[..., :d]) * x[..., d:]` (gate first, then up).
    `use_fused`: the fused kernel on CUDA (None: `fused.enabled`'s default)."""

    def __init__(self, use_fused: bool | None = None) -> None:
        super().__init__()
        self.use_fused = use_fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.enabled(x, self.use_fused):
            return fused.kernels().silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class GeluAndMul(nn.Module):
    """`[..., 2 * d] → [..., d]`: `gelu(x[..., :d]) * x[..., d:]` (gate first, then up), with
    `approximate="tanh"` (HF's `gelu_pytorch_tanh`, Gemma's) or `"none"` (exact, `gelu`)."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate=self.approximate) * x[..., d:]

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"
