"""When the layers use the fused Triton kernels of `fused_kernels` instead of eager torch ops.

On CUDA tensors, when Triton is installed, unless the environment variable `PAGEDLLM_FUSED_OPS`
is "0" (benchmarks set it to measure what the kernels gain). The kernel modules are imported on
first use, so a CPU start never imports Triton.

The small-batch GEMV of the linears (`gemv_kernels`, dispatched in `pagedllm.layers.linear`)
has its own switch on top: `PAGEDLLM_GEMV=0` keeps cuBLAS for the linears only.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch


@functools.cache
def _available() -> bool:
    return (
        os.environ.get("PAGEDLLM_FUSED_OPS", "1") != "0"
        and importlib.util.find_spec("triton") is not None
    )


def enabled(x: torch.Tensor, switch: bool | None = None) -> bool:
    """Whether to run a fused kernel on `x`: a CUDA tensor, Triton installed, and `switch` (the
    engine's `KernelConfig.fused_ops`, which a layer got at construction) on; None: unless
    `PAGEDLLM_FUSED_OPS` is "0"."""
    if not x.is_cuda:
        return False
    return _available() if switch is None else switch and _triton_installed()


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernels() -> ModuleType:
    from pagedllm.layers import fused_kernels

    return fused_kernels


@functools.cache
def gemv_enabled() -> bool:
    """False when `PAGEDLLM_GEMV` is "0" (read once; tests clear the cache)."""
    return os.environ.get("PAGEDLLM_GEMV", "1") != "0"


def gemv_kernels() -> ModuleType:
    from pagedllm.layers import gemv_kernels

    return gemv_kernels


def rotary_supported(head_dim: int, rotary_dim: int) -> bool:
    """The fused rotary kernels (`rotary_embedding_`, `rope_norm_and_cache_`) rotate whole heads
    of any even size (neox style: two halves, each a tile padded to a power of two and masked);
    partial rotary (`rotary_dim < head_dim`) takes the eager path."""
    return rotary_dim == head_dim and head_dim >= 2 and head_dim % 2 == 0
