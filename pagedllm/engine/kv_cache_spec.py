"""`KVCacheSpec`: what one attention layer keeps in the KV cache per block, plain data.

Every attention layer describes itself with a spec (`Attention.kv_cache_spec`); the worker sizes
the cache from the specs of all layers (one block id spans every layer, so a block costs the sum
of their page sizes) and each layer's backend shapes its tensor from its spec
(`AttentionBackend.kv_cache_shape`). A new kind of layer state (MLA's compressed latent, an FP8
cache with scales) is a new spec class.

NOTE: pure Python (no torch), like the rest of `engine/`: dtypes are names. A spec's `dtype` is
the cache's (`CacheConfig.kv_cache_dtype`: the model's, or "fp8_e4m3" at one byte a value, so an
FP8 page holds a bf16 page's tokens in half the bytes), sized by `config.dtype_size`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pagedllm.config import dtype_size


@dataclass(frozen=True)
class KVCacheSpec:
    """Full attention: K and V of `num_kv_heads` heads of `head_dim` for `block_size` tokens."""

    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    @property
    def page_size_bytes(self) -> int:
        """Bytes one block of this layer holds (K and V)."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * dtype_size(self.dtype)


@dataclass(frozen=True)
class SlidingWindowSpec(KVCacheSpec):
    """Attention over the last `sliding_window` tokens only. When every layer has the same
    window (`uniform_sliding_window`), the KV manager frees a running request's blocks once
    they fall out of it; beside full-attention layers they are kept until the request ends."""

    sliding_window: int = 0

    def __post_init__(self) -> None:
        if self.sliding_window < 1:
            raise ValueError(f"sliding_window must be positive, got {self.sliding_window}")


@dataclass(frozen=True)
class MLASpec(KVCacheSpec):
    """Multi-head latent attention (DeepSeek V2/V3): per token one row of `head_dim =
    kv_lora_rank + qk_rope_head_dim` values (the compressed latent `c_kv`, then the shared
    rotated key `k_pe`) for all heads together, and no separate V (`num_kv_heads` is 1): a
    page is a single such row per token, half of what `KVCacheSpec` would count."""

    kv_lora_rank: int = 0

    def __post_init__(self) -> None:
        if self.num_kv_heads != 1:
            raise ValueError(f"an MLA cache has one latent head, got {self.num_kv_heads}")
        if not 0 < self.kv_lora_rank < self.head_dim:
            raise ValueError(
                f"kv_lora_rank must be in (0, head_dim={self.head_dim}), got {self.kv_lora_rank}"
            )

    @property
    def qk_rope_head_dim(self) -> int:
        return self.head_dim - self.kv_lora_rank

    @property
    def page_size_bytes(self) -> int:
        """Bytes one block of this layer holds (the latent rows only)."""
        return self.block_size * self.head_dim * dtype_size(self.dtype)


def uniform_sliding_window(specs: Mapping[str, KVCacheSpec]) -> int | None:
    """The window when every layer attends through the same sliding window, else None."""
    windows = {
        spec.sliding_window if isinstance(spec, SlidingWindowSpec) else None
        for spec in specs.values()
    }
    if len(windows) != 1:
        return None
    return windows.pop()


def block_bytes(specs: Mapping[str, KVCacheSpec]) -> int:
    """The memory one block id costs: the page of every layer."""
    if not specs:
        raise ValueError("the model has no attention layer")
    return sum(spec.page_size_bytes for spec in specs.values())
