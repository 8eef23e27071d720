"""The batched sampler against simple per-row references, on random logits: the top-k, top-p and
min-p masks, the three penalties and the token masks built by the input batch, and a chi-square
test that temperature sampling follows softmax(logits / T)."""

from __future__ import annotations

import math

import numpy as np
import torch

from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.input_batch import InputBatch
from pagedllm.worker.sampler import (
    Sampler,
    SamplingMetadata,
    apply_min_p,
    apply_top_k,
    apply_top_k_top_p,
    apply_top_k_top_p_candidates,
)
from pagedllm.worker.staging import HostStager

VOCAB = 64
NEG_INF = float("-inf")


def random_logits(rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=g) * 3


def ref_top_k(row: list[float], k: int) -> set[int]:
    if k == 0:
        return set(range(len(row)))
    kth = sorted(row, reverse=True)[k - 1]
    return {i for i, x in enumerate(row) if x >= kth}


def ref_top_p(row: list[float], keep: set[int], p: float) -> set[int]:
    """The fewest most likely tokens (of `keep`) whose probability reaches p."""
    m = max(row[i] for i in keep)
    z = sum(math.exp(row[i] - m) for i in keep)
    kept, mass = set(), 0.0
    for i in sorted(keep, key=lambda i: -row[i]):
        if mass >= p:
            break
        kept.add(i)
        mass += math.exp(row[i] - m) / z
    return kept


def ref_min_p(row: list[float], min_p: float) -> set[int]:
    m = max(row)
    return {i for i, x in enumerate(row) if math.exp(x - m) >= min_p}


def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(r != NEG_INF).flatten().tolist()) for r in logits]


def test_top_k_top_p_min_p_masks() -> None:
    rows = 48
    rng = np.random.default_rng(0)
    logits = random_logits(rows, 1)
    top_k = torch.tensor(rng.choice([0, 1, 2, 5, 17, VOCAB], rows))
    top_p = torch.tensor(rng.choice([1.0, 0.3, 0.75, 0.95], rows), dtype=torch.float32)
    min_p = torch.tensor(rng.choice([0.0, 0.01, 0.2], rows), dtype=torch.float32)
    data = logits.tolist()

    only_k = logits.clone()
    apply_top_k(only_k, top_k, int(top_k.max()))
    assert kept(only_k) == [ref_top_k(r, int(k)) for r, k in zip(data, top_k)]

    k_and_p = apply_top_k_top_p(logits.clone(), top_k, top_p)
    expected = [ref_top_p(r, ref_top_k(r, int(k)), float(p)) for r, k, p in zip(data, top_k, top_p)]
    assert kept(k_and_p) == expected

    # Every row with a top-k: only the top-k candidates are sorted.
    all_k = torch.where(top_k == 0, 3, top_k).clamp(max=40)
    k_and_p = apply_top_k_top_p_candidates(logits.clone(), all_k, int(all_k.max()), top_p)
    expected = [ref_top_p(r, ref_top_k(r, int(k)), float(p)) for r, k, p in zip(data, all_k, top_p)]
    assert kept(k_and_p) == expected
    assert torch.equal(k_and_p, apply_top_k_top_p(logits.clone(), all_k, top_p))

    only_p = apply_top_k_top_p(logits.clone(), None, top_p)
    expected = [ref_top_p(r, set(range(VOCAB)), float(p)) for r, p in zip(data, top_p)]
    assert kept(only_p) == expected

    with_min_p = logits.clone()
    apply_min_p(with_min_p, min_p)
    assert kept(with_min_p) == [ref_min_p(r, float(m)) for r, m in zip(data, min_p)]


def ref_processed(
    row: list[float], prompt: list[int], output: list[int], sp: SamplingParams, eos: int
) -> list[float]:
    """One row through allowed ids, bad words, min_tokens, logit bias and the penalties."""
    out = list(row)
    if sp.allowed_token_ids:
        out = [x if i in sp.allowed_token_ids else NEG_INF for i, x in enumerate(out)]
    for word in sp.bad_words_token_ids:
        if len(word) - 1 <= len(output) and output[len(output) - len(word) + 1 :] == word[:-1]:
            out[word[-1]] = NEG_INF
    if len(output) < sp.min_tokens:
        for t in sp.all_stop_token_ids | {eos}:
            out[t] = NEG_INF
    for t, bias in (sp.logit_bias or {}).items():
        out[t] += bias
    for t in range(len(out)):
        count = output.count(t)
        if t in prompt or count:
            rp = sp.repetition_penalty
            out[t] = out[t] / rp if out[t] > 0 else out[t] * rp
        out[t] -= sp.frequency_penalty * count + sp.presence_penalty * (count > 0)
    return out


def random_params(rng: np.random.Generator) -> SamplingParams:
    sp = SamplingParams(
        temperature=1.0,
        presence_penalty=float(rng.choice([0.0, 0.5, -1.0])),
        frequency_penalty=float(rng.choice([0.0, 0.3, 1.5])),
        repetition_penalty=float(rng.choice([1.0, 1.3, 0.7])),
        min_tokens=int(rng.choice([0, 0, 8])),
        max_tokens=32,
        stop_token_ids=[int(rng.integers(VOCAB))],
        logit_bias={int(t): float(rng.normal() * 5) for t in rng.integers(0, VOCAB, 3)}
        if rng.random() < 0.5
        else None,
        allowed_token_ids=[int(t) for t in rng.integers(0, VOCAB, 20)]
        if rng.random() < 0.3
        else None,
    )
    if rng.random() < 0.5:
        sp.bad_words_token_ids = [
            [int(t) for t in rng.integers(0, VOCAB, n)] for n in rng.integers(1, 4, 3)
        ]
    return sp


def test_penalties_and_token_masks_from_the_input_batch() -> None:
    rng = np.random.default_rng(3)
    eos = 2
    batch = InputBatch(
        max_num_reqs=16, max_model_len=64, max_blocks_per_req=4, eos_token_ids=(eos,)
    )
    reqs = []
    for i in range(12):
        sp = random_params(rng)
        # Few distinct tokens, so tokens repeat and bad-word prefixes match now and then.
        prompt = [int(t) for t in rng.integers(0, 8, rng.integers(1, 20))]
        output = [int(t) for t in rng.integers(0, 8, rng.integers(0, 12))]
        if sp.bad_words_token_ids and output and rng.random() < 0.7:
            word = sp.bad_words_token_ids[0]
            sp.bad_words_token_ids[0] = output[len(output) - len(word) + 1 :] + [word[-1]]
        batch.add_request(f"r{i}", prompt, output, [], sp)
        reqs.append((prompt, output, sp))
    # Bad words look at output tokens only: a prompt ending in a bad word's prefix bans nothing.
    sp = SamplingParams(max_tokens=8)
    sp.bad_words_token_ids = [[1, 2, 3], [4, 5]]
    batch.add_request("r12", [7, 1, 2, 4], [], [], sp)
    reqs.append(([7, 1, 2, 4], [], sp))
    # Rows are reused: a removed request's entries must not leak into the next one's row.
    batch.remove_request("r3")
    batch.add_request("r13", [5, 6], [7], [], SamplingParams(max_tokens=8))
    reqs.append(([5, 6], [7], SamplingParams(max_tokens=8)))
    names = [f"r{i}" for i in range(14) if i != 3]
    rows = np.array([batch.req_to_row[names[i]] for i in rng.permutation(len(names))])
    logits = random_logits(len(rows), 4)
    md = batch.make_sampling_metadata(rows, HostStager(torch.device("cpu")), None)
    processed = logits.clone()
    Sampler._apply_logits_processors(processed, md)
    row_to_req = {batch.req_to_row[n]: reqs[int(n[1:])] for n in names}
    for k, row in enumerate(rows):
        prompt, output, sp = row_to_req[int(row)]
        expected = torch.tensor(ref_processed(logits[k].tolist(), prompt, output, sp, eos))
        torch.testing.assert_close(processed[k], expected, rtol=1e-5, atol=1e-5)


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
    ids = Sampler()(logits.expand(num_draws, -1).clone(), md).token_ids
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
    out = Sampler()(logits.clone(), md)
    assert torch.equal(out.token_ids[::2], logits[::2].argmax(-1))
    raw = logits.log_softmax(-1)
    assert out.logprobs is not None
    torch.testing.assert_close(
        out.logprobs.logprobs[:, 0], raw.gather(1, out.token_ids[:, None]).squeeze(1)
    )
    ranks = (raw >= raw.gather(1, out.token_ids[:, None])).sum(-1)
    assert torch.equal(out.logprobs.ranks, ranks)
    assert torch.equal(out.logprobs.token_ids[:, 1:], raw.topk(3).indices)


def test_chunked_argmax_is_argmax() -> None:
    """The chunked argmax (few long rows on the GPU) returns torch's index, the first maximum,
    with ties inside a chunk, across chunks, and -inf rows; on the GPU too when there is one."""

    from pagedllm.worker.sampler import argmax_rows

    gen = torch.Generator().manual_seed(3)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for vocab in (128256, 151936, 49152, 1000):
        x = torch.randn(5, vocab, generator=gen)
        x[1, 77] = x[1, vocab - 3] = 50.0  # tie across chunks: the first wins
        x[2, 10] = x[2, 11] = 60.0  # tie within a chunk
        x[3] = float("-inf")
        x[3, vocab // 2] = 0.0
        x[4, :] = 7.0  # all equal: index 0
        for device in devices:
            for dtype in (torch.float32, torch.bfloat16):
                y = x.to(device, dtype)
                assert torch.equal(argmax_rows(y, chunked=True), y.argmax(dim=-1)), (vocab, dtype)
                assert torch.equal(argmax_rows(y), y.argmax(dim=-1))
