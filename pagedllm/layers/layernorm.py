"""RMSNorm, with the fused residual-add form the decoder layers use, and Gemma's variant.

`RMSNorm` follows HF transformers' (Llama's) numerics: the residual add runs in the input dtype,
the normalization in float32, and the result is cast back to the input dtype before the weight
multiplies it. `GemmaRMSNorm` scales by `1 + weight` and rounds only at the end (HF's Gemma).
"""

from __future__ import annotations

from typing import overload

import torch
from torch import nn

from pagedllm.layers import fused
from pagedllm.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    """`x / rms(x) * weight` over the last dimension."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, use_fused: bool | None = None) -> None:
        """`use_fused`: the fused kernels on CUDA (None: `fused.enabled`'s default)."""
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.use_fused = use_fused
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    @overload
    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...

    @overload
    def forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`norm(x)`; with `residual`, `(norm(x + residual), x + residual)`."""
        if fused.enabled(x, self.use_fused):
            if residual is None:
                return fused.kernels().rms_norm(x, self.weight, self.eps)
            return fused.kernels().fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: `x / rms(x) * (1 + w)`, all in float32, rounded once to x's dtype.

    NOTE: the parameter holds `1 + w` in float32, not the checkpoint's `w`: its weight loader
    adds the one. Then the fused kernels, which multiply by `weight`, need no variant (they round
    `x / rms(x)` to x's dtype before the product: one rounding apart from HF in bf16, the same in
    float32), and `1 + w` keeps its low bits (bf16 has 2^-7 steps at 1).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, use_fused: bool | None = None) -> None:
        super().__init__(hidden_size, eps, use_fused)
        self.weight = nn.Parameter(
            torch.ones(hidden_size, dtype=torch.float32), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    @staticmethod
    def weight_loader(
        param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        """Stores the checkpoint's `w` as `1 + w` (float32)."""
        default_weight_loader(param, loaded_weight.float() + 1.0, shard_id)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight).to(x.dtype)
