"""The one-pass sampling kernel (pagedllm/worker/sample/kernels.py) and the sampler's kernel path.

Without a GPU the kernel runs on CPU tensors under Triton's interpreter. The reference mirrors
the kernel's noise in numpy (the same 32-bit hash, uniform and Gumbel transform, in the same
fp32 operations) and takes `argmax(score)` with torch: the kernel must pick the same ids, token
for token. The statistics of the noise are checked on the mirror over many draws (the
interpreter runs under a hundred programs a second), and a few hundred kernel draws equal it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.triton_interpreter import kernel_test_device

DEVICE = kernel_test_device()  # NOTE: before triton is first imported

from pagedllm.worker.input_batch import InputBatch  # noqa: E402
from pagedllm.worker.sample import Sampler, SamplingMetadata  # noqa: E402
from pagedllm.worker.sample import kernels as sample_kernels  # noqa: E402
from pagedllm.worker.sample.metadata import TokenPairs, row_sample_keys  # noqa: E402
from tests.triton_interpreter import patch_interpreter  # noqa: E402
from tests.worker.sample.test_ops import random_bitmask, unpack_bits  # noqa: E402

if DEVICE == "cpu":
    patch_interpreter()

NEG_INF = float("-inf")
LOG2E = 1.4426950408889634


# ----- the numpy mirror of the kernel's noise -----


def lowbias32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> 16)
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> 16)


def gumbel_log2(keys: np.ndarray, vocab: int) -> np.ndarray:
    """float32 [R, vocab]: the kernel's noise `-log2(E)` of rows keyed `keys` (int64 [R])."""
    k = np.asarray(keys, np.int64).view(np.uint64)
    lo = (k & np.uint64(0xFFFFFFFF)).astype(np.uint32)[:, None]
    hi = (k >> np.uint64(32)).astype(np.uint32)[:, None]
    v = np.arange(vocab, dtype=np.uint32)[None, :]
    h = lowbias32(lowbias32(v ^ lo) ^ hi)
    w = ((h >> 8) | 1).astype(np.float32) * np.float32(2.0**-24)
    series = w * (1.0 + w * (0.5 + w * (0.33333334 + w * (0.25 + w * (0.2 + w * 0.16666667)))))
    e = np.where(w < 0.0625, series, np.log2(np.float32(1) - w) * np.float32(-math.log(2)))
    return -np.log2(e)


def reference(logits: torch.Tensor, inv_temp: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The kernel's math in torch over the mirrored noise: `x * (inv_temp * log2(e)) + G` for
    sampled rows, `x` for greedy ones (inv_temp 0), then the first maximum."""
    x = logits.cpu().float()
    scale = (inv_temp.cpu() * LOG2E).unsqueeze(1)  # fp32, as the kernel's
    noise = torch.from_numpy(gumbel_log2(keys.cpu().numpy(), x.shape[1]))
    score = torch.where(inv_temp.cpu().unsqueeze(1) == 0, x, x * scale + noise)
    return score.argmax(dim=1)


def random_keys(rows: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(-(2**63), 2**63, rows, np.int64))


def dev(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in ts]


# ----- the kernel against the mirror -----


def mixed_rows(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8 rows: sampled at T = 0.6, 1, 1.7 and 0.25, greedy ones, -inf entries (banned tokens, a
    row with one finite entry, an all -inf row)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(8, vocab, generator=gen) * 2
    banned = torch.rand(8, vocab, generator=gen) < 0.3
    x[1:3].masked_fill_(banned[1:3], NEG_INF)
    x[4] = NEG_INF
    x[4, vocab - 2] = 0.5  # one finite entry, in the last chunk
    x[5] = NEG_INF  # all -inf: id 0
    temperature = torch.tensor([0.6, 1.0, 0.0, 1.7, 0.6, 0.9, 0.0, 0.25])
    inv = torch.where(temperature == 0, 0.0, 1 / temperature.clamp_min(1e-6))
    return x, inv, random_keys(8, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab,chunk,block", [(3001, 700, 256), (5000, None, 1024)])
def test_kernel_matches_reference(dtype, vocab, chunk, block) -> None:
    """Token for token, chunks that do not divide the vocabulary (3001 = 4 x 700 + 201, each
    chunk read in 256-entry tiles, the last one partial) and the default chunking."""
    for seed in range(2):
        x, inv, keys = mixed_rows(vocab, seed)
        x = x.to(dtype)
        got = sample_kernels.sample_rows(*dev(x, inv, keys), chunk_size=chunk, block=block)
        expected = reference(x, inv, keys)
        assert got.dtype == torch.int64
        assert torch.equal(got.cpu(), expected), (seed, got, expected)
        assert got[4] == vocab - 2 and got[5] == 0
        assert torch.equal(got[[2, 6]].cpu(), x[[2, 6]].float().argmax(1))
        finite = x.float().gather(1, got.cpu().unsqueeze(1)).isfinite().squeeze(1)
        assert finite[[0, 1, 2, 3, 4, 6, 7]].all(), "a -inf entry won"
        # The noise matters: sampled rows do not all take the argmax.
        assert not torch.equal(got[[0, 3]].cpu(), x[[0, 3]].float().argmax(1))


def test_greedy_is_argmax_with_ties() -> None:
    """Greedy rows (no noise at all, or inv_temp 0 in a sampling launch) give `torch.argmax`:
    the first maximum with ties inside a tile, across tiles and chunks, and -inf rows."""
    gen = torch.Generator().manual_seed(3)
    vocab = 2999
    x = torch.randn(7, vocab, generator=gen)
    x[1, 77] = x[1, vocab - 3] = 50.0  # tie across chunks
    x[2, 10] = x[2, 11] = 60.0  # tie within a tile
    x[3] = NEG_INF
    x[3, vocab // 2] = 0.0
    x[4] = 7.0  # all equal: index 0
    x[5] = NEG_INF  # all -inf: index 0
    x[6, 1023] = x[6, 1024] = x[6, 2000] = 9.0  # tie across a tile boundary
    zeros = torch.zeros(7)
    keys = random_keys(7, 0)
    for dtype in (torch.float32, torch.bfloat16):
        y = x.to(dtype)
        expected = y.argmax(dim=-1)
        for chunk, block in ((None, 1024), (1000, 256), (512, 512)):
            (yd,) = dev(y)
            got = sample_kernels.sample_rows(yd, chunk_size=chunk, block=block)
            assert torch.equal(got.cpu(), expected), (dtype, chunk)
        got = sample_kernels.sample_rows(*dev(y, zeros, keys), chunk_size=1000, block=256)
        assert torch.equal(got.cpu(), expected), dtype


def test_chunking_fills_the_gpu_and_divides_the_row() -> None:
    for rows in (1, 16, 64, 256, 4096):
        for vocab in (151936, 128256, 3000, 12):
            chunks, size = sample_kernels.chunking(rows, vocab)
            assert size % sample_kernels.BLOCK == 0 and (chunks - 1) * size < vocab <= chunks * size
            if vocab >= 2 * sample_kernels.MIN_CHUNK:
                assert size >= sample_kernels.MIN_CHUNK - sample_kernels.BLOCK
            if rows <= 16 and vocab > 100_000:
                assert rows * chunks >= 16, (rows, vocab, chunks)


def test_bad_arguments_are_refused() -> None:
    x = torch.zeros(2, 10)
    with pytest.raises(ValueError, match="both"):
        sample_kernels.sample_rows(x, torch.ones(2))
    with pytest.raises(ValueError, match="int64"):
        sample_kernels.sample_rows(x, torch.ones(2), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="unit stride"):
        sample_kernels.sample_rows(x.t())
    assert sample_kernels.sample_rows(x[:0]).shape == (0,)


# ----- statistics of the noise -----


def chi_square(ids: np.ndarray, probs: np.ndarray) -> float:
    observed = np.bincount(ids, minlength=probs.size)
    expected = probs * ids.size
    return float(((observed - expected) ** 2 / expected).sum())


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_mirrored_draws_follow_softmax_chi_square() -> None:
    """200,000 draws of a 12-token row at T = 0.7 (every expected count above 200), each with its
    own key (unseeded keys of successive steps, as `SamplingRNG.sample_keys` makes them).
    Pearson's statistic, 11 degrees of freedom: the 0.999 quantile is 31.3 (bound: 40). The bound
    has power: the same draws scored against T = 0.72, or drawn with noise 3 % too wide, or with
    a uniform in place of the exponential (`-log u`, a classic slip), score 225, 219 and 10,800
    (asserted: > 100, > 100, > 1000)."""
    num_draws, temperature = 200_000, 0.7
    logits = np.random.default_rng(5).normal(size=12).astype(np.float32) * 1.5
    probs = softmax(logits / temperature)
    batch = InputBatch(max_num_reqs=1000, max_model_len=8, max_blocks_per_req=1)
    rows = np.arange(1000)
    keys = np.concatenate(
        [row_sample_keys(batch, rows, step).view(np.int64) for step in range(num_draws // 1000)]
    )
    noise = gumbel_log2(keys, 12)
    scale = np.float32(1 / temperature) * np.float32(LOG2E)
    ids = (logits * scale + noise).argmax(1)
    assert chi_square(ids, probs) < 40.0
    assert chi_square(ids, softmax(logits / 0.72)) > 100.0
    assert chi_square((logits * scale + noise * np.float32(1.03)).argmax(1), probs) > 100.0
    w = -np.expm1(-np.exp2(-noise))  # the uniforms back from E
    assert chi_square((logits * scale - np.log2(w)).argmax(1), probs) > 1000


def test_mirrored_rare_token_frequency() -> None:
    """A token of probability 1e-3 beside a dominant one: it wins on the noise's upper tail (E
    near 0: the series branch) against the dominant token's bulk (mostly the log branch).
    10^6 draws: 1000 expected, sigma 31.6; bound 5 sigma. Measured power: a series in other
    units than the log branch (x log2(e)) or the branches swapped land 8-10 sigma off."""
    num_draws = 1_000_000
    p = 1e-3
    logits = np.array([0.0, math.log(p / (1 - p))], np.float32)
    keys = random_keys(num_draws, 7).numpy()
    ids = (logits * np.float32(LOG2E) + gumbel_log2(keys, 2)).argmax(1)
    assert abs(int(ids.sum()) - p * num_draws) < 5 * math.sqrt(num_draws * p * (1 - p))


@pytest.mark.slow
def test_kernel_draws_equal_mirrored_draws() -> None:
    """The statistical test's setting through the kernel itself (200 draws): the same ids."""
    logits = torch.from_numpy(np.random.default_rng(5).normal(size=12).astype(np.float32) * 1.5)
    x = logits.expand(200, -1).contiguous()
    inv = torch.full((200,), 1 / 0.7)
    keys = random_keys(200, 11)
    got = sample_kernels.sample_rows(*dev(x, inv, keys))
    expected = reference(x, inv, keys)
    assert torch.equal(got.cpu(), expected)
    assert len(set(got.tolist())) >= 5  # a spread of tokens, not one


# ----- the sampler's kernel path -----


def kernel_md(inv: torch.Tensor, keys: torch.Tensor, **kw) -> SamplingMetadata:
    temperature = torch.where(inv == 0, 0.0, 1 / inv.clamp_min(1e-30))
    greedy = inv == 0
    return SamplingMetadata(
        all_greedy=bool(greedy.all()),
        all_random=not bool(greedy.any()),
        temperature=temperature.to(DEVICE),
        inv_temperature=inv.to(DEVICE),
        sample_keys=keys.to(DEVICE),
        **kw,
    )


def test_sampler_reads_the_model_logits_without_a_copy(monkeypatch) -> None:
    """No processor, no filter, no logprobs: the kernel gets the bf16 logits themselves; with
    logprobs or a banned token it gets the fp32 copy, and the logprobs are today's."""
    seen: list[torch.Tensor] = []
    real = sample_kernels.sample_rows

    def spy(logits, *args, **kw):
        seen.append(logits)
        return real(logits, *args, **kw)

    monkeypatch.setattr(sample_kernels, "sample_rows", spy)
    x, inv, keys = mixed_rows(1500, 4)
    x = x[[0, 1, 2, 3, 6, 7]].to(torch.bfloat16).to(DEVICE)
    inv, keys = inv[[0, 1, 2, 3, 6, 7]], keys[[0, 1, 2, 3, 6, 7]]
    sampler = Sampler(use_kernel=True)
    out = sampler.sample(x, kernel_md(inv, keys))
    assert seen[-1] is x and out.logprobs is None
    assert torch.equal(out.token_ids.cpu(), reference(x, inv, keys))
    greedy = sampler.sample(x, kernel_md(torch.zeros(6), keys))
    assert seen[-1] is x and torch.equal(greedy.token_ids, x.argmax(-1))

    out_lp = sampler.sample(x, kernel_md(inv, keys, max_num_logprobs=2))
    assert seen[-1].dtype == torch.float32
    assert torch.equal(out_lp.token_ids, out.token_ids)
    raw = x.float().log_softmax(-1)
    assert out_lp.logprobs is not None
    torch.testing.assert_close(
        out_lp.logprobs.logprobs[:, 0], raw.gather(1, out.token_ids[:, None]).squeeze(1)
    )
    assert torch.equal(out_lp.logprobs.token_ids[:, 1:], raw.topk(2).indices)

    banned = TokenPairs(*dev(torch.arange(6), out.token_ids.cpu()))
    out_ban = sampler.sample(x, kernel_md(inv, keys, banned=banned))
    assert seen[-1].dtype == torch.float32
    assert not (out_ban.token_ids == out.token_ids).any()


def test_sampler_filters_keep_unfiltered_rows_draws() -> None:
    """top-k / top-p / min-p rows are masked first; the other rows of the batch draw exactly
    what they draw in a batch without filters (so a seeded row's ids do not depend on its
    neighbours' parameters), and top_k = 1 gives the argmax."""
    x, inv, keys = mixed_rows(1200, 8)
    x, inv, keys = x[[0, 1, 2, 3, 6, 7]], inv[[0, 1, 2, 3, 6, 7]], keys[[0, 1, 2, 3, 6, 7]]
    (xd,) = dev(x)
    sampler = Sampler(use_kernel=True)
    plain = sampler.sample(xd.clone(), kernel_md(inv, keys)).token_ids.cpu()
    top_k = torch.tensor([0, 1, 0, 1, 0, 0])
    top_p = torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0, 0.2])
    md = kernel_md(inv, keys, top_k=top_k.to(DEVICE), max_top_k=1, top_p=top_p.to(DEVICE))
    filtered = sampler.sample(xd.clone(), md).token_ids.cpu()
    for r in (0, 2, 4):  # no filter of their own (row 2 is greedy with a top_p: no effect)
        assert filtered[r] == plain[r]
    assert filtered[[1, 3]].tolist() == x[[1, 3]].argmax(1).tolist()
    # top_p 0.2 at T = 0.25: only the most likely tokens whose mass reaches 0.2 stay.
    probs = (x[5] * inv[5]).softmax(-1)
    order = probs.argsort(descending=True)
    keep = order[: int((probs[order].cumsum(0) < 0.2).sum()) + 1]
    assert int(filtered[5]) in keep.tolist()
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.5])
    md = kernel_md(inv, keys, min_p=min_p.to(DEVICE))
    with_min_p = sampler.sample(xd.clone(), md).token_ids.cpu()
    assert torch.equal(with_min_p[:5], plain[:5])
    assert probs[with_min_p[5]] >= 0.5 * probs.max()


def test_sampler_applies_the_token_bitmask_first() -> None:
    """With a filter, the bitmask is applied to the fp32 copy before it; every id (greedy or sampled, a top-k row
    among them) is allowed; rows left out of the bitmask draw exactly as without one."""
    x, inv, keys = mixed_rows(1000, 12)
    x, inv, keys = x[[0, 1, 2, 3, 6, 7]], inv[[0, 1, 2, 3, 6, 7]], keys[[0, 1, 2, 3, 6, 7]]
    (xd,) = dev(x.to(torch.bfloat16))
    sampler = Sampler(use_kernel=True)
    plain = sampler.sample(xd, kernel_md(inv, keys)).token_ids.cpu()
    bitmask = random_bitmask(4, 1000, seed=13, density=0.05)
    allowed = unpack_bits(bitmask, 1000)
    top_k = torch.tensor([0, 0, 0, 2, 0, 0])
    md = kernel_md(inv, keys, top_k=top_k.to(DEVICE), max_top_k=2)
    md.token_bitmask, md.token_bitmask_rows = dev(bitmask, torch.tensor([0, 2, 3, 5]))
    got = sampler.sample(xd, md).token_ids.cpu()
    for i, r in enumerate((0, 2, 3, 5)):
        assert allowed[i, got[r]], r
    masked = x.float()[[0, 2, 3, 5]].masked_fill(~allowed, NEG_INF)
    assert got[2] == masked[1].argmax(), "the greedy row: the argmax of its allowed tokens"
    assert torch.equal(got[[1, 4]], plain[[1, 4]]), "rows without a bitmask"
    assert not torch.equal(got[[0, 5]], plain[[0, 5]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_reads_the_bitmask_in_its_pass(dtype) -> None:
    """`sample_rows(..., bitmask=, bitmask_index=)` draws exactly what the kernel draws from the
    logits with the forbidden tokens at -inf (`ops.apply_token_bitmask`), greedy and sampled,
    for the masked rows; an index of -1 leaves a row as without a bitmask. A vocabulary that
    is not a multiple of 32 (the last word's extra bits are garbage) and of the block."""
    from pagedllm.worker.sample.ops import apply_token_bitmask

    vocab = 1000
    keep = [0, 1, 2, 3, 6, 7]  # NOTE: not the all -inf row (its id 0 may be forbidden)
    x, inv, keys = (t[keep] for t in mixed_rows(vocab, 17))
    (xd,) = dev(x.to(dtype))
    bitmask = random_bitmask(4, vocab, seed=21, density=0.1)
    index = torch.tensor([2, -1, 0, 3, -1, 1], dtype=torch.int32)
    bitmask_d, index_d = dev(bitmask, index)
    masked = xd.float().clone()
    rows_with = torch.tensor([2, 5, 0, 3])  # bitmask row i belongs to logits row rows_with[i]
    (rows_d,) = dev(rows_with)
    apply_token_bitmask(masked, bitmask_d, rows_d)
    for sample in (False, True):
        args = (inv, keys) if sample else ()
        args_d = dev(*args) if sample else ()
        got = sample_kernels.sample_rows(
            xd, *args_d, bitmask=bitmask_d, bitmask_index=index_d, chunk_size=256, block=128
        ).cpu()
        want = sample_kernels.sample_rows(masked.to(dtype), *args_d, chunk_size=256).cpu()
        assert torch.equal(got, want), (sample, got, want)
        allowed = unpack_bits(bitmask, vocab)
        for r, i in enumerate(index.tolist()):
            if i >= 0:
                assert allowed[i, got[r]], (sample, r)


def test_sampler_kernel_path_masks_in_the_pass(monkeypatch) -> None:
    """With the bitmask the only processing, the sampler hands the model's bf16 logits and the
    bitmask to the kernel (no fp32 copy, no torch mask); the ids equal the torch-masked ones."""
    keep = [0, 1, 2, 3, 6, 7]
    x, inv, keys = (t[keep] for t in mixed_rows(1000, 19))
    (xd,) = dev(x.to(torch.bfloat16))
    bitmask = random_bitmask(3, 1000, seed=5, density=0.05)
    sampler = Sampler(use_kernel=True)
    md = kernel_md(inv, keys)
    md.token_bitmask, md.token_bitmask_rows = dev(bitmask, torch.tensor([1, 3, 4]))
    import pagedllm.worker.sample.sampler as sampler_module

    def no_torch_mask(*args, **kwargs):
        raise AssertionError("the torch bitmask op ran")

    monkeypatch.setattr(sampler_module, "apply_token_bitmask", no_torch_mask)
    seen = []
    real = sample_kernels.sample_rows

    def spy(logits, *args, **kwargs):
        seen.append((logits.dtype, kwargs.get("bitmask") is not None))
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(sample_kernels, "sample_rows", spy)
    got = sampler.sample(xd, md).token_ids.cpu()
    assert seen == [(torch.bfloat16, True)]
    allowed = unpack_bits(bitmask, 1000)
    for i, r in enumerate((1, 3, 4)):
        assert allowed[i, got[r]]
    monkeypatch.undo()
    md2 = kernel_md(inv, keys, min_p=torch.zeros(6).to(DEVICE))  # a filter: the torch mask
    md2.token_bitmask, md2.token_bitmask_rows = md.token_bitmask, md.token_bitmask_rows
    assert torch.equal(sampler.sample(xd, md2).token_ids.cpu(), got)


def test_benchmark_script_runs(capsys) -> None:
    """`python -m pagedllm.benchmarks.sampler --tiny` (its GPU run is the lead's)."""
    from pagedllm.benchmarks import sampler as sampler_bench

    sampler_bench.main(["--device", DEVICE, "--tiny"] if DEVICE == "cpu" else ["--rows", "1"])
    out = capsys.readouterr().out
    assert "WRONG" not in out and out.count("\n") >= 3
