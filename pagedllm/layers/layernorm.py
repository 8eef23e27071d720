"""RMSNorm, with the fused residual-add form the decoder layers use.

Follows HF transformers' numerics: the residual add runs in the input dtype, the normalization
in float32, and the result is cast back to the input dtype before the weight multiplies it.
"""

from __future__ import annotations

from typing import overload

import torch
from torch import nn

from pagedllm.layers import fused


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
