"""Mixture-of-experts layers: `FusedMoE` (the experts of one layer, stacked) and the routers
(`router.py`). Today the compute is the torch reference (`FusedMoE.forward_torch`), the CPU path
and the oracle of the grouped-GEMM kernels to come."""

from pagedllm.layers.fused_moe.layer import FusedMoE
from pagedllm.layers.fused_moe.router import select_experts

__all__ = ["FusedMoE", "select_experts"]
