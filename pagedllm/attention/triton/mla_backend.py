"""`MLATritonBackend`: MLA (multi-head latent attention, `attention/mla.py`) with its decode in
Triton (`mla_kernels.py`), chosen by `mla.mla_backend` on CUDA.

Per step: the latent rows into the cache (a Triton write that skips the negative slots of a
CUDA graph's padding rows), the single-row (decode) requests through `mla_decode` (heads batched
per program over the one latent head, split-KV when the batch is small), and the prompt rows, if
any, through the torch path of `MLATorchImpl` (host copies of the metadata: such mixed steps are
never captured). A pure-decode step reads no device tensor on the host: CUDA-graph safe, its
metadata coming from whatever builder the engine's backend uses (the kernel reads the standard
fields and, when the builder provides it, `decode_order`).
"""

from __future__ import annotations

import os

import torch

from pagedllm.attention.backend import AttentionImpl, AttentionMetadata
from pagedllm.attention.mla import MLATorchBackend, MLATorchImpl
from pagedllm.attention.triton.mla_kernels import mla_decode, write_latents


class MLATritonImpl(MLATorchImpl):
    """`MLATorchImpl`'s contract (see there) with the decode rows in Triton.

    Knob (a plain attribute, for tests and benchmarks): `num_kv_splits`: KV splits of a
    pure-decode batch; `None` picks from the batch size and the GPU's SM count, `1` is off.

    NOTE: CPU tensors outside Triton's interpreter take the torch path (a CPU model on a CUDA
    machine)."""

    cuda_graph_safe = True
    num_kv_splits: int | None = None

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
        if not query.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            return super().forward(query, key, value, kv_cache, metadata, kv_written)
        num_tokens = metadata.num_actual_tokens
        value_dim = value.shape[-1]
        if not kv_written:
            write_latents(key[:, 0], kv_cache, metadata.slot_mapping, num_tokens)
        # NOTE: rows past num_actual_tokens (batch padding) are not attended; their output is 0.
        output = query.new_zeros(query.shape[0], self.num_heads, value_dim)
        mla_decode(query, kv_cache, metadata, output, value_dim, self.scale, self.num_kv_splits)
        if metadata.max_query_len > 1:
            self._prefills(query, kv_cache, metadata, output)
        return output


class MLATritonBackend(MLATorchBackend):
    """MLA's latent layout `[num_blocks, block_size, D]`, decode in Triton; CUDA-graph safe."""

    name = "mla_triton"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return MLATritonImpl
