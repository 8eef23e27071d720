"""Rotary position embedding (RoPE): config parsing, inverse frequencies and the rotation.

Supports the "default", "linear" and "llama3" rope types, read from a transformers-5 config
(`config.rope_parameters`, a dict with `rope_theta` and `rope_type`) or a transformers-4 one
(`config.rope_theta` plus an optional `config.rope_scaling` dict). The rotation is the
neox / HF-Llama "rotate half" form: dimension `i` pairs with `i + rotary_dim / 2`.
cos and sin are precomputed in float32 for every position up to `max_position`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagedllm.layers import fused

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def get_rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The config's RoPE settings as one flat dict with at least `rope_type` and `rope_theta`."""
    params = getattr(hf_config, "rope_parameters", None)
    if not params:  # transformers 4: rope_theta next to an optional rope_scaling dict
        params = getattr(hf_config, "rope_scaling", None) or {}
    params = dict(params)
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    params.pop("type", None)
    if params["rope_type"] == "llama3":
        params.setdefault(
            "original_max_position_embeddings", getattr(hf_config, "max_position_embeddings", None)
        )
    if "partial_rotary_factor" not in params and hasattr(hf_config, "partial_rotary_factor"):
        params["partial_rotary_factor"] = hf_config.partial_rotary_factor
    return params


def compute_inv_freq(
    rotary_dim: int, rope_parameters: dict[str, Any], device: torch.device | str | None = None
) -> tuple[torch.Tensor, float]:
    """float32 inverse frequencies `[rotary_dim / 2]` and the scale applied to cos/sin."""
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        supported = ", ".join(SUPPORTED_ROPE_TYPES)
        raise NotImplementedError(f"rope_type {rope_type!r} unsupported; supported: {supported}")
    base = float(rope_parameters["rope_theta"])
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float()
    inv_freq = 1.0 / (base ** (exponents / rotary_dim))
    if rope_type == "linear":
        inv_freq = inv_freq / rope_parameters["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope_parameters)
    return inv_freq, 1.0


def _llama3_scale(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short ones kept, a smooth ramp
    between `old_context_len / low_freq_factor` and `old_context_len / high_freq_factor`."""
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotates q and k by their token positions: `forward(positions [T], q, k) -> (q, k)`.

    q and k are `[T, num_heads * head_dim]` or `[T, num_heads, head_dim]`; the first
    `rotary_dim` dimensions of each head rotate, the rest pass through.
    """

    cos_cache: torch.Tensor  # [max_position, rotary_dim / 2] float32 (registered buffers)
    sin_cache: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        rope_parameters: dict[str, Any],
        rotary_dim: int | None = None,
        use_fused: bool | None = None,
    ) -> None:
        """`use_fused`: the fused rotary kernel on CUDA (None: `fused.enabled`'s default)."""
        super().__init__()
        self.use_fused = use_fused
        factor = rope_parameters.get("partial_rotary_factor", 1.0)
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or int(head_dim * factor)
        self.max_position = max_position
        self.rope_parameters = dict(rope_parameters)
        inv_freq, scaling = compute_inv_freq(self.rotary_dim, rope_parameters)
        t = torch.arange(max_position, dtype=torch.float32, device=inv_freq.device)
        freqs = torch.outer(t, inv_freq)  # [max_position, rotary_dim / 2]
        # NOTE: float32 whatever the model dtype; cast to q's dtype at lookup, as HF does.
        self.register_buffer("cos_cache", freqs.cos() * scaling, persistent=False)
        self.register_buffer("sin_cache", freqs.sin() * scaling, persistent=False)
        self.fused_ok = fused.rotary_supported(head_dim, self.rotary_dim)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated (q, k). With the fused kernel (2-D inputs), they are rotated in place."""
        if self.fused_ok and query.dim() == 2 and fused.enabled(query, self.use_fused):
            fused.kernels().rotary_embedding_(
                positions, query, key, self.cos_cache, self.sin_cache, self.head_dim
            )
            return query, key
        cos = self.cos_cache[positions].unsqueeze(-2)  # [T, 1, rotary_dim / 2]
        sin = self.sin_cache[positions].unsqueeze(-2)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(shape[0], -1, self.head_dim)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)
        return out.view(shape)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, "
            f"max_position={self.max_position}, rope_type={self.rope_parameters['rope_type']!r}"
        )


def get_rope(
    head_dim: int,
    max_position: int,
    rope_parameters: dict[str, Any],
    use_fused: bool | None = None,
) -> RotaryEmbedding:
    """A `RotaryEmbedding` for a head size, position limit and `get_rope_parameters` dict."""
    return RotaryEmbedding(head_dim, max_position, rope_parameters, use_fused=use_fused)
