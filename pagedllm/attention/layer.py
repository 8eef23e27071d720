"""`Attention`: the nn.Module model files call, `attn(q, k, v, positions)`.

It owns everything between the QKV projection and the output projection: the optional per-head
q/k RMSNorm, the rotary embedding, the K/V cache write and paged attention over the cache
through the chosen backend, so that a model file never touches the KV cache, `slot_mapping` or
the attention metadata. On a backend that accepts prewritten K/V (Triton), the norms, the
rotation and the cache write run as one fused kernel (`rope_norm_and_cache_`: decode steps run
~2 µs of GPU time per launch).

Two options of the softmax pass through to the backend's impl: `logits_soft_cap` (Gemma 2's
`cap * tanh(s / cap)` of the scaled scores) and `sinks` (gpt-oss: one value-less logit per head
in the softmax denominator; a parameter of the model's attention module, held by reference).

It also says what it keeps in the cache (`kv_cache_spec`, in the cache dtype); the worker binds
`kv_cache` after allocating it. With an FP8 cache (`fp8_kv.py`) K and V are stored divided by
the layer's `k_scale` / `v_scale` (fp32 scalars, 1.0 unless the checkpoint sets them), by the
backend's cache write or the fused prologue alike. Without attention metadata (the
memory-profiling pass) the whole batch is one causal sequence and nothing is cached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata
from pagedllm.attention.fp8_kv import default_scale
from pagedllm.attention.torch_ref import softmax_attention
from pagedllm.engine.kv_cache_spec import KVCacheSpec, SlidingWindowSpec
from pagedllm.forward_context import get_forward_context
from pagedllm.layers import fused

if TYPE_CHECKING:
    from pagedllm.layers.layernorm import RMSNorm
    from pagedllm.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    """Paged attention for one layer, with its prologue (q/k norms, rotary, cache write).

    `rotary_emb`, `q_norm`, `k_norm` and `sinks` stay modules and parameters of the model (their
    parameters keep the checkpoint's names); this layer holds references only.
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
        logits_soft_cap: float | None = None,
        sinks: torch.Tensor | None = None,
        use_fused: bool | None = None,
        prefix: str = "",
    ) -> None:
        """`logits_soft_cap`: scaled scores `s` become `cap * tanh(s / cap)` before the mask;
        `sinks`: `[num_heads]`, one extra logit per head in its softmax denominator, carrying no
        value (see `AttentionImpl`); `use_fused`: the fused prologue on CUDA (None:
        `fused.enabled`'s default)."""
        super().__init__()
        if (q_norm is None) != (k_norm is None):
            raise ValueError("q_norm and k_norm come together")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.prefix = prefix
        self.backend = backend
        self.impl = backend.get_impl_cls()(
            num_heads, head_dim, scale, num_kv_heads, sliding_window,
            logits_soft_cap=logits_soft_cap, sinks=sinks,
        )  # fmt: skip
        # NOTE: a tuple, so nn.Module does not register the model's parameter a second time.
        self._sinks: tuple[torch.Tensor | None] = (sinks,)
        # NOTE: a tuple, so nn.Module does not register the shared modules a second time.
        self._prologue: tuple[RotaryEmbedding | None, RMSNorm | None, RMSNorm | None] = (
            rotary_emb,
            q_norm,
            k_norm,
        )
        self.use_fused = use_fused
        self.kv_cache: torch.Tensor = torch.empty(0)
        # NOTE: plain tensors, not parameters (no checkpoint needs them; the loader sets them in
        # place from the scales it finds, `fp8_kv.load_kv_scales`); read only by an FP8 cache.
        self.k_scale = default_scale()
        self.v_scale = default_scale()

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
            out = self.impl.forward(
                q, k, v, self.kv_cache, metadata, kv_written=kv_written,
                k_scale=self.k_scale, v_scale=self.v_scale,
            )  # fmt: skip
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
            q_norm_weight=q_w, k_norm_weight=k_w, eps=eps, k_scale=self.k_scale,
            v_scale=self.v_scale,
        )  # fmt: skip

    def _causal_sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The batch as one causal sequence (the profiling pass: no cache).

        With a soft cap or sinks, `_causal_explicit` instead.

        NOTE: K/V heads repeated for the query heads rather than `enable_gqa`, with which SDPA
        takes its math path on CUDA: a [heads, T, T] fp32 score matrix, tens of GiB in the
        memory-profiling pass (T = max_num_batched_tokens), which then shrank the KV cache.
        Repeated, it takes the flash kernel: memory linear in T."""
        if self.logits_soft_cap is not None or self._sinks[0] is not None:
            return self._causal_explicit(q, k, v)
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

    def _causal_explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`_causal_sdpa` with the soft cap, the sinks and the sliding window, by the reference
        math (`softmax_attention`), in chunks of query rows.

        NOTE: chunks of ~64 MiB of fp32 scores bound the profiling pass's peak, which SDPA's
        flash kernel keeps linear in T."""
        num_tokens = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        q5 = q.view(num_tokens, self.num_kv_heads, group, self.head_dim).permute(1, 2, 0, 3)
        key, value = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        key_pos = torch.arange(num_tokens, device=q.device)
        chunk = max(1, (16 << 20) // max(1, self.num_heads * num_tokens))
        out = torch.empty_like(q)
        for lo in range(0, num_tokens, chunk):
            hi = min(num_tokens, lo + chunk)
            query_pos = key_pos[lo:hi, None]
            mask = key_pos[None, :] <= query_pos
            if self.sliding_window is not None:
                mask &= key_pos[None, :] > query_pos - self.sliding_window
            # [1, Hkv, G, hi - lo, D]
            part = softmax_attention(
                q5[None, :, :, lo:hi], key, value, mask, self.scale, self.logits_soft_cap,
                self._sinks[0],
            )  # fmt: skip
            out[lo:hi] = part[0].permute(2, 0, 1, 3).reshape(hi - lo, self.num_heads, -1)
        return out

    def extra_repr(self) -> str:
        extra = ""
        if self.logits_soft_cap is not None:
            extra += f", logits_soft_cap={self.logits_soft_cap}"
        if self._sinks[0] is not None:
            extra += ", sinks=True"
        return (
            f"backend={self.backend.name}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, sliding_window={self.sliding_window}{extra}"
        )
