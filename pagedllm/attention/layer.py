"""`Attention`: the nn.Module model files call, `attn(q, k, v, positions)`.

It owns everything between the QKV projection and the output projection: the optional per-head
q/k RMSNorm, the rotary embedding, the K/V cache write and paged attention over the cache
through the chosen backend, so that a model file never touches the KV cache, `slot_mapping` or
the attention metadata. On a backend that accepts prewritten K/V (Triton), the norms, the
rotation and the cache write run as one fused kernel (`rope_norm_and_cache_`: decode steps run
~2 µs of GPU time per launch).

It also says what it keeps in the cache (`kv_cache_spec`); the worker binds `kv_cache` after
allocating it. Without attention metadata (the memory-profiling pass) the whole batch is one
causal sequence and nothing is cached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata
from pagedllm.engine.kv_cache_spec import KVCacheSpec, SlidingWindowSpec
from pagedllm.forward_context import get_forward_context
from pagedllm.layers import fused

if TYPE_CHECKING:
    from pagedllm.layers.layernorm import RMSNorm
    from pagedllm.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    """Paged attention for one layer, with its prologue (q/k norms, rotary, cache write).

    `rotary_emb`, `q_norm` and `k_norm` stay modules of the model (their parameters keep the
    checkpoint's names); this layer holds references only.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int,
        backend: type[AttentionBackend],
        *,
        rotary_emb: RotaryEmbedding | None = None,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
        sliding_window: int | None = None,
        use_fused: bool | None = None,
        prefix: str = "",
    ) -> None:
        """`use_fused`: the fused prologue on CUDA (None: `fused.enabled`'s default)."""
        super().__init__()
        if (q_norm is None) != (k_norm is None):
            raise ValueError("q_norm and k_norm come together")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        self.prefix = prefix
        self.backend = backend
        self.impl = backend.get_impl_cls()(num_heads, head_dim, scale, num_kv_heads, sliding_window)
        # NOTE: a tuple, so nn.Module does not register the shared modules a second time.
        self._prologue: tuple[RotaryEmbedding | None, RMSNorm | None, RMSNorm | None] = (
            rotary_emb,
            q_norm,
            k_norm,
        )
        self.use_fused = use_fused
        self.kv_cache: torch.Tensor = torch.empty(0)

    def kv_cache_spec(self, block_size: int, dtype: str) -> KVCacheSpec:
        """What this layer keeps per block (the worker sizes and allocates the cache by it)."""
        if self.sliding_window is not None:
            return SlidingWindowSpec(
                block_size, self.num_kv_heads, self.head_dim, dtype, self.sliding_window
            )
        return KVCacheSpec(block_size, self.num_kv_heads, self.head_dim, dtype)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, num_heads * head_dim], k/v: [T, num_kv_heads * head_dim] (views of the QKV
        projection are fine), positions: [T] (needed with a rotary embedding) → the attention
        output [T, num_heads * head_dim]."""
        num_tokens = q.shape[0]
        metadata = get_forward_context().attn_metadata
        rope, q_norm, k_norm = self._prologue
        kv_written = False
        if metadata is not None and self._fuses_prologue(q):
            assert rope is not None and positions is not None
            self._fused_prologue(positions, q, k, v, metadata)
            kv_written = True
        else:
            if q_norm is not None and k_norm is not None:
                q = q_norm(q.reshape(num_tokens, self.num_heads, self.head_dim))
                k = k_norm(k.reshape(num_tokens, self.num_kv_heads, self.head_dim))
                q = q.view(num_tokens, self.num_heads * self.head_dim)
                k = k.view(num_tokens, self.num_kv_heads * self.head_dim)
            if rope is not None:
                if positions is None:
                    raise ValueError("a layer with a rotary embedding needs positions")
                q, k = rope(positions, q, k)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if metadata is None:
            out = self._causal_sdpa(q, k, v)
        else:
            out = self.impl.forward(q, k, v, self.kv_cache, metadata, kv_written=kv_written)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)

    def _fuses_prologue(self, q: torch.Tensor) -> bool:
        rope = self._prologue[0]
        return (
            rope is not None
            and rope.fused_ok
            and self.impl.accepts_prewritten_kv
            and fused.enabled(q, self.use_fused)
        )

    def _fused_prologue(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> None:
        """q/k norms, rotary and the K/V cache store in one launch: `q` is rotated in place,
        K/V land in `kv_cache`."""
        rope, q_norm, k_norm = self._prologue
        assert rope is not None
        q_w = k_w = None
        eps = 1e-6
        if q_norm is not None and k_norm is not None:
            q_w, k_w, eps = q_norm.weight, k_norm.weight, q_norm.eps
        fused.kernels().rope_norm_and_cache_(
            positions, q, k, v, rope.cos_cache, rope.sin_cache, self.kv_cache,
            metadata.slot_mapping, metadata.num_actual_tokens,
            q_norm_weight=q_w, k_norm_weight=k_w, eps=eps,
        )  # fmt: skip

    def _causal_sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The batch as one causal sequence (the profiling pass: no cache).

        NOTE: K/V heads repeated for the query heads rather than `enable_gqa`, with which SDPA
        takes its math path on CUDA: a [heads, T, T] fp32 score matrix, tens of GiB in the
        memory-profiling pass (T = max_num_batched_tokens), which then shrank the KV cache.
        Repeated, it takes the flash kernel: memory linear in T."""
        group = self.num_heads // self.num_kv_heads
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            is_causal=True,
            scale=self.scale,
        )[0].transpose(0, 1)

    def extra_repr(self) -> str:
        return (
            f"backend={self.backend.name}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, sliding_window={self.sliding_window}"
        )
