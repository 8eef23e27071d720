"""Logprobs (pagedllm/worker/sample/logprobs.py) against a per-row reference: the chosen token's
logprob and rank, the top-N, prompt logprobs from logits of any dtype, and the host-side rows the
engine gets. (Against HF through the whole engine: tests/sampling/test_logprobs.py.)"""

from __future__ import annotations

import numpy as np
import torch

from pagedllm.worker.sample.logprobs import (
    HostLogprobs,
    compute_logprobs,
    compute_prompt_logprobs,
)


def random_logprobs(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * 3).log_softmax(-1)


def test_chosen_logprob_rank_and_top_n() -> None:
    raw = random_logprobs(6, 50, 0)
    raw[5, :] = raw[5, 0]  # all tied: every token has rank 50
    chosen = torch.tensor([0, 7, 49, 3, int(raw[4].argmax()), 9])
    out = compute_logprobs(raw, chosen, 4)
    assert out.token_ids.shape == out.logprobs.shape == (6, 5)
    for r in range(6):
        row = raw[r].tolist()
        c = int(chosen[r])
        assert out.token_ids[r, 0] == c and out.logprobs[r, 0] == raw[r, c]
        assert int(out.ranks[r]) == sum(x >= row[c] for x in row)
        top = sorted(range(50), key=lambda t: -row[t])[:4]
        assert torch.equal(out.logprobs[r, 1:], raw[r, top])
    assert out.ranks[4] == 1 and out.ranks[5] == 50
    only = compute_logprobs(raw, chosen, 0)
    assert only.token_ids.shape == (6, 1) and torch.equal(only.ranks, out.ranks)
    assert torch.equal(only.logprobs[:, 0], out.logprobs[:, 0])


def test_prompt_logprobs_are_the_fp32_log_softmax() -> None:
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(5, 40, generator=g) * 4).to(torch.bfloat16)
    targets = torch.tensor([1, 2, 3, 39, 0])
    out = compute_prompt_logprobs(logits, targets, 3)
    expected = compute_logprobs(logits.float().log_softmax(-1), targets, 3)
    assert out.logprobs.dtype == torch.float32
    for a, b in zip(
        (out.token_ids, out.logprobs, out.ranks),
        (expected.token_ids, expected.logprobs, expected.ranks),
    ):
        assert torch.equal(a, b)


def test_host_rows_slice_the_copied_arrays() -> None:
    raw = random_logprobs(4, 30, 2)
    lp = compute_logprobs(raw, torch.tensor([1, 2, 3, 4]), 3)
    host = HostLogprobs(lp.token_ids.numpy(), lp.logprobs.numpy(), lp.ranks.numpy())
    rows = host.rows(1, 3, 2, start=7)
    assert rows.start == 7
    assert rows.token_ids == lp.token_ids[1:3, :3].tolist()
    assert rows.logprobs == lp.logprobs[1:3, :3].tolist()
    assert rows.ranks == lp.ranks[1:3].tolist()
    assert all(isinstance(x, int) for x in rows.token_ids[0])
    one = host.rows(0, 1, 0)
    assert one.token_ids == [[1]] and np.isclose(one.logprobs[0][0], float(raw[0, 1]))
