"""`Attention`: the nn.Module that model files use; it dispatches to the chosen backend."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.attention.backend import AttentionImpl
from pagedllm.forward_context import get_forward_context


class Attention(nn.Module):
    """Paged attention for one layer.

    `kv_cache` is bound by the worker after the cache is allocated. Without attention metadata
    (a profiling pass) the whole batch is treated as one causal sequence and nothing is cached.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int,
        impl_cls: type[AttentionImpl],
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        self.impl = impl_cls(num_heads, head_dim, scale, num_kv_heads, sliding_window)
        self.kv_cache: torch.Tensor = torch.empty(0)

    @property
    def accepts_prewritten_kv(self) -> bool:
        """Whether a model may store K/V in `kv_cache` itself and call `forward(kv_written=True)`."""
        return self.impl.accepts_prewritten_kv

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_written: bool = False
    ) -> torch.Tensor:
        """q: [T, num_heads * head_dim], k/v: [T, num_kv_heads * head_dim] → [T, num_heads * head_dim].

        `kv_written`: the caller stored this step's K/V in `kv_cache` (only with attention
        metadata, on a backend that `accepts_prewritten_kv`); `k` and `v` are then not read.
        """
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        metadata = get_forward_context().attn_metadata
        if kv_written and (metadata is None or not self.impl.accepts_prewritten_kv):
            raise ValueError("kv_written needs attention metadata and a backend that accepts it")
        if metadata is None:
            # NOTE: K/V heads repeated for the query heads rather than `enable_gqa`, with which
            # SDPA takes its math path on CUDA: a [heads, T, T] fp32 score matrix, tens of GiB
            # in the memory-profiling pass (T = max_num_batched_tokens), which then shrank the
            # KV cache. Repeated, it takes the flash kernel: memory linear in T.
            group = self.num_heads // self.num_kv_heads
            if group > 1:
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0),
                k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0),
                is_causal=True,
                scale=self.scale,
            )[0].transpose(0, 1)
        else:
            out = self.impl.forward(q, k, v, self.kv_cache, metadata, kv_written=kv_written)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
