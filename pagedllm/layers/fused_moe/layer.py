"""`FusedMoE`: one layer's experts with their weights stacked, and their weight loading.

Parameters (vLLM's layout): `w13_weight [E, 2 I, H]` (each expert's gate then up projection,
fused as `MergedColumnParallelLinear` fuses them) and `w2_weight [E, H, I]` (the down
projection); with `bias=True` also `w13_bias [E, 2 I]` (gate then up) and `w2_bias [E, H]`.
`weight_loader(param, tensor, shard_id, expert_id)` takes HF's per-expert tensors
(`shard_id` "w1" gate, "w3" up, "w2" down; Mixtral's names) and, with `expert_id=None`, the
packed `[E, ...]` tensors some checkpoints (and transformers 5's modules) hold; `transposed`
and `interleaved` read gpt-oss's packed layout (see `weight_loader`).

The gate/up halves stay `[gate; up]` for every activation: gpt-oss's checkpoint interleaves
them (gate in the even columns, up in the odd ones), and its loader de-interleaves them. NOTE:
one layout means one GEMM and one activation epilogue shape for every kernel (the halves are
contiguous slices, as tensor parallelism would shard them), at the cost of one reordering copy
at load time.

`activation`: "silu" (SwiGLU, `silu(gate) * up`: Mixtral, Qwen-MoE) or "swigluoai" (gpt-oss:
gate clamped to at most `swiglu_limit`, up to `[-limit, limit]`,
`(up + 1) * gate * sigmoid(swiglu_alpha * gate)`); `moe_activation` computes either.
`routing`: "softmax_topk" (`select_experts`, with `renormalize`) or "topk_softmax"
(`select_experts_topk_softmax`, gpt-oss); `route` applies it.

`forward(hidden [T, H], router_logits [T, E]) -> [T, H]`: route, then each expert's gated MLP
over its tokens, weighted and summed per token.

Tensor parallelism: each rank holds `intermediate_size / tp` of every expert (the gate, up and
down projections split as column- and row-parallel linears split them), or with expert
parallelism (`--enable-expert-parallel`) `E / tp` whole experts (`local_experts`); either way a
rank's output is a partial sum, all-reduced over the TP group at the end (`reduce_results`). A
w2 bias is added by TP rank 0 only. EP on the kernel path sends the tokens of other ranks'
experts to local expert 0 with weight 0 (exact, but it computes them: a dispatch that skips
them is a kernel change left for later). The torch reference (`forward_torch`) groups the
tokens by expert (one pair of GEMMs per expert that has tokens): exact fp32 math, the CPU path.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.distributed import (
    expert_parallel_enabled,
    get_tp_rank,
    get_tp_size,
    tensor_model_parallel_all_reduce,
)
from pagedllm.layers.fused_moe.router import select_experts, select_experts_topk_softmax

ACTIVATIONS = ("silu", "swigluoai")
ROUTINGS = ("softmax_topk", "topk_softmax")


def moe_activation(
    gate_up: torch.Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0
) -> torch.Tensor:
    """`gate_up [..., 2 I]` (gate half, then up half) → `[..., I]`; `alpha` and `limit` are
    "swigluoai"'s (HF `GptOssExperts._apply_gate`, on de-interleaved halves)."""
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "swigluoai":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


class FusedMoE(nn.Module):
    w13_bias: nn.Parameter | None
    w2_bias: nn.Parameter | None

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool = True,
        params_dtype: torch.dtype | None = None,
        prefix: str = "",
        *,
        bias: bool = False,
        activation: str = "silu",
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
        routing: str = "softmax_topk",
        reduce_results: bool = True,
    ) -> None:
        """`renormalize` applies to "softmax_topk" routing only (a softmax over the chosen k
        sums to 1 already); `swiglu_alpha` / `swiglu_limit` to "swigluoai" only."""
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        dtype = params_dtype or torch.get_default_dtype()
        tp_size, tp_rank = get_tp_size(), get_tp_rank()
        self.tp_size, self.tp_rank, self.reduce_results = tp_size, tp_rank, reduce_results
        self.expert_parallel = expert_parallel_enabled()
        if self.expert_parallel:
            if num_experts % tp_size:
                raise ValueError(
                    f"{prefix}: {num_experts} experts do not split over {tp_size} "
                    f"expert-parallel ranks"
                )
            local, self.expert_start = num_experts // tp_size, tp_rank * (num_experts // tp_size)
        else:
            if intermediate_size % tp_size:
                raise ValueError(
                    f"{prefix}: intermediate size {intermediate_size} does not split over "
                    f"{tp_size} tensor-parallel ranks"
                )
            local, self.expert_start = num_experts, 0
            intermediate_size //= tp_size
        # NOTE: num_experts stays the router's (global) count; the parameters hold `local_experts`.
        self.num_experts, self.local_experts = num_experts, local
        self.top_k, self.renormalize = top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.activation, self.routing = activation, routing
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit
        self.prefix = prefix
        self.w13_weight = _param(local, 2 * intermediate_size, hidden_size, dtype=dtype)
        self.w2_weight = _param(local, hidden_size, intermediate_size, dtype=dtype)
        self.w13_bias = _param(local, 2 * intermediate_size, dtype=dtype) if bias else None
        self.w2_bias = _param(local, hidden_size, dtype=dtype) if bias else None
        for param in (self.w13_weight, self.w2_weight, self.w13_bias, self.w2_bias):
            if param is not None:
                param.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(
        self,
        param: nn.Parameter,
        loaded_weight: torch.Tensor,
        shard_id: str | None = None,
        expert_id: int | None = None,
        *,
        transposed: bool = False,
        interleaved: bool = False,
    ) -> None:
        """Copies a checkpoint tensor into its place: one expert's w1 / w3 / w2 (`expert_id`
        given), or a packed tensor of every expert (`expert_id=None`: `[E, 2 I, H]` for
        w13, `[E, H, I]` for w2, `[E, 2 I]` / `[E, H]` for the biases; shard_id "w1"/"w3" for
        a gate or up half).

        `transposed`: a weight stored `[..., in, out]` (`x @ W`, gpt-oss's packed experts:
        `gate_up_proj [E, H, 2 I]`, `down_proj [E, I, H]`), not Linear's `[..., out, in]`; no
        effect on a bias. `interleaved`: a whole w13 weight or bias whose gate and up rows
        alternate (gate even, up odd: gpt-oss), reordered into the `[gate; up]` halves.

        Under tensor parallelism each tensor is narrowed to this rank's part (its experts with
        EP, else its slice of the intermediate dimension); another rank's expert is skipped."""
        inter = self.intermediate_size
        if shard_id not in (None, "w1", "w2", "w3"):
            raise ValueError(f"shard_id must be 'w1', 'w2' or 'w3', got {shard_id!r}")
        if expert_id is not None and not 0 <= expert_id < self.num_experts:
            raise ValueError(f"expert id {expert_id} outside [0, {self.num_experts})")
        is_bias = param is self.w13_bias or param is self.w2_bias
        is_w13 = param is self.w13_weight or param is self.w13_bias
        gate_up_dim = -1 if is_bias else -2  # the 2 I dimension of a w13 parameter
        if transposed and not is_bias:
            loaded_weight = loaded_weight.transpose(-1, -2)
        if interleaved:
            if not is_w13 or shard_id is not None:
                raise ValueError("interleaved applies to a whole w13 weight or bias")
            size = loaded_weight.shape[gate_up_dim]
            order = torch.cat([torch.arange(0, size, 2), torch.arange(1, size, 2)])
            loaded_weight = loaded_weight.index_select(gate_up_dim, order.to(loaded_weight.device))
        if expert_id is not None and self.expert_parallel:
            expert_id -= self.expert_start
            if not 0 <= expert_id < self.local_experts:
                return  # another rank's expert
        loaded_weight = self._shard(loaded_weight, is_w13, is_bias, shard_id, expert_id is None)
        target = param.data if expert_id is None else param.data[expert_id]
        if is_w13 and shard_id in ("w1", "w3"):
            start = 0 if shard_id == "w1" else inter
            target = target.narrow(gate_up_dim, start, inter)
        if tuple(target.shape) != tuple(loaded_weight.shape):
            what = f"{shard_id or 'packed'}{' bias' if is_bias else ''}"
            raise ValueError(
                f"{self.prefix}: shape mismatch for {what} of expert {expert_id}: parameter "
                f"{tuple(target.shape)}, checkpoint {tuple(loaded_weight.shape)}"
            )
        target.copy_(loaded_weight.to(device=target.device, dtype=target.dtype))

    def _shard(
        self, w: torch.Tensor, is_w13: bool, is_bias: bool, shard_id: str | None, packed: bool
    ) -> torch.Tensor:
        """This rank's part of a checkpoint tensor (in the parameter's orientation)."""
        if self.tp_size == 1:
            return w
        if self.expert_parallel:
            return w.narrow(0, self.expert_start, self.local_experts) if packed else w
        inter, rank = self.intermediate_size, self.tp_rank
        if not is_w13:  # w2 [.., H, I]: its input columns; the bias once, on rank 0
            if is_bias:
                return w if rank == 0 else torch.zeros_like(w)
            return w.narrow(-1, rank * inter, inter)
        dim = -1 if is_bias else -2
        if shard_id in ("w1", "w3"):  # one half: this rank's rows of it
            return w.narrow(dim, rank * inter, inter)
        full = w.shape[dim] // 2  # both halves: this rank's rows of each
        halves = (w.narrow(dim, h * full + rank * inter, inter) for h in (0, 1))
        return torch.cat(tuple(halves), dim=dim)

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`router_logits [T, E]` → (weights fp32 [T, top_k], expert ids [T, top_k])."""
        if self.routing == "topk_softmax":
            return select_experts_topk_softmax(router_logits, self.top_k)
        return select_experts(router_logits, self.top_k, self.renormalize)

    def forward(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        use_kernel: bool | None = None,
    ) -> torch.Tensor:
        """`use_kernel`: True forces the Triton grouped GEMMs (`kernels.fused_moe`; tests, under
        the interpreter), False the torch reference; None: the kernels on CUDA (`fused.enabled`).
        Options the kernels lack (`kernels.supports`) always take the reference."""
        from pagedllm.layers import fused  # NOTE: no Triton import; the kernels' is below

        weights, ids = self.route(router_logits)
        if self.expert_parallel:  # local expert ids; other ranks' slots weigh nothing
            ids = ids - self.expert_start
            remote = (ids < 0) | (ids >= self.local_experts)
            weights = weights.masked_fill(remote, 0.0)
            ids = ids.masked_fill(remote, 0)
        out: torch.Tensor | None = None
        if fused.enabled(hidden_states) if use_kernel is None else use_kernel:
            from pagedllm.layers.fused_moe import kernels

            if kernels.supports(self):
                out = kernels.forward_layer(self, hidden_states, weights, ids)
        if out is None:
            out = self.forward_torch(hidden_states, weights, ids)
        if self.reduce_results and self.tp_size > 1:
            out = tensor_model_parallel_all_reduce(out)
        return out

    def forward_torch(
        self, hidden_states: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        """The reference: tokens grouped by expert, each expert's gated MLP (biases included)
        on its tokens, the results weighted (in fp32) and summed into their tokens' rows."""
        num_tokens = hidden_states.shape[0]
        out = torch.zeros(num_tokens, self.hidden_size, dtype=torch.float32, device=ids.device)
        flat_ids = ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.local_experts).tolist()
        token_of = order // self.top_k  # the token of each routed slot, by expert
        slot_weights = weights.reshape(-1)[order]
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[start : start + count]
            b13 = None if self.w13_bias is None else self.w13_bias[expert]
            b2 = None if self.w2_bias is None else self.w2_bias[expert]
            gate_up = F.linear(hidden_states[rows], self.w13_weight[expert], b13)
            act = moe_activation(gate_up, self.activation, self.swiglu_alpha, self.swiglu_limit)
            y = F.linear(act, self.w2_weight[expert], b2).float()
            out.index_add_(0, rows, y * slot_weights[start : start + count, None])
            start += count
        return out.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size}, activation={self.activation!r}, "
            f"routing={self.routing!r}, bias={self.w13_bias is not None}"
        )


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
