"""The rejection sampler's Triton kernel (pagedllm/worker/sample/rejection_kernels.py) against its
torch path (`rejection.rejection_sample` on CPU tensors), given identical randomness.

Without a GPU the kernel runs under Triton's interpreter. Both paths get the same uniforms and
the same Exp(1) noise: either the noise tensor itself, or the kernel's row keys, from which the
torch path's noise is mirrored in numpy (the kernel's hash and transform in the same fp32 ops).
Every case must give the same tokens, token for token: the acceptances are the same fp32
comparisons and the race's `residual / E` the same rounded divisions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.triton_interpreter import kernel_test_device

DEVICE = kernel_test_device()  # NOTE: before triton is first imported

from pagedllm.worker.sample import rejection  # noqa: E402
from pagedllm.worker.sample.rejection import (  # noqa: E402
    DraftLayout,
    draw_noise,
    rejection_sample,
)
from pagedllm.worker.sample.rng import SamplingRNG  # noqa: E402
from tests.triton_interpreter import patch_interpreter  # noqa: E402
from tests.worker.sample.test_kernels import lowbias32  # noqa: E402


@pytest.fixture(autouse=True)
def _kernel_switch_on(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The kernel is opt-in (`PAGEDLLM_TRITON_REJECTION=1`): these tests turn it on."""
    monkeypatch.setenv("PAGEDLLM_TRITON_REJECTION", "1")
    rejection.triton_enabled.cache_clear()
    yield
    rejection.triton_enabled.cache_clear()


if DEVICE == "cpu":
    patch_interpreter()

ALMOST_ONE = 1.0 - 2.0**-24  # the largest uniform below 1


def exp_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """fp32 [N, vocab]: the kernel's hashed E of rows keyed `keys` (int64 [N]), in numpy."""
    k = keys.cpu().numpy().view(np.uint64)
    lo = (k & np.uint64(0xFFFFFFFF)).astype(np.uint32)[:, None]
    hi = (k >> np.uint64(32)).astype(np.uint32)[:, None]
    h = lowbias32(lowbias32(np.arange(vocab, dtype=np.uint32)[None, :] ^ lo) ^ hi)
    w = ((h >> 8) | 1).astype(np.float32) * np.float32(2.0**-24)
    series = w * (1.0 + w * (0.5 + w * (0.33333334 + w * (0.25 + w * (0.2 + w * 0.16666667)))))
    e = np.where(w < 0.0625, series, np.log2(np.float32(1) - w) * np.float32(-math.log(2)))
    return torch.from_numpy(e.astype(np.float32))


def make_case(
    mode: str, case: str, counts: list[int], vocab: int, seed: int
) -> tuple[torch.Tensor, DraftLayout, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(probs, layout, uniforms, greedy rows, draft probs) on the CPU. `mode`: greedy (every
    row), deterministic or probabilistic drafts (request 1 greedy, some target entries 0, and in
    probabilistic mode request 0's q one-hot); `case`: random, all_accepted or first_rejected."""
    gen = torch.Generator().manual_seed(seed)
    num_drafts = np.array(counts, np.int64)
    layout = DraftLayout.from_counts(num_drafts, np.zeros(int(num_drafts.sum()), np.int64))
    rows, total = layout.num_rows, int(num_drafts.sum())
    req_of_row = np.repeat(np.arange(len(counts)), 1 + num_drafts)
    probs = (torch.randn(rows, vocab, generator=gen) * 4).softmax(-1)  # peaky: p(best) ~ 0.5
    probs = probs * (torch.rand(rows, vocab, generator=gen) > 0.3)  # a top-k-like cut
    probs = probs / probs.sum(-1, keepdim=True)
    greedy = torch.full((rows,), mode == "greedy")
    if mode != "greedy":
        greedy[torch.from_numpy(req_of_row == 1)] = True
    one_hot = torch.zeros_like(probs).scatter_(1, probs.argmax(-1, keepdim=True), 1.0)
    probs = torch.where(greedy.unsqueeze(1), one_hot, probs)
    q = None
    if mode == "probabilistic":
        q = (torch.randn(total, vocab, generator=gen) * 2).softmax(-1)
        first = torch.zeros(total, dtype=torch.bool)
        first[: counts[0]] = True  # request 0's drafts are deterministic: one-hot q
    p_draft = probs[torch.from_numpy(layout.draft_rows)]
    best = p_draft.argmax(-1)
    if case == "all_accepted":
        ids = best
        uniforms = torch.zeros(total)
    elif case == "first_rejected":
        # a draft the target gives less than ALMOST_ONE of its q: deterministic, the argmax
        # (which would often win the residual's race if its entry were not zeroed); greedy
        # rows: not the argmax
        draft_greedy = greedy[torch.from_numpy(layout.draft_rows)]
        ids = torch.where(draft_greedy, torch.where(best == 0, 1, best - 1), best)
        if q is not None:
            ratio = torch.where(p_draft < 1.0, q / p_draft.clamp(min=1e-30), 0.0)
            ids = torch.where(draft_greedy, ids, ratio.argmax(-1))
        uniforms = torch.full((total,), ALMOST_ONE)
    else:
        rand = torch.randint(0, vocab, (total,), generator=gen)
        ids = torch.where(torch.rand(total, generator=gen) < 0.6, best, rand)
        uniforms = torch.rand(total, generator=gen)
    if q is not None:
        hot = torch.zeros_like(q).scatter_(1, ids.unsqueeze(1), 1.0)
        q = torch.where(first.unsqueeze(1), hot, q)
    layout = DraftLayout.from_counts(num_drafts, ids.numpy())
    return probs, layout, uniforms, (greedy if greedy.any() else None), q


def to_dev(t: torch.Tensor | None, device: str) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def check_same(
    ref: tuple[np.ndarray, list[list[int]]], got: tuple[np.ndarray, list[list[int]]], layout
) -> None:
    """The kernel's (`got`) tokens are torch's (`ref`), and so is its row id at each request's
    last emitted row; its other rows: the emitted tokens, then 0."""
    assert got[1] == ref[1]
    for start, k, toks in zip(layout.starts.tolist(), layout.num_drafts.tolist(), ref[1]):
        assert ref[0][start + len(toks) - 1] == toks[-1]
        assert got[0][start : start + k + 1].tolist() == toks + [0] * (k + 1 - len(toks))


@pytest.mark.parametrize("mode", ["greedy", "deterministic", "probabilistic"])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("case", ["random", "all_accepted", "first_rejected"])
@pytest.mark.parametrize("keyed", [False, True], ids=["noise", "keys"])
def test_kernel_matches_torch(mode: str, k: int, case: str, keyed: bool) -> None:
    vocab = 2500  # not a power of two, three blocks
    counts = [k, k, max(1, k - 2), k]
    probs, layout, uniforms, greedy, q = make_case(mode, case, counts, vocab, seed=k)
    gen = torch.Generator().manual_seed(7)
    if keyed:
        keys = torch.randint(-(2**63), 2**63 - 1, (layout.num_rows,), generator=gen)
        noise = exp_noise(keys, vocab)
    else:
        noise = torch.empty(layout.num_rows, vocab).exponential_(generator=gen)
    ref = rejection_sample(probs.clone(), layout, noise, uniforms, greedy, q)
    got = rejection._kernel_sample(
        probs.to(DEVICE), layout, (keys if keyed else noise).to(DEVICE),
        uniforms.to(DEVICE), to_dev(greedy, DEVICE), to_dev(q, DEVICE),
    )  # fmt: skip
    check_same(ref, got, layout)
    lengths = [len(t) for t in ref[1]]
    if case == "all_accepted":
        assert lengths == [c + 1 for c in counts]
    elif case == "first_rejected":
        assert lengths == [1] * len(counts)


def test_kernel_draws_from_keys_on_the_kernel_path() -> None:
    """`draw_noise` with a kernel `SamplingRNG` gives keys and uniforms; `rejection_sample`
    takes them to the kernel; the torch path given the mirrored noise agrees."""
    probs, layout, _, greedy, q = make_case("probabilistic", "random", [3, 2, 3], 700, seed=3)
    rng = SamplingRNG(5, torch.device("cpu"), use_kernel=True)
    seeded = np.array([True, False, True])
    seed_keys = np.array([SamplingRNG.seed_key(s) for s in (11, 0, 12)], np.uint64)
    keys, uniforms = draw_noise(
        layout.num_rows, 700, layout, rng, seeded, seed_keys, np.array([4, 9, 0]), probs.device
    )
    assert keys.dtype == torch.int64 and uniforms.dtype == torch.float32
    assert ((uniforms >= 0) & (uniforms < 1)).all()
    ref = rejection_sample(probs.clone(), layout, exp_noise(keys, 700), uniforms, greedy, q)
    got = rejection_sample(probs, layout, keys, uniforms, greedy, q)
    check_same(ref, got, layout)


def test_seeded_keys_do_not_depend_on_the_batch() -> None:
    seed_key = SamplingRNG.seed_key(42)
    alone = DraftLayout.from_counts(np.array([3]), np.zeros(3, np.int64))
    batch = DraftLayout.from_counts(np.array([2, 3]), np.zeros(5, np.int64))
    one = rejection.row_keys(
        alone, SamplingRNG(0, torch.device("cpu"), use_kernel=True),
        np.array([True]), np.array([seed_key]), np.array([6]), torch.device("cpu"),
    )  # fmt: skip
    two = rejection.row_keys(
        batch, SamplingRNG(1, torch.device("cpu"), use_kernel=True), np.array([False, True]),
        np.array([np.uint64(0), seed_key]), np.array([1, 6]), torch.device("cpu"),
    )  # fmt: skip
    torch.testing.assert_close(two[0][3:], one[0], rtol=0, atol=0)
    torch.testing.assert_close(two[1][2:], one[1], rtol=0, atol=0)
    assert len(set(two[0].tolist())) == batch.num_rows


def test_hashed_uniforms_are_uniform() -> None:
    """The kernel path's acceptance uniforms (hashed on the host) over 20000 drafts: ten equal
    bins each within 5 standard deviations of 2000, and distinct keys for every row."""
    layout = DraftLayout.from_counts(np.full(5000, 4), np.zeros(20000, np.int64))
    seeded = np.arange(5000) % 2 == 0
    seed_keys = np.array([SamplingRNG.seed_key(s) for s in range(5000)], np.uint64)
    keys, uniforms = rejection.row_keys(
        layout, SamplingRNG(3, torch.device("cpu"), use_kernel=True), seeded, seed_keys,
        np.arange(5000) % 7, torch.device("cpu"),
    )  # fmt: skip
    counts = np.bincount((uniforms.numpy() * 10).astype(np.int64), minlength=10)
    assert len(counts) == 10 and np.abs(counts - 2000).max() < 5 * np.sqrt(2000 * 0.9)
    assert len(set(keys.tolist())) == layout.num_rows


def test_warm_up_and_bad_input() -> None:
    from pagedllm.worker.sample import rejection_kernels

    rejection_kernels.warm_up(37, torch.device(DEVICE))
    probs = torch.rand(2, 37, device=DEVICE)
    meta = torch.tensor([0, 1, 5], device=DEVICE)
    with pytest.raises(ValueError, match="uniforms"):
        rejection_kernels.verify(probs, meta, 1, torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="draft_probs"):
        rejection_kernels.verify(probs, meta, 1, torch.zeros(1, device=DEVICE), draft_probs=probs)


def test_switch_off_keeps_the_torch_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEDLLM_TRITON_REJECTION", "0")
    rejection.triton_enabled.cache_clear()
    try:
        layout = DraftLayout.from_counts(np.array([2]), np.zeros(2, np.int64))
        rng = SamplingRNG(0, torch.device("cpu"), use_kernel=True)
        noise, _ = draw_noise(
            3, 50, layout, rng, np.array([False]), np.zeros(1, np.uint64), np.zeros(1, np.int64),
            torch.device("cpu"),
        )  # fmt: skip
        assert noise.shape == (3, 50) and noise.dtype == torch.float32
    finally:
        rejection.triton_enabled.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["greedy", "deterministic", "probabilistic"])
def test_kernel_matches_torch_at_qwen3_vocab(mode: str) -> None:
    """64 requests of 4 drafts over qwen3's vocabulary: exactly torch's tokens given the same
    noise tensor; with hashed noise the same acceptances (the compiled hash's `lg2.approx` moves
    E in its last bits, so a near-tie of the race may go the other way: at most one request)."""
    vocab, counts = 151936, [4] * 64
    probs, layout, uniforms, greedy, q = make_case(mode, "random", counts, vocab, seed=0)
    gen = torch.Generator().manual_seed(1)
    noise = torch.empty(layout.num_rows, vocab).exponential_(generator=gen)
    ref = rejection_sample(probs.clone(), layout, noise, uniforms, greedy, q)
    dev = [to_dev(t, "cuda") for t in (probs, noise, uniforms, greedy, q)]
    check_same(ref, rejection_sample(dev[0], layout, dev[1], dev[2], dev[3], dev[4]), layout)
    keys = torch.randint(-(2**63), 2**63 - 1, (layout.num_rows,), generator=gen)
    ref = rejection_sample(probs.clone(), layout, exp_noise(keys, vocab), uniforms, greedy, q)
    got = rejection_sample(dev[0], layout, keys.cuda(), dev[2], dev[3], dev[4])
    assert [len(t) for t in got[1]] == [len(t) for t in ref[1]]
    assert sum(a != b for a, b in zip(got[1], ref[1])) <= 1
