"""Routers: which experts each token goes to, and with what weight.

`select_experts(router_logits, top_k, renormalize)`: softmax over the experts, the top `top_k`
per token, optionally renormalized to sum to 1 (Mixtral, Qwen3-MoE: yes; Qwen2-MoE: its
`norm_topk_prob`). The weights are fp32; ties go to the lower expert id (torch.topk's order
is not specified for ties, so the reference and the model agree only up to exact ties, which
random fp32 logits do not have).
"""

from __future__ import annotations

import torch


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`router_logits [T, E]` → (weights fp32 [T, top_k], expert ids int64 [T, top_k])."""
    if not 1 <= top_k <= router_logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, {router_logits.shape[-1]}], got {top_k}")
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids
