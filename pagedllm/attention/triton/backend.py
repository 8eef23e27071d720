"""`TritonAttention`: the CUDA attention backend, paged FlashAttention in Triton kernels.

Owns the mapping of `AttentionImpl.forward` onto the kernels of `kernels.py`: one cache-write
launch (none when the attention layer's fused prologue stored K/V: `kv_written`), then a decode
launch (requests of a few query rows, split over the KV axis when the batch is too small to fill
the GPU) and/or a varlen launch (prompts and prompt chunks), with the layer's soft cap and sinks
as constexpr options of the kernels, and an FP8 cache (quantized on write, scales folded into
the reads). Runs on CPU tensors too under `TRITON_INTERPRET=1` (tests
only: slow).
"""

from __future__ import annotations

import torch

from pagedllm.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
)
from pagedllm.attention.triton.kernels import paged_attention, reshape_and_cache


class TritonAttention(AttentionImpl):
    """Paged attention in Triton; see `AttentionImpl.forward` for the contract.

    Knobs (plain attributes, for tests and benchmarks):
    `num_kv_splits`: KV splits of pure-decode batches; `None` picks from the batch size and the
    GPU's SM count, `1` turns flash-decoding off.
    `use_decode_launch`: `False` runs every request through the varlen launch.

    NOTE: no host-device sync: launch grids come from the metadata's host ints only, so a step
    can be captured in a CUDA graph; cache slots never written must hold finite values, as for
    the reference (masked keys get weight 0, but 0 x NaN is NaN).
    """

    cuda_graph_safe = True
    accepts_prewritten_kv = True

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int,
        sliding_window: int | None = None,
        *,
        logits_soft_cap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        super().__init__(
            num_heads, head_dim, scale, num_kv_heads, sliding_window,
            logits_soft_cap=logits_soft_cap, sinks=sinks,
        )  # fmt: skip
        self.num_kv_splits: int | None = None
        self.use_decode_launch = True

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
        if not kv_written:
            reshape_and_cache(
                key, value, kv_cache, metadata.slot_mapping, num_tokens, k_scale, v_scale
            )
        output = torch.empty_like(query)
        if query.shape[0] > num_tokens:
            # NOTE: rows past num_actual_tokens (batch padding) are neither cached nor attended.
            output[num_tokens:].zero_()
        paged_attention(
            query,
            kv_cache,
            metadata,
            output,
            self.scale,
            self.sliding_window,
            num_splits=self.num_kv_splits,
            use_decode_launch=self.use_decode_launch,
            logits_soft_cap=self.logits_soft_cap,
            sinks=self.sinks,
            k_scale=k_scale,
            v_scale=v_scale,
        )
        return output


class TritonMetadataBuilder(AttentionMetadataBuilder):
    """The standard metadata plus the decode order its decode launch schedules by."""

    uses_decode_order = True


class TritonBackend(AttentionBackend):
    """Triton kernels over the standard layout; CUDA-graph safe; accepts K/V stored by the
    attention layer's fused prologue."""

    name = "triton"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return TritonAttention

    @staticmethod
    def get_builder_cls() -> type[AttentionMetadataBuilder]:
        return TritonMetadataBuilder
