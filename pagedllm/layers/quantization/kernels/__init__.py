"""The GPU kernels of the quantization methods, imported on first use (a CPU start never imports
Triton): `fp8_quant` (dynamic FP8 activation quantization, per token or per token-group, fused
with SiLU-and-mul), `fp8_gemm` (`torch._scaled_mm` for per-tensor/per-channel FP8, a Triton GEMM
for 128 x 128 block-scaled FP8), `w4a16` (the packed-integer weight-only GEMM) and `gemv_quant`
(the few-row GEMVs of FP8 and packed-integer weights that the methods take for decode steps).

`use_kernels(device)` is the one switch the methods read when they convert their weights after
loading: a CUDA device with Triton installed, unless `PAGEDLLM_FUSED_OPS=0` (as `fused.enabled`),
or `PAGEDLLM_QUANT_KERNELS=0` (the dequantized torch path, the kernels' oracle, on a GPU).
Elsewhere (the CPU) the methods keep the torch path.
"""

from __future__ import annotations

import functools
import os

import torch

from pagedllm.layers import fused


@functools.cache
def _switched_on() -> bool:
    return os.environ.get("PAGEDLLM_QUANT_KERNELS", "1") != "0"


def use_kernels(device: torch.device) -> bool:
    """Whether a layer whose weights are on `device` computes with these kernels."""
    probe = torch.empty(0, device=device) if device.type == "cuda" else None
    return probe is not None and fused.enabled(probe) and _switched_on()
