"""The sampler's torch path (pagedllm/worker/sample/sampler.py): a chi-square test that
temperature sampling follows softmax(logits / T), greedy rows and logprobs in a mixed batch, and
the grammar's token bitmask applied before everything else. (The kernel path: test_kernels.py.)"""

from __future__ import annotations

import torch

from pagedllm.worker.sample import Sampler, SamplingMetadata
from tests.worker.sample.test_ops import random_bitmask, unpack_bits

VOCAB = 64


def random_logits(rows: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def test_temperature_sampling_follows_softmax_chi_square() -> None:
    """Pearson's statistic over 20,000 draws of a 12-token distribution; 11 degrees of freedom:
    the 0.999 quantile is 31.3, and a sampler off by a few percent scores in the hundreds."""
    num_draws, temperature = 20_000, 0.7
    logits = random_logits(1, 5)[:, :12]
    md = SamplingMetadata(
        all_greedy=False,
        all_random=True,
        temperature=torch.full((num_draws,), temperature),
        generator=torch.Generator().manual_seed(1234),
    )
    ids = Sampler().sample(logits.expand(num_draws, -1).clone(), md).token_ids
    observed = torch.bincount(ids, minlength=12).double()
    expected = torch.softmax(logits[0].double() / temperature, dim=-1) * num_draws
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 40.0, chi2


def test_greedy_rows_take_the_argmax_in_a_mixed_batch() -> None:
    logits = random_logits(8, 6)
    temperature = torch.tensor([0.0, 1.0] * 4)
    md = SamplingMetadata(
        all_greedy=False,
        all_random=False,
        temperature=temperature,
        generator=torch.Generator().manual_seed(0),
        max_num_logprobs=3,
    )
    out = Sampler().sample(logits.clone(), md)
    assert torch.equal(out.token_ids[::2], logits[::2].argmax(-1))
    raw = logits.log_softmax(-1)
    assert out.logprobs is not None
    torch.testing.assert_close(
        out.logprobs.logprobs[:, 0], raw.gather(1, out.token_ids[:, None]).squeeze(1)
    )
    ranks = (raw >= raw.gather(1, out.token_ids[:, None])).sum(-1)
    assert torch.equal(out.logprobs.ranks, ranks)
    assert torch.equal(out.logprobs.token_ids[:, 1:], raw.topk(3).indices)


def seeded_md(temperature: list[float], **kw) -> SamplingMetadata:
    """Every row with its own generator (seed 100 + row), so a row's draws are its own."""
    t = torch.tensor(temperature)
    return SamplingMetadata(
        all_greedy=bool((t == 0).all()),
        all_random=bool((t != 0).all()),
        temperature=t,
        generators={i: torch.Generator().manual_seed(100 + i) for i in range(len(temperature))},
        **kw,
    )


def test_token_bitmask_allows_only_its_tokens() -> None:
    """Random bitmasks over 30 draws of greedy and sampled rows (with logprobs, a top-k row):
    every id, sampled or argmax, is allowed; forbidden tokens' logprobs are -inf; the greedy
    rows take the argmax of the allowed tokens."""
    vocab, rows = 100, 6
    temperature = [0.0, 1.0, 1.5, 0.0, 0.7, 2.0]
    for trial in range(30):
        logits = random_logits(rows, trial, vocab)
        bitmask = random_bitmask(rows, vocab, seed=trial, density=0.1)
        allowed = unpack_bits(bitmask, vocab)
        top_k = torch.tensor([0, 0, 0, 0, 3, 0])
        md = seeded_md(temperature, max_num_logprobs=2, top_k=top_k, max_top_k=3)
        md.token_bitmask = bitmask
        out = Sampler().sample(logits.clone(), md)
        assert allowed[torch.arange(rows), out.token_ids].all(), trial
        greedy = logits.masked_fill(~allowed, float("-inf")).argmax(-1)
        assert out.token_ids[0] == greedy[0] and out.token_ids[3] == greedy[3]
        assert out.logprobs is not None
        top_ids = out.logprobs.token_ids[:, 1:]
        assert allowed.gather(1, top_ids)[allowed.sum(1) >= 2].all()
        expected = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
        torch.testing.assert_close(
            out.logprobs.logprobs[:, 0], expected.gather(1, out.token_ids[:, None]).squeeze(1)
        )


def test_rows_without_a_bitmask_draw_as_without_one() -> None:
    """A bitmask for some rows (`token_bitmask_rows`) leaves the others' ids and logprobs bit for
    bit as in a step without a bitmask, and a row whose words are all ones (-1) too."""
    vocab, rows = 90, 5
    temperature = [1.0, 0.0, 1.2, 0.9, 1.0]
    logits = random_logits(rows, 7, vocab)
    plain = Sampler().sample(logits.clone(), seeded_md(temperature, max_num_logprobs=1))
    md = seeded_md(temperature, max_num_logprobs=1)
    md.token_bitmask = random_bitmask(2, vocab, seed=8, density=0.05)
    md.token_bitmask[1] = -1
    md.token_bitmask_rows = torch.tensor([2, 4])
    masked = Sampler().sample(logits.clone(), md)
    assert plain.logprobs is not None and masked.logprobs is not None
    for r in (0, 1, 3, 4):
        assert masked.token_ids[r] == plain.token_ids[r]
        assert torch.equal(masked.logprobs.logprobs[r], plain.logprobs.logprobs[r])
    assert unpack_bits(md.token_bitmask[:1], vocab)[0, masked.token_ids[2]]
