"""Triton grouped-GEMM kernels of `FusedMoE` (CUDA): the routed slots aligned by expert, then one
launch per projection over all experts.

- `align_tokens(ids [T, k], num_experts, block_m)`: the `T k` routed slots (slot `s` is token
  `s // k`'s `s % k`-th choice) sorted by expert, each expert's run padded to a multiple of
  `block_m` with the out-of-range slot id `T k`, so that every block of `block_m` rows belongs to
  one expert (`block_expert`). The padded total stays on the device (`total`, one int32); the
  buffers are sized by the bound `T k + min(E, T k) (block_m - 1)`, so nothing is read back on
  the host and the launches can be captured in CUDA graphs. Slots that fit one `[chunk, E]`
  one-hot tile (decode) take one single-program kernel; more take three launches (per-chunk
  counts and ranks, one program's scan over the chunks, the scatter) rather than one program
  looping over every chunk (measured on an H200: 47 µs for 1024 slots that way).
  `align_tokens_torch` does the same in torch ops: the tests' oracle.
- the w13 launch: each program owns `BLOCK_M` sorted rows and `BLOCK_N` columns of the
  activation; it loads the rows' tokens, streams its expert's matching gate rows and up rows
  (two fp32 accumulators) over H, and applies the activation in the epilogue, writing
  `act [T k, I]` (by slot): SwiGLU's intermediate `[T k, 2 I]` is never written.
- the w2 launch: `act` rows times the expert's down projection, times the slot's routing weight,
  written per slot `[T, k, H]`, then `_sum_slots_kernel` sums each token's k rows in fp32.
  NOTE: per-slot rows and a separate sum rather than atomic adds into `[T, H]`: the sum's order
  is fixed (a run is bit-reproducible, as greedy tests need), no fp32 buffer has to be zeroed
  first and cast after, and the output is written once in the activation dtype. top_k = 1
  writes `[T, H]` directly.

Numerics follow `FusedMoE.forward_torch` op by op: fp32 accumulation, rounded to the activation
dtype where torch's F.linear output is (gate, up, the down projection), SiLU rounded before the
product; the routing weight multiplies in fp32. Left over: the fp32 summation order inside the
GEMMs, and the weighted slot rows are rounded to the activation dtype before their fp32 sum
(torch keeps them in fp32): in bf16 about one rounding step of the output.

Launch configs (`MoEConfig`) come from `tuning.py`: JSON tables in `configs/`, one entry per
swept token count, written by `pagedllm bench moe --sweep`; without a table, a heuristic.

Imported only when used (CUDA, or forced); tests run the kernels on CPU tensors under Triton's
interpreter (`TRITON_INTERPRET=1` set before this module is imported).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from pagedllm.layers.fused_moe.tuning import (  # noqa: F401 (re-exported)
    GemmConfig,
    MoEConfig,
    config_file_name,
    configs_dir,
    default_config,
    device_name,
    get_config,
    load_table,
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATIONS = ("silu", "swigluoai")


class AlignedTokens(NamedTuple):
    """`sorted_ids [num_blocks * block_m]` int32: slot ids by expert, each expert's run padded
    with `num_slots`; `block_expert [num_blocks]` int32: the expert of each block (blocks at or
    past `total` hold some valid id, never used); `total [1]` int32: the padded length."""

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    total: torch.Tensor
    block_m: int

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]


# --------------------------------------------------------------------------------------------
# Alignment


def max_padded(num_slots: int, num_experts: int, block_m: int) -> int:
    """The bound on the padded length, in whole blocks: every expert that can have slots (at
    most `min(E, num_slots)`) pads by less than a block."""
    bound = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


def align_tokens(
    ids: torch.Tensor, num_experts: int, block_m: int, chunk: int | None = None
) -> AlignedTokens:
    """`ids [T, k]` (expert ids in [0, E)) → `AlignedTokens` for blocks of `block_m` rows.
    Within an expert the slots keep their order. No host sync. Slots are taken `chunk` at a
    time (default: `[chunk, E]` one-hot tiles of 8192 elements): all in one program when they
    fit one chunk, else three launches (per-chunk counts and ranks; one program's scan and the
    padded layout; the scatter)."""
    flat = ids.reshape(-1)
    num_slots, dev = flat.numel(), flat.device
    padded = max_padded(num_slots, num_experts, block_m)
    experts_p = triton.next_power_of_2(num_experts)
    chunk = chunk or max(16, _ONE_HOT // experts_p)
    sorted_ids = torch.empty(padded, dtype=torch.int32, device=dev)
    block_expert = torch.empty(padded // block_m, dtype=torch.int32, device=dev)
    total = torch.empty(1, dtype=torch.int32, device=dev)
    out = AlignedTokens(sorted_ids, block_expert, total, block_m)
    sizes = {
        "BLOCK_M": block_m,
        "E_P": experts_p,
        "CHUNK_B": max(16, _ONE_HOT // experts_p),
        "FILL": min(2048, triton.next_power_of_2(padded)),
    }
    if num_slots <= chunk:
        _align_kernel[(1,)](
            flat, sorted_ids, block_expert, total, num_slots, num_experts, padded,
            CHUNK=max(16, triton.next_power_of_2(num_slots)), **sizes,
        )  # fmt: skip
        return out
    num_chunks = triton.cdiv(num_slots, chunk)
    counts = torch.empty(num_chunks, experts_p, dtype=torch.int32, device=dev)
    bases = torch.empty_like(counts)
    rank = torch.empty(num_slots, dtype=torch.int32, device=dev)
    starts = torch.empty(experts_p, dtype=torch.int32, device=dev)
    _align_count_kernel[(num_chunks,)](flat, counts, rank, num_slots, E_P=experts_p, CHUNK=chunk)
    _align_scan_kernel[(1,)](
        counts, bases, starts, sorted_ids, block_expert, total, num_chunks, num_slots,
        num_experts, padded, ROWS=max(2, _ONE_HOT // experts_p), **sizes,
    )  # fmt: skip
    _align_scatter_kernel[(num_chunks,)](
        flat, bases, starts, rank, sorted_ids, num_slots, E_P=experts_p, CHUNK=chunk
    )
    return out


def align_tokens_torch(ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedTokens:
    """`align_tokens` in torch ops (a dozen launches): the tests' oracle."""
    flat = ids.reshape(-1).long()
    num_slots, dev = flat.numel(), flat.device
    padded = max_padded(num_slots, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev)
    # NOTE: scatter_add_, not bincount: bincount reads its max back on the host.
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded_counts = (counts + block_m - 1) // block_m * block_m
    ends = padded_counts.cumsum(0)
    order = torch.argsort(flat, stable=True)
    experts = flat[order]
    rank = torch.arange(num_slots, device=dev) - (counts.cumsum(0) - counts)[experts]
    dest = (ends - padded_counts)[experts] + rank
    sorted_ids = torch.full((padded,), num_slots, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    starts = torch.arange(0, padded, block_m, device=dev)
    block_expert = torch.searchsorted(ends, starts, right=True).clamp_(max=num_experts - 1)
    total = ends[-1:].to(torch.int32)
    return AlignedTokens(sorted_ids, block_expert.to(torch.int32), total, block_m)


_ONE_HOT = 8192  # elements of a `[slots, experts]` one-hot tile


@triton.jit
def _one_hot(ids_ptr, c, num_slots, E_P: tl.constexpr, CHUNK: tl.constexpr):
    """Chunk `c` of the slots: their offsets and their `[CHUNK, E_P]` one-hot expert rows (all
    zero past `num_slots`)."""
    offs = c * CHUNK + tl.arange(0, CHUNK)
    e = tl.load(ids_ptr + offs, mask=offs < num_slots, other=-1).to(tl.int32)
    return offs, (e[:, None] == tl.arange(0, E_P)[None, :]).to(tl.int32)


@triton.jit
def _earlier(hot):
    """For each row of a one-hot tile: how many rows above it have the same expert."""
    return tl.sum(hot * (tl.cumsum(hot, axis=0) - hot), axis=1)


@triton.jit
def _padded_layout(
    counts, total_ptr, block_expert_ptr, sorted_ptr, num_slots, num_experts, num_padded,
    BLOCK_M: tl.constexpr, E_P: tl.constexpr, CHUNK_B: tl.constexpr, FILL: tl.constexpr,
):  # fmt: skip
    """From the experts' counts: the padded total, each block's expert, `sorted_ptr` filled
    with the padding id; returns each expert's padded start."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(total_ptr, tl.sum(padded, axis=0))
    for c in range(0, tl.cdiv(num_padded, CHUNK_B * BLOCK_M)):
        blocks = c * CHUNK_B + tl.arange(0, CHUNK_B)
        before = (ends[None, :] <= (blocks * BLOCK_M)[:, None]).to(tl.int32)
        expert = tl.minimum(tl.sum(before, axis=1), num_experts - 1)
        tl.store(block_expert_ptr + blocks, expert, mask=blocks * BLOCK_M < num_padded)
    for c in range(0, tl.cdiv(num_padded, FILL)):
        offs = c * FILL + tl.arange(0, FILL)
        tl.store(sorted_ptr + offs, tl.full([FILL], 0, tl.int32) + num_slots, offs < num_padded)
    return ends - padded


@triton.jit
def _align_kernel(
    ids_ptr, sorted_ptr, block_expert_ptr, total_ptr, num_slots, num_experts, num_padded,
    BLOCK_M: tl.constexpr, E_P: tl.constexpr, CHUNK: tl.constexpr, CHUNK_B: tl.constexpr,
    FILL: tl.constexpr,
):  # fmt: skip
    """All of it in one program, when the slots fit one chunk (decode)."""
    offs, hot = _one_hot(ids_ptr, 0, num_slots, E_P, CHUNK)
    starts = _padded_layout(
        tl.sum(hot, axis=0), total_ptr, block_expert_ptr, sorted_ptr, num_slots, num_experts,
        num_padded, BLOCK_M, E_P, CHUNK_B, FILL,
    )  # fmt: skip
    # NOTE: the fill above and the scatter below may touch one address from different threads.
    tl.debug_barrier()
    dest = tl.sum(hot * starts[None, :], axis=1) + _earlier(hot)
    tl.store(sorted_ptr + dest, offs, mask=offs < num_slots)


@triton.jit
def _align_count_kernel(
    ids_ptr, counts_ptr, rank_ptr, num_slots, E_P: tl.constexpr, CHUNK: tl.constexpr
):
    """Per chunk: its count of each expert, and each slot's rank among its expert's slots in
    the chunk."""
    c = tl.program_id(0)
    offs, hot = _one_hot(ids_ptr, c, num_slots, E_P, CHUNK)
    tl.store(counts_ptr + c * E_P + tl.arange(0, E_P), tl.sum(hot, axis=0))
    tl.store(rank_ptr + offs, _earlier(hot), mask=offs < num_slots)


@triton.jit
def _align_scan_kernel(
    counts_ptr, bases_ptr, starts_ptr, sorted_ptr, block_expert_ptr, total_ptr, num_chunks,
    num_slots, num_experts, num_padded, BLOCK_M: tl.constexpr, E_P: tl.constexpr,
    ROWS: tl.constexpr, CHUNK_B: tl.constexpr, FILL: tl.constexpr,
):  # fmt: skip
    """One program: each chunk's exclusive prefix of the counts per expert (`ROWS` chunks at a
    time), then the padded layout and each expert's start."""
    experts = tl.arange(0, E_P)
    running = tl.zeros([E_P], dtype=tl.int32)
    for r in range(0, tl.cdiv(num_chunks, ROWS)):
        rows = r * ROWS + tl.arange(0, ROWS)
        offs = rows[:, None] * E_P + experts[None, :]
        mask = rows[:, None] < num_chunks
        block = tl.load(counts_ptr + offs, mask=mask, other=0)
        tl.store(bases_ptr + offs, tl.cumsum(block, axis=0) - block + running[None, :], mask)
        running += tl.sum(block, axis=0)
    starts = _padded_layout(
        running, total_ptr, block_expert_ptr, sorted_ptr, num_slots, num_experts, num_padded,
        BLOCK_M, E_P, CHUNK_B, FILL,
    )  # fmt: skip
    tl.store(starts_ptr + experts, starts)


@triton.jit
def _align_scatter_kernel(
    ids_ptr, bases_ptr, starts_ptr, rank_ptr, sorted_ptr, num_slots, E_P: tl.constexpr,
    CHUNK: tl.constexpr,
):  # fmt: skip
    """Each slot to its expert's start + the expert's slots in earlier chunks + its rank."""
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < num_slots
    e = tl.load(ids_ptr + offs, mask=mask, other=0).to(tl.int32)
    dest = tl.load(starts_ptr + e, mask=mask, other=0)
    dest += tl.load(bases_ptr + c * E_P + e, mask=mask, other=0)
    dest += tl.load(rank_ptr + offs, mask=mask, other=0)
    tl.store(sorted_ptr + dest, offs, mask=mask)


# --------------------------------------------------------------------------------------------
# The grouped GEMMs


@triton.jit
def _tile(num_blocks_m, n, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program: `GROUP_M` row blocks side by side sweep the
    columns together, so their expert's weight tiles are read from L2 by the group."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(n, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _activate(gate, up, dt, ACTIVATION: tl.constexpr, alpha, limit):
    """fp32 accumulators → the activation in `dt`, rounding where the torch reference's
    `dt` ops do: each projection's output, then every op's result (the clamps are exact)."""
    g = gate.to(dt).to(tl.float32)
    u = up.to(dt).to(tl.float32)
    if ACTIVATION == "silu":
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u
    else:  # swigluoai (gpt-oss): clamped, `(up + 1) * (gate * sigmoid(gate * alpha))`
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        ga = (g * alpha).to(dt).to(tl.float32)
        glu = (g * (1.0 / (1.0 + tl.exp(-ga))).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        act = (u + 1.0).to(dt).to(tl.float32) * glu
    return act.to(dt)


@triton.jit
def _w13_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    act_ptr,
    sorted_ptr,
    block_expert_ptr,
    total_ptr,
    num_slots,
    num_blocks_m,
    inter,
    hidden,
    stride_xt,
    stride_xk,
    stride_we,
    stride_wn,
    stride_wk,
    up_row,
    stride_be,
    stride_bn,
    stride_at,
    alpha,
    limit,
    TOP_K: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """`act[slot, n] = act_fn(x[token] . w[e, gate row n], x[token] . w[e, up row n])`: gate row
    n is row n of expert e's `[2 I, H]`, its up row `up_row` (= I) rows further."""
    pid_m, pid_n = _tile(num_blocks_m, inter, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    slots = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = slots < num_slots
    tokens = (slots // TOP_K).to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + ks[None, :] * stride_xk
    g_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn
    g_ptrs += ks[:, None] * stride_wk
    up_offset = up_row * stride_wn
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(hidden, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=valid[:, None], other=0.0)
            wg = tl.load(g_ptrs, mask=col_ok[None, :], other=0.0)
            wu = tl.load(g_ptrs + up_offset, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = ks < hidden - k * BLOCK_K
            x = tl.load(x_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            wg = tl.load(g_ptrs, mask=w_mask, other=0.0)
            wu = tl.load(g_ptrs + up_offset, mask=w_mask, other=0.0)
        gate = tl.dot(x, wg, gate, input_precision=PRECISION)
        up = tl.dot(x, wu, up, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        b_ptrs = bias_ptr + expert * stride_be + cols * stride_bn
        gate += tl.load(b_ptrs, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        up_b = tl.load(b_ptrs + up_row * stride_bn, mask=col_ok, other=0.0)
        up += up_b.to(tl.float32)[None, :]
    act = _activate(gate, up, act_ptr.dtype.element_ty, ACTIVATION, alpha, limit)
    out_ptrs = act_ptr + slots[:, None].to(tl.int64) * stride_at + cols[None, :]
    tl.store(out_ptrs, act, mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _w2_kernel(
    act_ptr,
    w_ptr,
    bias_ptr,
    weights_ptr,
    out_ptr,
    sorted_ptr,
    block_expert_ptr,
    total_ptr,
    num_slots,
    num_blocks_m,
    hidden,
    inter,
    stride_at,
    stride_ak,
    stride_we,
    stride_wn,
    stride_wk,
    stride_be,
    stride_bn,
    stride_ot,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """`out[slot, n] = weight[slot] * (act[slot] . w[e, n] (+ bias[e, n]))`."""
    pid_m, pid_n = _tile(num_blocks_m, hidden, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(total_ptr):
        return
    slots = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = slots < num_slots
    rows = slots.to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + rows[:, None] * stride_at + ks[None, :] * stride_ak
    w_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn
    w_ptrs += ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(inter, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = ks < inter - k * BLOCK_K
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        b = tl.load(bias_ptr + expert * stride_be + cols * stride_bn, mask=col_ok, other=0.0)
        acc += b.to(tl.float32)[None, :]
    dt = out_ptr.dtype.element_ty
    weight = tl.load(weights_ptr + rows, mask=valid, other=0.0)
    y = acc.to(dt).to(tl.float32) * weight[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + cols[None, :],
        y.to(dt),
        mask=valid[:, None] & col_ok[None, :],
    )


@triton.jit
def _sum_slots_kernel(out_ptr, slots_ptr, hidden, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    """`out[t] = sum_j slots[t, j]` in fp32, rounded once; one program per (token, block)."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(slots_ptr + (token * TOP_K + j) * hidden + cols, mask=mask, other=0.0).to(
            tl.float32
        )
    tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host wrappers


def supports(layer: Any) -> bool:
    """Whether `fused_moe` computes what `layer.forward_torch` does: its activation is one the
    kernel has, its dtype one of `DTYPES`."""
    return (
        getattr(layer, "activation", "silu") in ACTIVATIONS
        and layer.w13_weight.dtype in DTYPES
        and layer.w13_weight.dtype == layer.w2_weight.dtype
    )


def forward_layer(
    layer: Any, hidden_states: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """`FusedMoE.forward`'s kernel path: the layer's weights and options into `fused_moe`."""
    return fused_moe(
        hidden_states,
        layer.w13_weight,
        layer.w2_weight,
        weights,
        ids,
        w13_bias=getattr(layer, "w13_bias", None),
        w2_bias=getattr(layer, "w2_bias", None),
        activation=getattr(layer, "activation", "silu"),
        alpha=getattr(layer, "swiglu_alpha", 1.702),
        limit=getattr(layer, "swiglu_limit", 7.0),
    )


def fused_moe(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    *,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    activation: str = "silu",
    alpha: float = 1.702,
    limit: float = 7.0,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """`hidden [T, H]`, `w13 [E, 2 I, H]` (gate rows then up rows), `w2 [E, H, I]`, routing
    `weights [T, k]` and `ids [T, k]` → `[T, H]` in the hidden dtype. `alpha`/`limit`: the
    swigluoai constants. `config`: the launch config (default: `get_config`'s)."""
    num_tokens, hidden = hidden_states.shape
    num_experts, two_inter, _ = w13.shape
    inter, top_k = two_inter // 2, ids.shape[1]
    dtype = hidden_states.dtype
    if dtype not in DTYPES or w13.dtype != dtype or w2.dtype != dtype:
        raise ValueError(f"fused_moe: dtypes {dtype}, {w13.dtype}, {w2.dtype}; one of {DTYPES}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"fused_moe: activation {activation!r} not in {ACTIVATIONS}")
    if num_tokens == 0:
        return torch.empty_like(hidden_states)
    cfg = config or get_config(
        num_tokens, num_experts, inter, hidden, dtype, device_name(hidden_states.device), top_k
    )
    aligned = align_tokens(ids, num_experts, cfg.block_m)
    act = _w13(hidden_states, w13, w13_bias, aligned, top_k, activation, alpha, limit, cfg)
    out = torch.empty(num_tokens, hidden, dtype=dtype, device=hidden_states.device)
    slots = (
        out
        if top_k == 1
        else torch.empty(num_tokens * top_k, hidden, dtype=dtype, device=out.device)
    )
    _w2(act, w2, w2_bias, weights.reshape(-1).float().contiguous(), slots, aligned, cfg)
    if top_k > 1:
        block = min(1024, triton.next_power_of_2(hidden))
        _sum_slots_kernel[(num_tokens, triton.cdiv(hidden, block))](
            out, slots, hidden, TOP_K=top_k, BLOCK=block
        )
    return out


def _precision(dtype: torch.dtype) -> str:
    # NOTE: fp32 operands would be rounded to tf32 on the tensor cores by default.
    return "ieee" if dtype == torch.float32 else "tf32"


def _w13(x, w13, bias, aligned, top_k, activation, alpha, limit, cfg):  # type: ignore[no-untyped-def]
    num_slots = x.shape[0] * top_k
    inter, hidden = w13.shape[1] // 2, w13.shape[2]
    act = torch.empty(num_slots, inter, dtype=x.dtype, device=x.device)
    g = cfg.w13
    grid = (aligned.num_blocks * triton.cdiv(inter, g.block_n),)
    _w13_kernel[grid](
        x, w13, bias if bias is not None else w13, act,
        aligned.sorted_ids, aligned.block_expert, aligned.total,
        num_slots, aligned.num_blocks, inter, hidden,
        x.stride(0), x.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
        inter,
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        act.stride(0), alpha, limit,
        TOP_K=top_k, ACTIVATION=activation, HAS_BIAS=bias is not None,
        EVEN_K=hidden % g.block_k == 0, PRECISION=_precision(x.dtype),
        BLOCK_M=aligned.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k, GROUP_M=g.group_m,
        num_warps=g.num_warps, num_stages=g.num_stages,
    )  # fmt: skip
    return act


def _w2(act, w2, bias, weights, out, aligned, cfg):  # type: ignore[no-untyped-def]
    hidden, inter = w2.shape[1], w2.shape[2]
    g = cfg.w2
    grid = (aligned.num_blocks * triton.cdiv(hidden, g.block_n),)
    _w2_kernel[grid](
        act, w2, bias if bias is not None else w2, weights, out,
        aligned.sorted_ids, aligned.block_expert, aligned.total,
        act.shape[0], aligned.num_blocks, hidden, inter,
        act.stride(0), act.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
        bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0,
        out.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=inter % g.block_k == 0,
        PRECISION=_precision(act.dtype),
        BLOCK_M=aligned.block_m, BLOCK_N=g.block_n, BLOCK_K=g.block_k, GROUP_M=g.group_m,
        num_warps=g.num_warps, num_stages=g.num_stages,
    )  # fmt: skip
