"""`TorchRefAttention`: paged attention in pure PyTorch, the CPU backend and the oracle of kernels.

Owns the reference semantics of `AttentionImpl.forward`: write the step's K/V into the paged
cache at `slot_mapping`, then let every query row attend over its request's cached context
through the block table (causal, optional sliding window, GQA). Decode rows (query length 1)
of all requests run as one padded, masked batch; longer query rows (prompt chunks, possibly
after cached context) run one request at a time.

Both paths take SDPA, unless the layer soft-caps its logits or has attention sinks: then
`softmax_attention`, the explicit math in float32 (scores, cap, mask, sink column, softmax).

An FP8 cache is written quantized (`fp8_kv.quantize_kv`: x / scale, saturated to E4M3) and the
gathered K/V are dequantized (× scale, then the query's dtype) before the same math.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from pagedllm.attention.backend import AttentionBackend, AttentionImpl, AttentionMetadata
from pagedllm.attention.fp8_kv import as_bytes, dequantize_kv, quantize_kv

_DECODE_CHUNK_BYTES = 8 << 20
# (k_scale, v_scale) of an FP8 cache; None: 1.0.
_Scales = tuple[torch.Tensor | None, torch.Tensor | None]


def write_to_kv_cache(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # int64 [T]
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Stores token `t`'s K/V in flat slot `slot_mapping[t]` (= block * block_size + offset),
    quantized with `k_scale` / `v_scale` when the cache is FP8.

    NOTE: every slot is valid (>= 0); `view` (not `reshape`) so a non-viewable cache fails loudly
    instead of silently writing into a copy.
    """
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = as_bytes(kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim))
    flat[0].index_copy_(0, slot_mapping, as_bytes(quantize_kv(key, k_scale, kv_cache.dtype)))
    flat[1].index_copy_(0, slot_mapping, as_bytes(quantize_kv(value, v_scale, kv_cache.dtype)))


def gather_kv(
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    block_ids: torch.Tensor,  # int [B, nb], each a valid block id
    dtype: torch.dtype | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the given blocks laid end to end: two `[B, nb * block_size, Hkv, D]` tensors,
    in `dtype` (None: the cache's), FP8 rows dequantized with `k_scale` / `v_scale`."""
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    batch, nb = block_ids.shape
    flat_ids = block_ids.reshape(-1).long()
    shape = (batch, nb * block_size, num_kv_heads, head_dim)
    dtype = dtype or kv_cache.dtype
    key = as_bytes(kv_cache[0]).index_select(0, flat_ids).view(kv_cache.dtype).view(shape)
    value = as_bytes(kv_cache[1]).index_select(0, flat_ids).view(kv_cache.dtype).view(shape)
    return dequantize_kv(key, k_scale, dtype), dequantize_kv(value, v_scale, dtype)


def softmax_attention(
    query: torch.Tensor,  # [B, Hkv, G, Q, D]: G query heads per KV head, Q rows each
    key: torch.Tensor,  # [B, Hkv, L, D]
    value: torch.Tensor,  # [B, Hkv, L, D]
    mask: torch.Tensor,  # bool, broadcastable to [B, Hkv, G, Q, L]: True = visible
    scale: float,
    logits_soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,  # [Hkv * G]: query head h = kv_head * G + g
) -> torch.Tensor:  # [B, Hkv, G, Q, D], query's dtype
    """Softmax attention with the options of `AttentionImpl`, computed in float32.

    Scores `scale * q.k`, soft-capped to `cap * tanh(s / cap)`, masked; with `sinks`, head h's
    softmax runs over its scores plus one more logit `sinks[h]` whose column is then dropped
    (HF gpt-oss's eager attention). Every row must see at least one key or have a sink."""
    scores = torch.einsum("bhgqd,bhld->bhgql", query.float(), key.float()) * scale
    if logits_soft_cap is not None:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        _, num_kv_heads, group = query.shape[:3]
        sink = sinks.float().view(1, num_kv_heads, group, 1, 1)
        scores = torch.cat([scores, sink.expand(*scores.shape[:-1], 1)], dim=-1)
    probs = scores.softmax(dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    return torch.einsum("bhgql,bhld->bhgqd", probs, value.float()).to(query.dtype)


def _key_window_start(seq_len: int, query_len: int, sliding_window: int | None) -> int:
    """The first key position any of the request's query rows can attend to."""
    if sliding_window is None:
        return 0
    return max(0, seq_len - query_len - sliding_window + 1)


class TorchRefAttention(AttentionImpl):
    """Reference paged attention; see `AttentionImpl.forward` for the contract.

    NOTE: cache slots that were never written must hold finite values (allocate the cache with
    `torch.zeros`, not `torch.empty`): padded and masked keys are read and get weight exactly 0,
    but 0 x NaN is NaN.
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        kv_written: bool = False,
        *,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        num_tokens = metadata.num_actual_tokens
        # NOTE: rows past num_actual_tokens (batch padding) are neither cached nor attended; their
        # output is zero.
        if not kv_written:
            write_to_kv_cache(
                key[:num_tokens], value[:num_tokens], kv_cache, metadata.slot_mapping,
                k_scale, v_scale,
            )  # fmt: skip
        scales = (k_scale, v_scale)
        output = torch.zeros_like(query)
        starts = metadata.query_start_loc_cpu.tolist()
        seq_lens = metadata.seq_lens_cpu.tolist()
        decode_reqs: list[int] = []
        for i in range(metadata.num_reqs):
            query_len = starts[i + 1] - starts[i]
            if query_len == 1:
                decode_reqs.append(i)
            elif query_len > 1:
                self._forward_one(
                    query, kv_cache, metadata, i, starts[i], query_len, seq_lens[i], output,
                    scales,
                )  # fmt: skip
        if decode_reqs:
            self._forward_decodes(
                query, kv_cache, metadata, decode_reqs, starts, seq_lens, output, scales
            )
        return output

    def _forward_one(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        req: int,
        start: int,
        query_len: int,
        seq_len: int,
        output: torch.Tensor,
        scales: _Scales = (None, None),
    ) -> None:
        """Request `req`'s `query_len` rows (positions `seq_len - query_len` on) over its cache."""
        block_size = kv_cache.shape[2]
        key_start = _key_window_start(seq_len, query_len, self.sliding_window)
        first_block = key_start // block_size
        last_block = (seq_len - 1) // block_size
        block_ids = metadata.block_table[req : req + 1, first_block : last_block + 1]
        key, value = gather_kv(kv_cache, block_ids, query.dtype, *scales)  # [1, L, Hkv, D]
        device = query.device
        key_pos = first_block * block_size + torch.arange(key.shape[1], device=device)
        query_pos = seq_len - query_len + torch.arange(query_len, device=device)
        mask = key_pos[None, :] <= query_pos[:, None]
        if self.sliding_window is not None:
            mask &= key_pos[None, :] > query_pos[:, None] - self.sliding_window
        q = query[start : start + query_len].transpose(0, 1).unsqueeze(0)  # [1, H, Q, D]
        if self._plain_softmax:
            out = F.scaled_dot_product_attention(
                q,
                key.transpose(1, 2),
                value.transpose(1, 2),
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=True,
            )  # [1, H, Q, D]
        else:
            group = self.num_heads // self.num_kv_heads
            q5 = q.view(1, self.num_kv_heads, group, query_len, self.head_dim)
            out = self._softmax_attention(q5, key.transpose(1, 2), value.transpose(1, 2), mask)
            out = out.view(1, self.num_heads, query_len, self.head_dim)
        output[start : start + query_len] = out[0].transpose(0, 1)

    def _forward_decodes(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        reqs: list[int],
        starts: list[int],
        seq_lens: list[int],
        output: torch.Tensor,
        scales: _Scales = (None, None),
    ) -> None:
        """All single-row requests, in chunks whose gathered K (and V) stay under a byte budget."""
        _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        window = self.sliding_window
        longest = max(seq_lens[i] if window is None else min(seq_lens[i], window) for i in reqs)
        itemsize = max(kv_cache.itemsize, query.itemsize)  # NOTE: an FP8 cache is dequantized
        bytes_per_req = (longest + 2 * block_size) * num_kv_heads * head_dim * itemsize
        # NOTE: a bounded gather bounds peak memory and lets the allocator reuse one buffer
        # (large fresh allocations cost a page fault per 4 KiB, more than the copy itself).
        chunk = max(1, _DECODE_CHUNK_BYTES // bytes_per_req)
        for lo in range(0, len(reqs), chunk):
            self._forward_decode_chunk(
                query, kv_cache, metadata, reqs[lo : lo + chunk], starts, seq_lens, output,
                scales,
            )  # fmt: skip

    def _forward_decode_chunk(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        reqs: list[int],
        starts: list[int],
        seq_lens: list[int],
        output: torch.Tensor,
        scales: _Scales = (None, None),
    ) -> None:
        """Single-row requests at once: their blocks gathered, padded to the longest, masked."""
        block_size = kv_cache.shape[2]
        device = query.device
        lens = [seq_lens[i] for i in reqs]
        key_starts = [_key_window_start(n, 1, self.sliding_window) for n in lens]
        first_blocks = [s // block_size for s in key_starts]
        num_blocks = max(
            (n - 1) // block_size - f + 1 for n, f in zip(lens, first_blocks, strict=True)
        )
        req_idx = torch.tensor(reqs, device=device)
        first = torch.tensor(first_blocks, device=device)
        seq_len = torch.tensor(lens, device=device)
        key_start = torch.tensor(key_starts, device=device)
        cols = first[:, None] + torch.arange(num_blocks, device=device)  # [B, nb]
        # NOTE: columns past a request's last block may be past the table's width or hold any
        # value; they are pointed at block 0 and masked out below.
        last_col = (seq_len - 1) // block_size
        in_range = cols <= last_col[:, None]
        cols = torch.where(in_range, cols, 0)
        block_ids = metadata.block_table[req_idx[:, None], cols]
        block_ids = torch.where(in_range, block_ids, 0)
        key, value = gather_kv(kv_cache, block_ids, query.dtype, *scales)  # [B, L, Hkv, D]
        key_pos = first[:, None] * block_size + torch.arange(key.shape[1], device=device)
        mask = (key_pos >= key_start[:, None]) & (key_pos < seq_len[:, None])  # [B, L]
        # GQA without repeating K/V: the G query heads sharing a KV head act as G query rows.
        rows = torch.tensor([starts[i] for i in reqs], device=device)
        group = self.num_heads // self.num_kv_heads
        q = query[rows].view(len(reqs), self.num_kv_heads, group, self.head_dim)
        if self._plain_softmax:
            out = F.scaled_dot_product_attention(
                q,
                key.transpose(1, 2),
                value.transpose(1, 2),
                attn_mask=mask[:, None, None, :],
                scale=self.scale,
            )  # [B, Hkv, G, D]
        else:
            out = self._softmax_attention(
                q.unsqueeze(3), key.transpose(1, 2), value.transpose(1, 2),
                mask[:, None, None, None, :],
            )  # fmt: skip
        output[rows] = out.reshape(len(reqs), self.num_heads, self.head_dim)

    @property
    def _plain_softmax(self) -> bool:
        """Neither soft cap nor sinks: SDPA computes it."""
        return self.logits_soft_cap is None and self.sinks is None

    def _softmax_attention(
        self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        return softmax_attention(q, key, value, mask, self.scale, self.logits_soft_cap, self.sinks)


class TorchRefBackend(AttentionBackend):
    """The reference backend: the standard layout and metadata, no CUDA graphs."""

    name = "torch"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return TorchRefAttention
