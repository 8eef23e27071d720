"""Mixture-of-experts layers: `FusedMoE` (the experts of one layer, stacked; `layer.py`), the
routers (`router.py`) and the CUDA kernels (`kernels.py`: the tokens aligned by expert, two
grouped GEMMs, launch configs from `configs/`). The torch reference (`FusedMoE.forward_torch`)
is the CPU path and the kernels' oracle."""

from pagedllm.layers.fused_moe.layer import FusedMoE
from pagedllm.layers.fused_moe.router import select_experts

__all__ = ["FusedMoE", "select_experts"]
