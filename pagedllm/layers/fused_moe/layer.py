"""`FusedMoE`: one layer's experts with their weights stacked, and their weight loading.

Parameters (vLLM's layout): `w13_weight [E, 2 I, H]` (each expert's gate then up projection,
fused as `MergedColumnParallelLinear` fuses them) and `w2_weight [E, H, I]` (the down
projection). `weight_loader(param, tensor, shard_id, expert_id)` takes HF's per-expert tensors
(`shard_id` "w1" gate, "w3" up, "w2" down; Mixtral's names) and, with `expert_id=None`, the
packed `[E, ...]` tensors some checkpoints (and transformers 5's modules) hold.

`forward(hidden [T, H], router_logits [T, E]) -> [T, H]`: route (`select_experts`), then each
expert's SwiGLU over its tokens, weighted and summed per token. The torch reference groups the
tokens by expert (one pair of GEMMs per expert that has tokens): exact fp32 math, the CPU path.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.layers.fused_moe.router import select_experts


class FusedMoE(nn.Module):
    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool = True,
        params_dtype: torch.dtype | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        dtype = params_dtype or torch.get_default_dtype()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.prefix = prefix
        self.w13_weight = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype),
            requires_grad=False,
        )
        self.w2_weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype),
            requires_grad=False,
        )
        for param in (self.w13_weight, self.w2_weight):
            param.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(
        self,
        param: nn.Parameter,
        loaded_weight: torch.Tensor,
        shard_id: str | None = None,
        expert_id: int | None = None,
    ) -> None:
        """Copies a checkpoint tensor into its place: one expert's w1 / w3 / w2 (`expert_id`
        given), or a packed tensor of every expert (`expert_id=None`: `[E, 2 I, H]` for
        w13, `[E, H, I]` for w2; shard_id "w1"/"w3" for a packed gate or up half)."""
        inter = self.intermediate_size
        if shard_id not in (None, "w1", "w2", "w3"):
            raise ValueError(f"shard_id must be 'w1', 'w2' or 'w3', got {shard_id!r}")
        if expert_id is not None and not 0 <= expert_id < self.num_experts:
            raise ValueError(f"expert id {expert_id} outside [0, {self.num_experts})")
        target = param.data if expert_id is None else param.data[expert_id]
        if param is self.w13_weight and shard_id in ("w1", "w3"):
            half = slice(0, inter) if shard_id == "w1" else slice(inter, 2 * inter)
            target = target[..., half, :]
        if tuple(target.shape) != tuple(loaded_weight.shape):
            raise ValueError(
                f"{self.prefix}: shape mismatch for {shard_id or 'packed'} of expert "
                f"{expert_id}: parameter {tuple(target.shape)}, checkpoint "
                f"{tuple(loaded_weight.shape)}"
            )
        target.copy_(loaded_weight.to(device=target.device, dtype=target.dtype))

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        return self.forward_torch(hidden_states, weights, ids)

    def forward_torch(
        self, hidden_states: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        """The reference: tokens grouped by expert, each expert's SwiGLU on its tokens, the
        results weighted (in fp32) and summed into their tokens' rows."""
        num_tokens = hidden_states.shape[0]
        out = torch.zeros(num_tokens, self.hidden_size, dtype=torch.float32, device=ids.device)
        flat_ids = ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        token_of = order // self.top_k  # the token of each routed slot, by expert
        slot_weights = weights.reshape(-1)[order]
        start = 0
        inter = self.intermediate_size
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[start : start + count]
            x = hidden_states[rows]
            gate_up = F.linear(x, self.w13_weight[expert])
            act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            y = F.linear(act, self.w2_weight[expert]).float()
            out.index_add_(0, rows, y * slot_weights[start : start + count, None])
            start += count
        return out.to(hidden_states.dtype)
