"""The standard request sets (T1, T2, T3) as token-id prompts with output lengths."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def t1_requests(
    num_prompts: int = 256,
    input_len: tuple[int, int] = (100, 1024),
    output_len: tuple[int, int] = (100, 1024),
    vocab_size: int = 32000,
    seed: int = 0,
) -> list[BenchRequest]:
    """T1: lengths drawn with Random(seed) (input, then output, per request); prompt ids drawn
    uniformly from the vocabulary with Random(seed + 1)."""
    len_rng, tok_rng = random.Random(seed), random.Random(seed + 1)
    lens = []
    for _ in range(num_prompts):
        n_in = len_rng.randint(*input_len)
        n_out = len_rng.randint(*output_len)
        lens.append((n_in, n_out))
    return [
        BenchRequest([tok_rng.randrange(vocab_size) for _ in range(n_in)], n_out)
        for n_in, n_out in lens
    ]


def t3_requests(
    num_prompts: int = 200,
    prefix_len: int = 2000,
    suffix_len: int = 100,
    output_len: int = 64,
    vocab_size: int = 32000,
    seed: int = 0,
) -> list[BenchRequest]:
    """T3: one shared prefix, then a unique suffix per request (ids uniform, Random(seed))."""
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab_size) for _ in range(prefix_len)]
    return [
        BenchRequest(prefix + [rng.randrange(vocab_size) for _ in range(suffix_len)], output_len)
        for _ in range(num_prompts)
    ]
