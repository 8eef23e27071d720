"""The sampler's torch ops (pagedllm/worker/sample/ops.py) against simple per-row references, on
random logits: the top-k, top-p and min-p masks, the chunked argmax, and the grammar's token
bitmask (xgrammar's packed layout)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pagedllm.worker.sample.ops import (
    apply_min_p,
    apply_token_bitmask,
    apply_top_k,
    apply_top_k_top_p,
    apply_top_k_top_p_candidates,
    argmax_rows,
)

VOCAB = 64
NEG_INF = float("-inf")


def random_logits(rows: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


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


def test_chunked_argmax_is_argmax() -> None:
    """The chunked argmax (few long rows on the GPU) returns torch's index, the first maximum,
    with ties inside a chunk, across chunks, and -inf rows; on the GPU too when there is one."""
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


# ----- the grammar's token bitmask -----


def random_bitmask(rows: int, vocab: int, seed: int, density: float = 0.3) -> torch.Tensor:
    """A random int32 [rows, ceil(vocab / 32)] bitmask (xgrammar's layout), garbage bits past
    `vocab` included, at least one allowed token per row."""
    rng = np.random.default_rng(seed)
    words = -(-vocab // 32)
    bits = rng.random((rows, words * 32)) < density
    bits[np.arange(rows), rng.integers(0, vocab, rows)] = True
    return pack_bits(bits)


def pack_bits(bits: np.ndarray) -> torch.Tensor:
    """bool [rows, 32 W] → int32 [rows, W]: bit j of word i is token 32 i + j."""
    rows, width = bits.shape
    weights = np.uint64(1) << np.arange(32, dtype=np.uint64)
    words = (bits.reshape(rows, width // 32, 32).astype(np.uint64) * weights).sum(-1)
    return torch.from_numpy(words.astype(np.uint32).view(np.int32))


def unpack_bits(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """The reference unpacking, one token at a time: bool [rows, vocab]."""
    words = bitmask.numpy().view(np.uint32)
    allowed = [
        [(int(words[r, t // 32]) >> (t % 32)) & 1 == 1 for t in range(vocab)]
        for r in range(words.shape[0])
    ]
    return torch.tensor(allowed, dtype=torch.bool)


@pytest.mark.parametrize("vocab", [64, 100, 1000])
def test_token_bitmask_masks_exactly_the_forbidden_tokens(vocab) -> None:
    """Row for row: forbidden tokens are -inf, allowed ones keep their logits bit for bit; the
    sign bit (token 32 i + 31) and the bits past the vocabulary count as they should."""
    logits = random_logits(6, 2, vocab)
    bitmask = random_bitmask(6, vocab, seed=vocab)
    bitmask[0] = -1  # every bit: nothing forbidden
    bitmask[1, 0] = np.int32(np.uint32(1 << 31).view(np.int32))  # only token 31 of the first 32
    allowed = unpack_bits(bitmask, vocab)
    out = logits.clone()
    apply_token_bitmask(out, bitmask)
    assert torch.equal(out[allowed], logits[allowed])
    assert out[~allowed].isneginf().all()
    assert torch.equal(out[0], logits[0])
    assert allowed[1, 31] and not allowed[1, :31].any()


def test_token_bitmask_of_some_rows_leaves_the_others_untouched() -> None:
    vocab = 77
    logits = random_logits(5, 3, vocab)
    logits[4, 3] = NEG_INF  # a -inf of its own stays
    rows = torch.tensor([3, 0])
    bitmask = random_bitmask(2, vocab, seed=4)
    out = logits.clone()
    apply_token_bitmask(out, bitmask, rows)
    for r in (1, 2, 4):
        assert torch.equal(out[r], logits[r])
    allowed = unpack_bits(bitmask, vocab)
    for i, r in enumerate(rows.tolist()):
        assert torch.equal(out[r][allowed[i]], logits[r][allowed[i]])
        assert out[r][~allowed[i]].isneginf().all()


def test_token_bitmask_shape_is_checked() -> None:
    logits = torch.zeros(2, 70)
    with pytest.raises(ValueError, match="int32"):
        apply_token_bitmask(logits, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        apply_token_bitmask(logits, torch.zeros(2, 2, dtype=torch.int32))  # 70 tokens: 3 words
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        apply_token_bitmask(logits, torch.zeros(2, 3, dtype=torch.int32), torch.tensor([1]))
