"""The attention backend interface: `AttentionBackend` (a backend's impl, metadata builder and KV
cache layout), `AttentionMetadata` (the runner → attention contract) and the backend registry.

A backend owns three things, so that nothing outside it knows them:
- its KV-cache layout: `AttentionBackend.kv_cache_shape(num_blocks, spec)`; the default is one
  tensor per layer of `[2, num_blocks, block_size, num_kv_heads, head_dim]` (index 0 holds K,
  index 1 holds V), where token `t` of a request lives in slot
  `block_table[i][t // block_size] * block_size + t % block_size`;
- its metadata: `AttentionMetadataBuilder.build` turns a step's host arrays
  (`StepAttentionInputs`) into the `AttentionMetadata` its kernels read;
- its CUDA-graph buffers: the builder keeps the static device tensors a captured graph reads
  (`graph_metadata`), and `fill_graph` copies a step's arrays into them before a replay.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from pagedllm.engine.kv_cache_spec import KVCacheSpec


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
    """The standard paged layout (see the module docstring)."""
    return (2, num_blocks, block_size, num_kv_heads, head_dim)


@dataclass
class StepAttentionInputs:
    """A step's attention inputs on the host (numpy), as the runner computes them; a builder
    turns them into its backend's `AttentionMetadata`."""

    query_start_loc: np.ndarray  # int32 [num_reqs + 1]
    seq_lens: np.ndarray  # int32 [num_reqs]
    block_table: np.ndarray  # int32 [num_reqs, max_blocks]
    slot_mapping: np.ndarray  # int64 [num_tokens]
    max_query_len: int

    @property
    def num_reqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])


# Copies a host array to the device (the runner's pinned stager): `to_device(array) -> tensor`.
ToDevice = Callable[[np.ndarray], torch.Tensor]
# Copies a host array into a device tensor of its shape: `copy_into(array, tensor)`.
CopyInto = Callable[[np.ndarray, torch.Tensor], None]


class AttentionMetadataBuilder:
    """Builds `AttentionMetadata` for one backend: fresh device tensors for an eager step, or the
    static buffers of the CUDA graphs (allocated by `init_graph_buffers`)."""

    # Whether the backend's kernels schedule by `AttentionMetadata.decode_order`.
    uses_decode_order = False

    def __init__(self, device: torch.device, max_model_len: int) -> None:
        self.device = device
        self.max_model_len = max_model_len
        self._graph: dict[str, torch.Tensor] = {}
        self._graph_metadata: dict[int, AttentionMetadata] = {}

    def build(self, inputs: StepAttentionInputs, to_device: ToDevice) -> AttentionMetadata:
        order = self._decode_order(inputs.seq_lens)
        return AttentionMetadata(
            num_reqs=inputs.num_reqs,
            num_actual_tokens=inputs.num_tokens,
            max_query_len=inputs.max_query_len,
            max_seq_len=int(inputs.seq_lens.max()),
            query_start_loc=to_device(inputs.query_start_loc),
            seq_lens=to_device(inputs.seq_lens),
            block_table=to_device(inputs.block_table),
            slot_mapping=to_device(inputs.slot_mapping),
            query_start_loc_cpu=torch.from_numpy(inputs.query_start_loc),
            seq_lens_cpu=torch.from_numpy(inputs.seq_lens),
            decode_order=None if order is None else to_device(order),
        )

    def _decode_order(self, seq_lens: np.ndarray) -> np.ndarray | None:
        if not self.uses_decode_order:
            return None
        from pagedllm.attention.utils import decode_order

        return decode_order(seq_lens)

    # ----- CUDA graphs (decode steps: one query token per request) -----

    def init_graph_buffers(self, max_size: int, max_blocks_per_req: int) -> None:
        """The static tensors graphs of up to `max_size` requests read. Padding rows are inert:
        slot -1 (the K/V write skips it), an empty query range, context length 0 and the last
        places of the decode order, so the kernels read nothing for them."""
        i64, i32, dev = torch.int64, torch.int32, self.device
        self._graph = {
            "slot_mapping": torch.full((max_size,), -1, dtype=i64, device=dev),
            "seq_lens": torch.zeros(max_size, dtype=i32, device=dev),
            "query_start_loc": torch.arange(max_size + 1, dtype=i32, device=dev),
            "decode_order": torch.arange(max_size, dtype=i32, device=dev),
            "block_table": torch.zeros(max_size, max_blocks_per_req, dtype=i32, device=dev),
        }
        self._graph_metadata = {}

    def graph_metadata(self, size: int) -> AttentionMetadata:
        """The metadata the graph of `size` rows is captured with (views of the buffers).

        NOTE: its host ints are frozen at capture: `max_seq_len` is `max_model_len` (a backend
        sizes its launch for the longest context; its kernels read the true lengths)."""
        if size not in self._graph_metadata:
            g = self._graph
            self._graph_metadata[size] = AttentionMetadata(
                num_reqs=size,
                num_actual_tokens=size,
                max_query_len=1,
                max_seq_len=self.max_model_len,
                query_start_loc=g["query_start_loc"][: size + 1],
                seq_lens=g["seq_lens"][:size],
                block_table=g["block_table"][:size],
                slot_mapping=g["slot_mapping"][:size],
                # NOTE: graph-safe backends never read the host copies; these fill the fields.
                query_start_loc_cpu=torch.arange(size + 1, dtype=torch.int32),
                seq_lens_cpu=torch.zeros(size, dtype=torch.int32),
                decode_order=g["decode_order"][:size] if self.uses_decode_order else None,
            )
        return self._graph_metadata[size]

    def fill_graph(
        self,
        inputs: StepAttentionInputs,
        size: int,
        copy_into: CopyInto,
        to_device: ToDevice,
    ) -> AttentionMetadata:
        """Copies a decode step of `inputs.num_reqs <= size` requests into the buffers of the
        graph of `size` rows (padded inert) and returns that graph's metadata."""
        g, n = self._graph, inputs.num_reqs
        copy_into(pad_1d(inputs.slot_mapping, size, -1), g["slot_mapping"][:size])
        copy_into(pad_1d(inputs.seq_lens, size, 0), g["seq_lens"][:size])
        copy_into(pad_1d(inputs.query_start_loc, size + 1, n), g["query_start_loc"][: size + 1])
        order = self._decode_order(inputs.seq_lens)
        if order is not None:
            padded = np.concatenate([order, np.arange(n, size, dtype=np.int32)])
            copy_into(padded, g["decode_order"][:size])
        width = inputs.block_table.shape[1]
        g["block_table"][:n, :width].copy_(to_device(inputs.block_table))
        return self.graph_metadata(size)


def pad_1d(a: np.ndarray, size: int, value: int) -> np.ndarray:
    """`a` extended to `size` entries with `value` (a step's arrays to a padded row count)."""
    out = np.full(size, value, dtype=a.dtype)
    out[: a.size] = a
    return out


class AttentionImpl(ABC):
    """One layer's attention computation. Built once per layer by the `Attention` module.

    Options of the softmax (each impl honours both, with and without a sliding window):
    `logits_soft_cap`: the scaled scores `s` become `cap * tanh(s / cap)` before masking (Gemma
    2); `sinks`: a `[num_heads]` tensor, one extra logit per head in its softmax denominator that
    carries no value (gpt-oss). The impl holds `sinks` by reference (a parameter of the model,
    loaded later) and reads it at every call.
    """

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
        *,
        logits_soft_cap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
        if logits_soft_cap is not None and logits_soft_cap <= 0:
            raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}")
        if sinks is not None and tuple(sinks.shape) != (num_heads,):
            raise ValueError(f"sinks must be [num_heads={num_heads}], got {tuple(sinks.shape)}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.sinks = sinks

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # kv_cache_shape(...)
        metadata: AttentionMetadata,
        kv_written: bool = False,
        *,
        k_scale: torch.Tensor | None = None,  # fp32 scalar (FP8 caches only; None: 1.0)
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Writes this step's K/V into the cache at `slot_mapping`, then attends over the cache.

        With `kv_written` (only where `accepts_prewritten_kv`), the caller has already stored
        them and `key`/`value` are not read. An FP8 cache (`kv_cache.dtype`) holds K / k_scale
        and V / v_scale, saturated to E4M3 (`fp8_kv.quantize_kv`); reads multiply them back.

        NOTE: all of the step's K/V are written before any query reads: a request may read
        blocks that another request of the same step fills (a prefix-cache hit on a block
        computed in this very step).
        """


class AttentionBackend(ABC):
    """One attention backend: its per-layer computation, its metadata builder, its layout."""

    name: str = ""

    @staticmethod
    @abstractmethod
    def get_impl_cls() -> type[AttentionImpl]: ...

    @staticmethod
    def get_builder_cls() -> type[AttentionMetadataBuilder]:
        return AttentionMetadataBuilder

    @staticmethod
    def kv_cache_shape(num_blocks: int, spec: KVCacheSpec) -> tuple[int, ...]:
        """The shape of one layer's cache tensor for `num_blocks` blocks of `spec`."""
        return kv_cache_shape(num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)


_BACKENDS: dict[str, str] = {
    "torch": "pagedllm.attention.torch_ref:TorchRefBackend",
    "triton": "pagedllm.attention.triton.backend:TritonBackend",
}


def register_backend(name: str, target: str) -> None:
    """Registers `module:Class` (an AttentionBackend) under `name`; the module is imported when
    the backend is chosen."""
    _BACKENDS[name] = target


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_attention_backend(name: str | None, device: str) -> type[AttentionBackend]:
    """The backend by name; `None` picks the best one for the device."""
    if name is None:
        name = "triton" if device == "cuda" and "triton" in _BACKENDS else "torch"
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {', '.join(available_backends())}"
        )
    module_name, cls_name = _BACKENDS[name].split(":")
    backend: type[AttentionBackend] = getattr(importlib.import_module(module_name), cls_name)
    return backend


def get_attention_impl_cls(name: str | None, device: str) -> type[AttentionImpl]:
    """The impl class of the backend `get_attention_backend` picks."""
    return get_attention_backend(name, device).get_impl_cls()
