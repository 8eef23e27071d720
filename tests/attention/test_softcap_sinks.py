"""Attention logit soft-capping and attention sinks, in both backends, against a dense attention
written here (float64: scores, `cap * tanh(s / cap)`, mask, a sink column per head, softmax,
the sink column dropped).

Batches mix prompts, prompt chunks after cached context and decode rows (`make_case` of
test_torch_ref: shuffled blocks, finite garbage in unused slots), with GQA and sliding windows;
the Triton kernels run under Triton's interpreter without a GPU, with several KV splits (the
sink must count once, in the split reduction). The queries are scaled up so that the cap bites
and the sinks are large enough to move every output (checked: a test that cannot fail is none).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.triton_interpreter import kernel_test_device

DEVICE = kernel_test_device()  # NOTE: before triton is first imported

from pagedllm.attention.backend import AttentionImpl  # noqa: E402
from pagedllm.attention.layer import Attention  # noqa: E402
from pagedllm.attention.torch_ref import TorchRefAttention, TorchRefBackend  # noqa: E402
from pagedllm.attention.triton.backend import TritonAttention  # noqa: E402
from pagedllm.forward_context import set_forward_context  # noqa: E402
from tests.attention.test_torch_ref import NUM_KV_HEADS, Case, make_case  # noqa: E402
from tests.attention.test_triton import HALF_TOL, SMALL_MIXED, to_device  # noqa: E402
from tests.triton_interpreter import one_thread, patch_interpreter  # noqa: E402, F401

ATOL = 3e-5
QUERY_GAIN = 3.0  # scores ~ N(0, 9): a cap of 4 changes most of them

if DEVICE == "cpu":
    patch_interpreter()


def dense(
    q: torch.Tensor,  # [Q, H, D]: the last Q positions of the sequence
    k: torch.Tensor,  # [S, Hkv, D]
    v: torch.Tensor,
    scale: float,
    window: int | None,
    cap: float | None,
    sinks: torch.Tensor | None,  # [H]
) -> torch.Tensor:
    num_q, num_heads, _ = q.shape
    seq_len = k.shape[0]
    group = num_heads // k.shape[1]
    kd = k.double().repeat_interleave(group, dim=1)
    vd = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kd) * scale
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    q_pos = torch.arange(seq_len - num_q, seq_len)[:, None]
    k_pos = torch.arange(seq_len)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        column = sinks.double().cpu()[:, None, None].expand(num_heads, num_q, 1)
        scores = torch.cat([scores, column], dim=-1)
    probs = scores.softmax(-1)[..., :seq_len]
    return torch.einsum("hqk,khd->qhd", probs, vd)


def expected(
    case: Case, window: int | None, cap: float | None, sinks: torch.Tensor | None
) -> torch.Tensor:
    outs, start = [], 0
    query = case.query.cpu()
    scale = query.shape[-1] ** -0.5
    for (_, n), k, v in zip(case.specs, case.full_keys, case.full_values, strict=True):
        outs.append(dense(query[start : start + n], k, v, scale, window, cap, sinks))
        start += n
    return torch.cat(outs)


def new_case(specs: list[tuple[int, int]], num_heads: int, head_dim: int, block_size: int,
             dtype: torch.dtype = torch.float32, seed: int = 0) -> Case:  # fmt: skip
    case = make_case(specs, num_heads, head_dim, block_size, dtype, seed)
    case.query = (case.query.float() * QUERY_GAIN).to(dtype)
    return to_device(case, DEVICE)


def make_sinks(num_heads: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-head sinks from -1 to +4 or so: against scores of this scale, some heads send most
    of their weight to the sink, others little."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(num_heads, generator=gen) * 1.5 + 1.5).to(dtype).to(DEVICE)


def make_impl(
    backend: str, num_heads: int, head_dim: int, window: int | None, cap: float | None,
    sinks: torch.Tensor | None, num_kv_splits: int | None = None, use_decode_launch: bool = True,
) -> AttentionImpl:  # fmt: skip
    args = (num_heads, head_dim, head_dim**-0.5, NUM_KV_HEADS, window)
    if backend == "torch":
        return TorchRefAttention(*args, logits_soft_cap=cap, sinks=sinks)
    impl = TritonAttention(*args, logits_soft_cap=cap, sinks=sinks)
    impl.num_kv_splits = num_kv_splits
    impl.use_decode_launch = use_decode_launch
    return impl


def run(case: Case, impl: AttentionImpl) -> torch.Tensor:
    return impl.forward(case.query, case.key, case.value, case.kv_cache, case.metadata)


def check(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    atol, rtol = HALF_TOL.get(dtype, (ATOL, 0.0))
    torch.testing.assert_close(out.cpu().double(), want, atol=atol, rtol=rtol)


# (head_dim, gqa_ratio, block_size, sliding_window, soft cap, sinks): each option alone and
# together, with and without a window, head dims not powers of two.
GRID = [
    (40, 2, 16, None, 4.0, False),
    (24, 3, 16, 13, None, True),
    (64, 4, 32, 29, 4.0, True),
    (40, 1, 16, None, None, True),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("head_dim", "gqa", "block_size", "window", "cap", "with_sinks"), GRID)
def test_mixed_batch(
    backend: str, head_dim: int, gqa: int, block_size: int, window: int | None,
    cap: float | None, with_sinks: bool,
) -> None:  # fmt: skip
    num_heads = NUM_KV_HEADS * gqa
    case = new_case(SMALL_MIXED, num_heads, head_dim, block_size, seed=head_dim + gqa)
    sinks = make_sinks(num_heads, seed=gqa) if with_sinks else None
    want = expected(case, window, cap, sinks)
    check(run(case, make_impl(backend, num_heads, head_dim, window, cap, sinks)), want)


@pytest.mark.parametrize("window", [None, 29])
def test_varlen_launch_only(window: int | None) -> None:
    """Decode rows through the varlen launch too (the sink seeds tiles of many rows)."""
    case = new_case(SMALL_MIXED, 8, 40, 16, seed=31)
    sinks = make_sinks(8, seed=5)
    impl = make_impl("triton", 8, 40, window, 4.0, sinks, use_decode_launch=False)
    check(run(case, impl), expected(case, window, 4.0, sinks))


@pytest.mark.parametrize("window", [None, 41])
@pytest.mark.parametrize(("backend", "num_kv_splits"), [("torch", None), ("triton", 1),
                                                         ("triton", 3), ("triton", None)])  # fmt: skip
def test_decode_batch_kv_splits(
    backend: str, num_kv_splits: int | None, window: int | None
) -> None:
    """A pure-decode batch, flash-decoding off, forced and chosen (CPU: as if 8 SMs): each
    split's partial has no sink; the reduction adds it once."""
    specs = [(c, 1) for c in (300, 0, 77, 160, 1)]
    case = new_case(specs, 8, 40, 16, seed=21)
    sinks = make_sinks(8, seed=6)
    impl = make_impl(backend, 8, 40, window, 4.0, sinks, num_kv_splits=num_kv_splits)
    check(run(case, impl), expected(case, window, 4.0, sinks))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_sinks_parameter(backend: str) -> None:
    """bf16 activations and a bf16 sinks parameter (gpt-oss's dtype)."""
    case = new_case(SMALL_MIXED, 8, 64, 16, torch.bfloat16, seed=12)
    sinks = make_sinks(8, seed=7, dtype=torch.bfloat16)
    impl = make_impl(backend, 8, 64, 29, None, sinks, num_kv_splits=2)
    out = run(case, impl)
    assert out.dtype == torch.bfloat16
    check(out, expected(case, 29, None, sinks), torch.bfloat16)


def test_the_options_change_the_output() -> None:
    """The data above is such that each option moves the result far past the tolerance."""
    case = new_case(SMALL_MIXED, 8, 40, 16, seed=31)
    sinks = make_sinks(8, seed=5)
    plain = expected(case, None, None, None)
    for cap, s in ((4.0, None), (None, sinks)):
        assert (expected(case, None, cap, s) - plain).abs().max() > 0.1
    # The sink counted once per split (here: three times) would change it as much.
    assert (expected(case, None, None, sinks + torch.log(torch.tensor(3.0))) -
            expected(case, None, None, sinks)).abs().max() > 0.05  # fmt: skip


class _Owner(nn.Module):
    """A model's attention module: it owns `sinks`; its `Attention` only refers to it."""

    def __init__(self, num_heads: int, head_dim: int, window: int | None, cap: float) -> None:
        super().__init__()
        self.sinks = nn.Parameter(torch.zeros(num_heads), requires_grad=False)
        self.attn = Attention(
            num_heads, head_dim, head_dim**-0.5, NUM_KV_HEADS, TorchRefBackend,
            sliding_window=window, logits_soft_cap=cap, sinks=self.sinks,
        )  # fmt: skip


def test_layer_holds_sinks_by_reference() -> None:
    """`Attention` registers no second copy of the sinks, and reads what a later weight load
    copies into the model's parameter."""
    owner = _Owner(8, 40, None, 4.0)
    assert [name for name, _ in owner.named_parameters()] == ["sinks"]
    assert "logits_soft_cap=4.0" in repr(owner.attn) and "sinks=True" in repr(owner.attn)
    case = make_case(SMALL_MIXED, 8, 40, 16, seed=31)
    sinks = make_sinks(8, seed=5).cpu()
    owner.sinks.data.copy_(sinks)  # what a weight loader does
    owner.attn.kv_cache = case.kv_cache
    with set_forward_context(case.metadata):
        out = owner.attn(case.query.flatten(1), case.key.flatten(1), case.value.flatten(1))
    check(out.view_as(case.query), expected(case, None, 4.0, sinks))


@pytest.mark.parametrize("window", [None, 11])
def test_without_metadata_one_causal_sequence(window: int | None) -> None:
    """The profiling pass (no metadata): the batch as one sequence, with the options."""
    num_heads, head_dim, num_tokens = 6, 24, 37
    owner = _Owner(num_heads, head_dim, window, 4.0)
    sinks = make_sinks(num_heads, seed=8).cpu()
    owner.sinks.data.copy_(sinks)
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen) * QUERY_GAIN
    k = torch.randn(num_tokens, NUM_KV_HEADS, head_dim, generator=gen)
    v = torch.randn(num_tokens, NUM_KV_HEADS, head_dim, generator=gen)
    with set_forward_context(None):
        out = owner.attn(q.flatten(1), k.flatten(1), v.flatten(1))
    want = dense(q, k, v, head_dim**-0.5, window, 4.0, sinks)
    check(out.view_as(q), want)


def test_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="sinks must be"):
        TorchRefAttention(8, 40, 0.1, NUM_KV_HEADS, sinks=torch.zeros(4))
    with pytest.raises(ValueError, match="logits_soft_cap"):
        TorchRefAttention(8, 40, 0.1, NUM_KV_HEADS, logits_soft_cap=0.0)
