"""Gated activations of MLPs whose gate and up projections are fused into one output."""

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
