"""Routers: which experts each token goes to, and with what weight.

`select_experts(router_logits, top_k, renormalize)`: softmax over the experts, the top `top_k`
per token, optionally renormalized to sum to 1 (Mixtral, Qwen3-MoE: yes; Qwen2-MoE: its
`norm_topk_prob`). The weights are fp32; ties go to the lower expert id (torch.topk's order
is not specified for ties, so the reference and the model agree only up to exact ties, which
random fp32 logits do not have).

`select_experts_topk_softmax(router_logits, top_k)`: gpt-oss's order, the top `top_k` logits
first, then a softmax over those k.

With `grouped` (a `GroupedTopK`), DeepSeek's routing (`grouped_topk`, as HF transformers'
DeepseekV2TopkRouter / DeepseekV3TopkRouter compute it):
- scores: softmax (V2) or sigmoid (V3) of the fp32 logits;
- the experts form `num_groups` equal groups; each token keeps its best `topk_groups` groups,
  by the group's max score (V2's "group_limited_greedy") or the sum of its two best scores (V3's
  "noaux_tc"), and picks its `top_k` experts among theirs (one group: plain top-k, V2's
  "greedy");
- V3's `e_score_correction_bias` (per expert) is added to the scores for choosing only (groups
  and experts); the weights are the uncorrected scores of the chosen experts;
- then renormalized over the chosen ones (`renormalize`: V3's `norm_topk_prob`; HF's V2 never
  renormalizes) and multiplied by `scaling_factor` (`routed_scaling_factor`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class GroupedTopK:
    """DeepSeek's routing options (see the module docstring)."""

    scoring: Literal["softmax", "sigmoid"] = "softmax"
    num_groups: int = 1
    topk_groups: int = 1
    group_score: Literal["max", "top2_sum"] = "max"
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {self.scoring!r}")
        if self.group_score not in ("max", "top2_sum"):
            raise ValueError(f"group_score must be 'max' or 'top2_sum', got {self.group_score!r}")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(
                f"topk_groups must be in [1, num_groups={self.num_groups}], got {self.topk_groups}"
            )


def select_experts(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    grouped: GroupedTopK | None = None,
    correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`router_logits [T, E]` → (weights fp32 [T, top_k], expert ids int64 [T, top_k]).

    `grouped`: DeepSeek's routing (`grouped_topk`), with its `correction_bias [E]`."""
    if not 1 <= top_k <= router_logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, {router_logits.shape[-1]}], got {top_k}")
    if grouped is not None:
        return grouped_topk(router_logits, top_k, renormalize, grouped, correction_bias)
    if correction_bias is not None:
        raise ValueError("a correction bias needs grouped (DeepSeek) routing")
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def select_experts_topk_softmax(
    router_logits: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss's routing (HF `GptOssTopKRouter`): the top `top_k` logits per token, then a
    softmax over those k only. `router_logits [T, E]` → (weights fp32, expert ids int64)."""
    if not 1 <= top_k <= router_logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, {router_logits.shape[-1]}], got {top_k}")
    values, ids = torch.topk(router_logits, top_k, dim=-1)
    return torch.softmax(values.float(), dim=-1), ids


def grouped_topk(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    grouped: GroupedTopK,
    correction_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's routing of `router_logits [T, E]` (see the module docstring)."""
    num_tokens, num_experts = router_logits.shape
    groups = grouped.num_groups
    if num_experts % groups:
        raise ValueError(f"{num_experts} experts do not split into {groups} groups")
    group_size = num_experts // groups
    if top_k > grouped.topk_groups * group_size:
        raise ValueError(
            f"top_k={top_k} exceeds the {grouped.topk_groups} x {group_size} experts of the "
            "groups kept"
        )
    if grouped.group_score == "top2_sum" and group_size < 2:
        raise ValueError("a top-2 group score needs groups of at least 2 experts")
    logits = router_logits.float()
    scores = logits.softmax(dim=-1) if grouped.scoring == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if grouped.topk_groups < groups:
        per_group = choice.view(num_tokens, groups, group_size)
        if grouped.group_score == "max":
            group_scores = per_group.max(dim=-1).values
        else:
            group_scores = per_group.topk(2, dim=-1).values.sum(dim=-1)
        kept = torch.topk(group_scores, grouped.topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        # NOTE: -inf where HF's V2 fills 0: the same choice, as top_k never exceeds the
        # experts kept and softmax scores are positive.
        choice = choice.masked_fill(~keep.repeat_interleave(group_size, dim=1), float("-inf"))
    ids = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if grouped.scaling_factor != 1.0:
        weights = weights * grouped.scaling_factor
    return weights, ids
