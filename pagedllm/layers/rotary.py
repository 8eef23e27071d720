"""Rotary position embedding (RoPE): config parsing, inverse frequencies and the rotation.

Supports the "default", "linear", "llama3", "longrope" and "yarn" rope types, read from a
transformers-5 config (`config.rope_parameters`, a dict with `rope_theta` and `rope_type`) or a
transformers-4 one (`config.rope_theta` plus an optional `config.rope_scaling` dict). The
rotation is the neox / HF-Llama "rotate half" form: dimension `i` pairs with
`i + rotary_dim / 2`. cos and sin (times the rope type's attention factor: LongRoPE, YaRN) are
precomputed in float32 for every position up to `max_position`.

The module looks cos/sin up by *cache row*: `cache_rows(positions)` maps a step's positions to
rows, the identity except for LongRoPE (`LongRopeRotaryEmbedding`), whose cache holds two
rotations and whose rows depend on each sequence's length. A model maps the positions once per
step and passes the rows on as the positions `Attention` rotates by (the fused kernels index the
cache by them as well).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagedllm.forward_context import get_forward_context
from pagedllm.layers import fused

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")


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
    elif params["rope_type"] in ("longrope", "yarn"):
        _standardize_original_length(hf_config, params)
    if "partial_rotary_factor" not in params and hasattr(hf_config, "partial_rotary_factor"):
        params["partial_rotary_factor"] = hf_config.partial_rotary_factor
    return params


def _standardize_original_length(hf_config: Any, params: dict[str, Any]) -> None:
    """LongRoPE's and YaRN's `original_max_position_embeddings` and `factor`, as transformers
    reads them.

    Some configs (Phi-3) keep the pretraining length at the config's top level, which then wins
    over the rope dict's (else the dict's, else `max_position_embeddings`); without an explicit
    `factor`, it is `max_position_embeddings / original` (LongRoPE: it only sets the default
    attention factor; YaRN: DeepSeek-V3's convention)."""
    max_position = getattr(hf_config, "max_position_embeddings", None)
    original = getattr(hf_config, "original_max_position_embeddings", None)
    if original is not None:
        params["original_max_position_embeddings"] = original
    else:
        params.setdefault("original_max_position_embeddings", max_position)
    if params.get("factor") is None and max_position is not None:
        params["factor"] = max_position / params["original_max_position_embeddings"]


def compute_inv_freq(
    rotary_dim: int,
    rope_parameters: dict[str, Any],
    device: torch.device | str | None = None,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, float]:
    """float32 inverse frequencies `[rotary_dim / 2]` and the scale applied to cos/sin.

    `seq_len`: the sequence length the frequencies are for, as transformers' rope functions
    take it; only LongRoPE reads it (its long factors beyond the original length)."""
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        supported = ", ".join(SUPPORTED_ROPE_TYPES)
        raise NotImplementedError(f"rope_type {rope_type!r} unsupported; supported: {supported}")
    base = float(rope_parameters["rope_theta"])
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float()
    if rope_type == "longrope":
        return _longrope(base ** (exponents / rotary_dim), rope_parameters, seq_len)
    if rope_type == "yarn":
        return _yarn(base ** (exponents / rotary_dim), base, rotary_dim, rope_parameters)
    inv_freq = 1.0 / (base ** (exponents / rotary_dim))
    if rope_type == "linear":
        inv_freq = inv_freq / rope_parameters["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, rope_parameters)
    return inv_freq, 1.0


def _longrope(
    base_powers: torch.Tensor, params: dict[str, Any], seq_len: int | None
) -> tuple[torch.Tensor, float]:
    """transformers' `_compute_longrope_parameters`: `1 / (ext_factor * base ** (2i / dim))` with
    `long_factor` when `seq_len` exceeds `original_max_position_embeddings`, else
    `short_factor`; the attention factor (cos/sin scale) is `attention_factor`, by default
    `sqrt(1 + ln(factor) / ln(original))` (1 for `factor <= 1`), the same in both regimes."""
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or 1.0
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        )
    use_long = seq_len is not None and seq_len > original
    ext = params["long_factor"] if use_long else params["short_factor"]
    if len(ext) != base_powers.numel():
        raise ValueError(
            f"longrope {'long' if use_long else 'short'}_factor has {len(ext)} entries, "
            f"expected rotary_dim / 2 = {base_powers.numel()}"
        )
    ext_factors = torch.tensor(ext, dtype=torch.float32, device=base_powers.device)
    return 1.0 / (ext_factors * base_powers), float(attention_factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction `0.1 * mscale * ln(factor) + 1` (1 for `factor <= 1`)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(
    base_powers: torch.Tensor, base: float, rotary_dim: int, params: dict[str, Any]
) -> tuple[torch.Tensor, float]:
    """transformers' `_compute_yarn_parameters` (YaRN, "NTK-by-parts"): each frequency blends
    the original one (extrapolation: high frequencies, many rotations over the original length)
    and the one divided by `factor` (interpolation: low frequencies), by a linear ramp over the
    dimensions whose rotation counts over `original_max_position_embeddings` lie between
    `beta_fast` and `beta_slow`; `truncate` (default True, gpt-oss: False) rounds the ramp's
    ends outwards to whole dimensions.

    The attention factor (cos/sin scale) is `attention_factor`, else
    `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` when both are set and non-zero
    (DeepSeek), else `mscale(factor)`."""
    factor = float(params["factor"])
    original = params["original_max_position_embeddings"]
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    # NOTE: `or`, as transformers reads them: a 0 (or None) takes the default too.
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        """The dimension whose wavelength fits `num_rotations` times into `original`."""
        return (
            rotary_dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))
        )

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # NOTE: transformers' guard against a zero-width ramp
    half = rotary_dim // 2
    ramp = (torch.arange(half, dtype=torch.float32, device=base_powers.device) - low) / (high - low)
    extrapolation = 1 - ramp.clamp(0, 1)  # 1: keep the original frequency, 0: interpolate
    interpolated, extrapolated = 1.0 / (factor * base_powers), 1.0 / base_powers
    inv_freq = interpolated * (1 - extrapolation) + extrapolated * extrapolation
    return inv_freq, float(attention_factor)


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
        cos, sin = self._cos_sin_cache()
        # NOTE: float32 whatever the model dtype; cast to q's dtype at lookup, as HF does.
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)
        self.fused_ok = fused.rotary_supported(head_dim, self.rotary_dim)

    def _cos_sin_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos and sin tables, `[rows, rotary_dim / 2]` float32 (row = position here)."""
        inv_freq, scaling = compute_inv_freq(self.rotary_dim, self.rope_parameters)
        return _cos_sin(inv_freq, self.max_position, scaling)

    def cache_rows(
        self, positions: torch.Tensor, context_lens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The cos/sin cache rows of a step's `positions` [T]: the positions themselves.

        `context_lens` [T]: the context length of each token's sequence at the end of the step
        (read from the forward context when None); only `LongRopeRotaryEmbedding` uses it."""
        return positions

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated (q, k). With the fused kernel (2-D inputs), they are rotated in place.

        `positions` index the cos/sin cache: map a step's positions with `cache_rows` first."""
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


class LongRopeRotaryEmbedding(RotaryEmbedding):
    """LongRoPE (Phi-3): `short_factor` frequencies for a sequence of at most
    `original_max_position_embeddings` tokens, `long_factor` ones for a longer sequence, both
    scaled by the one attention factor (see `_longrope`).

    The regime is chosen as transformers' rotary module chooses it for one forward, by
    `max(position_ids) + 1`: here per step and per sequence, by the sequence's context length at
    the end of the step (a batch mixes regimes freely). Keys already in the KV cache keep the
    rotation they were written with: a sequence that crosses the original length while
    decoding, or a long prompt prefilled in chunks, attends over keys of both regimes, where
    HF `generate` recomputes the sequence (see `pagedllm/models/phi3.py`).

    The cache holds both rotations: rows `[0, original)` the short one by position, rows
    `[original, original + max_position)` the long one; `cache_rows` picks them, so the rotation
    itself (and the fused kernels, which read the rows they are given) is the plain one.
    """

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        rope_parameters: dict[str, Any],
        rotary_dim: int | None = None,
        use_fused: bool | None = None,
    ) -> None:
        self.original_max_position = int(rope_parameters["original_max_position_embeddings"])
        super().__init__(head_dim, max_position, rope_parameters, rotary_dim, use_fused)

    def _cos_sin_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        original = self.original_max_position
        short_freq, scaling = compute_inv_freq(self.rotary_dim, self.rope_parameters)
        long_freq, _ = compute_inv_freq(self.rotary_dim, self.rope_parameters, seq_len=original + 1)
        short_cos, short_sin = _cos_sin(short_freq, original, scaling)
        long_cos, long_sin = _cos_sin(long_freq, self.max_position, scaling)
        return torch.cat([short_cos, long_cos]), torch.cat([short_sin, long_sin])

    def cache_rows(
        self, positions: torch.Tensor, context_lens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`positions`, moved into the long rows for the tokens of sequences whose context
        exceeds the original length (graph-safe: no host sync)."""
        if context_lens is None:
            context_lens = _token_context_lens(positions)
        original = self.original_max_position
        return torch.where(context_lens > original, positions + original, positions)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, original_max_position={self.original_max_position}"


def _cos_sin(
    inv_freq: torch.Tensor, num_positions: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of positions `[0, num_positions)`, times `scaling`, as HF computes them."""
    t = torch.arange(num_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(t, inv_freq)  # [num_positions, rotary_dim / 2]
    return freqs.cos() * scaling, freqs.sin() * scaling


def _token_context_lens(positions: torch.Tensor) -> torch.Tensor:
    """Per token of the step, its sequence's context length at the end of the step: its
    request's `seq_lens` entry (what transformers' `max(position_ids) + 1` is for one sequence).

    Without attention metadata (the profiling pass) the batch is one sequence. Rows past the
    metadata's tokens (batch or CUDA-graph padding) get the last request's length: their
    rotation is never read."""
    metadata = get_forward_context().attn_metadata
    if metadata is None:
        return (positions.max() + 1).expand_as(positions)
    ends = metadata.query_start_loc[1:]
    tokens = torch.arange(positions.shape[0], dtype=ends.dtype, device=positions.device)
    request = torch.searchsorted(ends, tokens, right=True).clamp_(max=ends.shape[0] - 1)
    return metadata.seq_lens[request]


def get_rope(
    head_dim: int,
    max_position: int,
    rope_parameters: dict[str, Any],
    use_fused: bool | None = None,
) -> RotaryEmbedding:
    """A `RotaryEmbedding` for a head size, position limit and `get_rope_parameters` dict
    (a `LongRopeRotaryEmbedding` for rope_type "longrope")."""
    cls = RotaryEmbedding
    if rope_parameters.get("rope_type") == "longrope":
        cls = LongRopeRotaryEmbedding
    return cls(head_dim, max_position, rope_parameters, use_fused=use_fused)
