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


def enabled(x: torch.Tensor) -> bool:
    return x.is_cuda and _available()


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
    """The fused rotary kernel rotates whole heads whose half is a power of two >= 16."""
    half = rotary_dim // 2
    return rotary_dim == head_dim and half >= 16 and half & (half - 1) == 0
