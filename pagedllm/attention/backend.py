"""The attention backend interface and `AttentionMetadata`, the runner → attention contract.

KV cache layout, per layer: one tensor of shape `[2, num_blocks, block_size, num_kv_heads, head_dim]`
(index 0 holds K, index 1 holds V). Token `t` of a request lives in slot
`block_table[i][t // block_size] * block_size + t % block_size`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """A flat batch of `num_actual_tokens` query tokens from `num_reqs` requests.

    Request `i` owns query rows `query_start_loc[i]:query_start_loc[i + 1]`; these are the last
    tokens of its `seq_lens[i]` tokens of context (cached ones plus this step's), so query row `j`
    of request `i` sits at position `seq_lens[i] - query_len_i + j` and attends to positions `<=`
    its own (within `sliding_window` when the layer has one).

    NOTE: device tensors drive kernels; the `_cpu` copies let reference code loop without syncs.
    """

    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1], device
    seq_lens: torch.Tensor  # int32 [num_reqs], device
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks_per_req], device
    slot_mapping: torch.Tensor  # int64 [num_actual_tokens], device
    query_start_loc_cpu: torch.Tensor  # int32 [num_reqs + 1], host
    seq_lens_cpu: torch.Tensor  # int32 [num_reqs], host
    # int32 [num_reqs], device: a permutation of the requests, longest context first (see
    # `attention.utils.decode_order`); the order a backend may schedule per-request work in so
    # that the longest requests do not start last. None: request order.
    decode_order: torch.Tensor | None = None


def kv_cache_shape(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
) -> tuple[int, ...]:
    return (2, num_blocks, block_size, num_kv_heads, head_dim)


class AttentionImpl(ABC):
    """One layer's attention computation. Built once per layer by the `Attention` module."""

    # True when `forward` reads no device tensor on the host, so a step can be captured in a
    # CUDA graph and replayed with new metadata values (host ints fixed at capture).
    cuda_graph_safe = False
    # True when `forward` reads K/V only from the cache, so a model may store this step's K/V
    # there itself (a fused prologue kernel) and pass `kv_written=True` to skip the write.
    accepts_prewritten_kv = False

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int,
        sliding_window: int | None = None,
    ) -> None:
        assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # kv_cache_shape(...)
        metadata: AttentionMetadata,
        kv_written: bool = False,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Writes this step's K/V into the cache at `slot_mapping`, then attends over the cache.

        With `kv_written` (only where `accepts_prewritten_kv`), the caller has already stored
        them and `key`/`value` are not read.

        NOTE: all of the step's K/V are written before any query reads: a request may read
        blocks that another request of the same step fills (a prefix-cache hit on a block
        computed in this very step).
        """


_BACKENDS: dict[str, str] = {
    "torch": "pagedllm.attention.torch_ref:TorchRefAttention",
    "triton": "pagedllm.attention.triton.backend:TritonAttention",
}


def register_backend(name: str, target: str) -> None:
    """Registers `module:Class` under `name`; the module is imported when the backend is chosen."""
    _BACKENDS[name] = target


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_attention_impl_cls(name: str | None, device: str) -> type[AttentionImpl]:
    """The backend class by name; `None` picks the best one for the device."""
    if name is None:
        name = "triton" if device == "cuda" and "triton" in _BACKENDS else "torch"
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {', '.join(available_backends())}"
        )
    module_name, cls_name = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)
