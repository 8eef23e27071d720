"""Multi-head latent attention (MLA, DeepSeek V2 / V3): `MLAAttention`, its paged latent cache
and its torch computation (`MLATorchBackend`).

MLA caches, per token and layer, one row of `kv_lora_rank + qk_rope_head_dim` values: the
normalized compressed latent `c_kv` and the rotated key part `k_pe` shared by every head
(`engine.kv_cache_spec.MLASpec`; cache tensor `[num_blocks, block_size, kv_lora_rank +
qk_rope_head_dim]`, no separate V). HF expands the latent to per-head keys and values with
`kv_b_proj` (`[k_nope | v] = W_UK c_kv | W_UV c_kv`) and runs plain attention. Here every row runs
the *absorbed* form, mathematically the same:

    score(h, t, s) = (q_nope[t, h] W_UK[h]) . c_kv[s] + q_pe[t, h] . k_pe[s]
    out[t, h]      = W_UV[h] (sum_s p(h, t, s) c_kv[s])

i.e. multi-query attention with one latent "head" of `kv_lora_rank + qk_rope_head_dim` whose
value is its first `kv_lora_rank` dimensions; the keys are never expanded per head.

The rotation is on `qk_rope_head_dim` dimensions only. DeepSeek's checkpoints lay them out in
interleaved pairs `(x0, x1), (x2, x3), ...` (HF: V2's complex product, V3's
`apply_rotary_pos_emb_interleave`); with `rope_interleaved` both q_pe and k_pe are
de-interleaved first (evens, then odds), after which the pairs are the rotate-half pairs of
`RotaryEmbedding`. Only dot products of q_pe with k_pe are ever taken, so the permutation (the
same for both) changes nothing but the cache's layout.

NOTE: the torch path reads the metadata's host copies (not CUDA-graph safe); it is the CPU path,
the prompt path everywhere, and the oracle of the Triton latent decode
(`attention/triton/mla_backend.py`, chosen on CUDA by `mla_backend`; CUDA-graph safe).
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.attention.backend import AttentionBackend, AttentionImpl, AttentionMetadata
from pagedllm.attention.layer import Attention
from pagedllm.engine.kv_cache_spec import KVCacheSpec, MLASpec
from pagedllm.forward_context import get_forward_context

if TYPE_CHECKING:
    from pagedllm.layers.rotary import RotaryEmbedding

# Bytes of fp32 scores (or gathered latents) one chunk of rows may hold.
_CHUNK_BYTES = 64 << 20


def write_latents(
    latent: torch.Tensor,  # [T, D]
    kv_cache: torch.Tensor,  # [num_blocks, block_size, D]
    slot_mapping: torch.Tensor,  # int64 [T]
) -> None:
    """Stores token `t`'s latent row in flat slot `slot_mapping[t]`.

    NOTE: `view`, so a non-viewable cache fails loudly instead of writing into a copy."""
    num_blocks, block_size, dim = kv_cache.shape
    kv_cache.view(num_blocks * block_size, dim).index_copy_(
        0, slot_mapping, latent.to(kv_cache.dtype)
    )


def gather_latents(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """The latent rows of the given blocks (int `[B, nb]`) end to end: `[B, nb * block_size, D]`."""
    _, block_size, dim = kv_cache.shape
    batch, nb = block_ids.shape
    rows = kv_cache.index_select(0, block_ids.reshape(-1).long())
    return rows.view(batch, nb * block_size, dim)


def latent_attention(
    query: torch.Tensor,  # [B, M, D]: M rows (query tokens x heads) per batch entry
    latents: torch.Tensor,  # [B, L, D]
    mask: torch.Tensor,  # bool, broadcastable to [B, M, L]
    value_dim: int,
    scale: float,
) -> torch.Tensor:  # [B, M, value_dim]
    """Softmax attention of each row over `latents`, the value being their first `value_dim`
    dimensions (MLA's c_kv)."""
    out = F.scaled_dot_product_attention(
        query.unsqueeze(1),
        latents.unsqueeze(1),
        latents[..., :value_dim].unsqueeze(1),
        attn_mask=mask.unsqueeze(1),
        scale=scale,
    )
    return out.squeeze(1)


def causal_latent_attention(
    query: torch.Tensor,  # [Q, H, D]
    latents: torch.Tensor,  # [L, D]
    query_pos: torch.Tensor,  # [Q]
    key_pos: torch.Tensor,  # [L]
    value_dim: int,
    scale: float,
) -> torch.Tensor:  # [Q, H, value_dim]
    """One sequence's query rows over its latents, causally (key position <= query position),
    in chunks of query rows that bound the score matrix."""
    num_q, num_heads, dim = query.shape
    chunk = max(1, _CHUNK_BYTES // (4 * num_heads * max(1, latents.shape[0])))
    out = query.new_empty(num_q, num_heads, value_dim)
    for lo in range(0, num_q, chunk):
        hi = min(num_q, lo + chunk)
        mask = key_pos[None, :] <= query_pos[lo:hi, None]  # [c, L]
        rows_mask = mask[:, None, :].expand(hi - lo, num_heads, -1).reshape(1, -1, mask.shape[1])
        rows = query[lo:hi].reshape(1, (hi - lo) * num_heads, dim)
        part = latent_attention(rows, latents[None], rows_mask, value_dim, scale)
        out[lo:hi] = part.view(hi - lo, num_heads, value_dim)
    return out


class MLATorchImpl(AttentionImpl):
    """Latent attention over the paged latent cache, in torch (see the module docstring).

    `forward(query [T, H, D], key [T, 1, D], value [T, 1, Dv], kv_cache, metadata)`: `key` holds
    the step's latent rows (written to the cache), `value` their first `Dv` dimensions (a view;
    not stored apart), `query` the absorbed queries; returns `[T, H, Dv]`. Prompt rows run per
    request, single-row (decode) requests as one padded, masked batch, as in `TorchRefAttention`.
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
        k_scale: torch.Tensor | None = None,  # NOTE: unused: an MLA cache is never FP8
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        num_tokens = metadata.num_actual_tokens
        value_dim = value.shape[-1]
        if not kv_written:
            write_latents(key[:num_tokens, 0], kv_cache, metadata.slot_mapping)
        # NOTE: rows past num_actual_tokens (batch padding) are not attended; their output is 0.
        output = query.new_zeros(query.shape[0], self.num_heads, value_dim)
        decodes = self._prefills(query, kv_cache, metadata, output)
        if not decodes:
            return output
        starts = metadata.query_start_loc_cpu.tolist()
        seq_lens = metadata.seq_lens_cpu.tolist()
        # NOTE: a bounded gather bounds peak memory (the padded latents of a chunk of requests).
        longest = max(seq_lens[i] for i in decodes) + kv_cache.shape[1]
        chunk = max(1, _CHUNK_BYTES // (longest * kv_cache.shape[-1] * kv_cache.element_size()))
        for lo in range(0, len(decodes), chunk):
            self._decode(query, kv_cache, metadata, decodes[lo : lo + chunk], starts, seq_lens,
                         value_dim, output)  # fmt: skip
        return output

    def _prefills(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        output: torch.Tensor,
    ) -> list[int]:
        """Writes the rows of the requests of more than one query row into `output` (reading
        the metadata's host copies); returns the single-row (decode) requests, left to do."""
        starts = metadata.query_start_loc_cpu.tolist()
        seq_lens = metadata.seq_lens_cpu.tolist()
        decodes: list[int] = []
        for i in range(metadata.num_reqs):
            start, query_len = starts[i], starts[i + 1] - starts[i]
            if query_len == 1:
                decodes.append(i)
            elif query_len > 1:
                output[start : start + query_len] = self._prefill(
                    query[start : start + query_len], kv_cache, metadata, i, seq_lens[i],
                    output.shape[-1],
                )  # fmt: skip
        return decodes

    def _prefill(
        self,
        query: torch.Tensor,  # [Q, H, D]
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        req: int,
        seq_len: int,
        value_dim: int,
    ) -> torch.Tensor:
        """Request `req`'s rows (its last `Q` positions) over its whole cached context."""
        block_size = kv_cache.shape[1]
        num_blocks = (seq_len - 1) // block_size + 1
        latents = gather_latents(kv_cache, metadata.block_table[req : req + 1, :num_blocks])[0]
        device = query.device
        key_pos = torch.arange(latents.shape[0], device=device)
        query_pos = seq_len - query.shape[0] + torch.arange(query.shape[0], device=device)
        return causal_latent_attention(query, latents, query_pos, key_pos, value_dim, self.scale)

    def _decode(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        reqs: list[int],
        starts: list[int],
        seq_lens: list[int],
        value_dim: int,
        output: torch.Tensor,
    ) -> None:
        """Single-row requests at once: their blocks gathered, padded to the longest, masked;
        the heads of a row are the rows of its one latent head (no per-head copy of the keys)."""
        block_size = kv_cache.shape[1]
        device = query.device
        lens_cpu = [seq_lens[i] for i in reqs]
        lens = torch.tensor(lens_cpu, device=device)
        num_blocks = (max(lens_cpu) - 1) // block_size + 1
        cols = torch.arange(num_blocks, device=device)[None, :].expand(len(reqs), -1)
        # NOTE: columns past a request's last block may be past the table's width or hold any
        # value: they are pointed at block 0 and masked out below.
        in_range = cols <= ((lens - 1) // block_size)[:, None]
        req_idx = torch.tensor(reqs, device=device)
        table = metadata.block_table[req_idx[:, None], torch.where(in_range, cols, 0)]
        block_ids = torch.where(in_range, table, 0)
        latents = gather_latents(kv_cache, block_ids)  # [B, L, D]
        mask = torch.arange(latents.shape[1], device=device)[None, :] < lens[:, None]
        rows = torch.tensor([starts[i] for i in reqs], device=device)
        output[rows] = latent_attention(
            query[rows], latents, mask[:, None, :], value_dim, self.scale
        )


class MLATorchBackend(AttentionBackend):
    """MLA's backend: the torch impl over the latent layout `[num_blocks, block_size, D]`.

    NOTE: chosen by the MLA layer itself whatever the engine's backend; it reads only the
    standard `AttentionMetadata` fields, which every builder fills."""

    name = "mla_torch"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return MLATorchImpl

    @staticmethod
    def kv_cache_shape(num_blocks: int, spec: KVCacheSpec) -> tuple[int, ...]:
        return (num_blocks, spec.block_size, spec.head_dim)


def use_triton_decode() -> bool:
    """Whether MLA layers built now run their decode in Triton (`MLATritonBackend`): on CUDA
    with triton installed and `PAGEDLLM_MLA_TRITON=1`. NOTE: opt-in until the compiled kernel
    has run on a GPU (tested under Triton's interpreter only so far); a module function, so
    tests can force it (the interpreter)."""
    return (
        os.environ.get("PAGEDLLM_MLA_TRITON", "0") == "1"
        and torch.cuda.is_available()
        and importlib.util.find_spec("triton") is not None
    )


def mla_backend() -> type[AttentionBackend]:
    """The backend of an MLA layer: Triton's latent decode (CUDA-graph safe) where
    `use_triton_decode`, else the torch path."""
    if use_triton_decode():
        from pagedllm.attention.triton.mla_backend import MLATritonBackend

        return MLATritonBackend
    return MLATorchBackend


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """`[..., (x0, x1), (x2, x3), ...]` → `[..., x0, x2, ..., x1, x3, ...]` (a copy)."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


class MLAAttention(Attention):
    """MLA for one layer: rotary on q_pe / k_pe, the latent cache write and the absorbed
    attention; models call `mla(q, kv_c, k_pe, positions)`.

    `kv_b_proj` (this rank's `[num_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]`
    weight: each head's W_UK rows, then its W_UV rows, as HF lays them out) and `rotary_emb`
    stay modules of the model; this layer holds references only.
    NOTE: `kv_b_proj` is read as an unquantized `[out, in]` weight.
    """

    def __init__(
        self,
        num_heads: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        kv_lora_rank: int,
        scale: float,
        kv_b_proj: nn.Module,
        rotary_emb: RotaryEmbedding,
        *,
        rope_interleaved: bool = True,
        prefix: str = "",
    ) -> None:
        super().__init__(
            num_heads, kv_lora_rank + qk_rope_head_dim, scale, 1, mla_backend(), prefix=prefix
        )
        if rotary_emb.rotary_dim != qk_rope_head_dim:
            raise ValueError(
                f"the rotary embedding rotates {rotary_emb.rotary_dim} dimensions, "
                f"qk_rope_head_dim is {qk_rope_head_dim}"
            )
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.kv_lora_rank = kv_lora_rank
        self.rope_interleaved = rope_interleaved
        # NOTE: tuples, so nn.Module does not register the model's modules a second time.
        self._kv_b_proj: tuple[nn.Module] = (kv_b_proj,)
        self._rope: tuple[RotaryEmbedding] = (rotary_emb,)

    def kv_cache_spec(self, block_size: int, dtype: str) -> KVCacheSpec:
        if dtype.startswith("fp8"):
            raise ValueError(
                f"kv_cache_dtype={dtype!r} is not supported for MLA (multi-head latent "
                "attention) layers yet; use kv_cache_dtype='auto'"
            )
        return MLASpec(block_size, 1, self.head_dim, dtype, kv_lora_rank=self.kv_lora_rank)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK `[H, qk_nope_head_dim, kv_lora_rank]`, W_UV `[H, v_head_dim, kv_lora_rank]`),
        views of kv_b_proj's weight."""
        full: torch.Tensor = self._kv_b_proj[0].weight  # type: ignore[assignment]
        weight = full.view(
            self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank
        )
        return weight[:, : self.qk_nope_head_dim], weight[:, self.qk_nope_head_dim :]

    def forward(  # type: ignore[override]
        self,
        q: torch.Tensor,
        kv_c: torch.Tensor,
        k_pe: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """q: `[T, num_heads * (qk_nope_head_dim + qk_rope_head_dim)]` (each head's nope part,
        then its rope part), kv_c: `[T, kv_lora_rank]` (after kv_a_layernorm), k_pe:
        `[T, qk_rope_head_dim]` (not yet rotated), positions: `[T]` (cos/sin cache rows) → the
        attention output `[T, num_heads * v_head_dim]`, ready for o_proj."""
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.qk_nope_head_dim + self.qk_rope_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe, k_pe = self._rotate(positions, q_pe, k_pe.view(num_tokens, 1, -1))
        w_uk, w_uv = self.absorbed_weights()
        q_latent = torch.einsum("thn,hnr->thr", q_nope, w_uk)
        query = torch.cat([q_latent, q_pe.to(q_latent.dtype)], dim=-1)  # [T, H, D]
        latent = torch.cat([kv_c, k_pe[:, 0].to(kv_c.dtype)], dim=-1)  # [T, D]
        metadata = get_forward_context().attn_metadata
        if metadata is None:
            # The profiling pass: the batch as one causal sequence, nothing cached.
            pos = torch.arange(num_tokens, device=q.device)
            out = causal_latent_attention(query, latent, pos, pos, self.kv_lora_rank, self.scale)
        else:
            key = latent.unsqueeze(1)
            out = self.impl.forward(
                query, key, key[..., : self.kv_lora_rank], self.kv_cache, metadata
            )
        out = torch.einsum("thr,hvr->thv", out, w_uv)
        return out.reshape(num_tokens, self.num_heads * self.v_head_dim)

    def _rotate(
        self, positions: torch.Tensor, q_pe: torch.Tensor, k_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope_interleaved:
            q_pe, k_pe = _deinterleave(q_pe), _deinterleave(k_pe)
        # NOTE: 3-D inputs take the rotary module's torch path (its fused kernel rotates in
        # place 2-D views, which these are not).
        return self._rope[0](positions, q_pe.contiguous(), k_pe.contiguous())

    def extra_repr(self) -> str:
        return (
            f"backend={self.backend.name}, heads={self.num_heads}, "
            f"kv_lora_rank={self.kv_lora_rank}, qk_nope={self.qk_nope_head_dim}, "
            f"qk_rope={self.qk_rope_head_dim}, v={self.v_head_dim}, "
            f"interleaved={self.rope_interleaved}"
        )
