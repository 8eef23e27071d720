"""Incremental detokenization equals decoding the whole, never emits a partial character, and
honors skip_special_tokens; with the tiny byte-level BPE tokenizer, random token sequences split
multi-byte characters across tokens."""

from __future__ import annotations

import random

import pytest

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

TEXT = "Hello 😀 wörld! 中文字符 🎉🎉 naïve café — ok"


def stream(tokenizer, ids, params, prompt=(), chunk_sizes=None) -> list[str]:
    """Feeds `ids` in chunks; returns the text pieces emitted per step (DELTA)."""
    detok = IncrementalDetokenizer(tokenizer, params, list(prompt))
    rng = random.Random(len(ids))
    pieces, i = [], 0
    while i < len(ids):
        n = chunk_sizes(rng) if chunk_sizes else 1
        new, i = ids[i : i + n], i + n
        finished = i >= len(ids)
        detok.update(new, stop_terminated=False, finished=finished)
        pieces.append(detok.get_next_output_text(finished, delta=True))
    return pieces


def test_emoji_and_cjk_never_emit_partial_characters(tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = stream(tokenizer, ids, SamplingParams())
    assert len(ids) > len(TEXT.encode()) // 2, "the tiny tokenizer splits these characters"
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TEXT
    # The same after a prompt (the first output token is decoded with prompt context).
    prompt = tokenizer.encode("The quick brown fox", add_special_tokens=False)
    pieces = stream(tokenizer, ids, SamplingParams(), prompt, lambda r: r.randint(1, 3))
    assert "".join(pieces) == TEXT


@pytest.mark.parametrize(
    ("skip_special_tokens", "kind"),
    [
        (True, RequestOutputKind.DELTA),
        (False, RequestOutputKind.DELTA),
        (True, RequestOutputKind.FINAL_ONLY),  # decoded once, at the end
    ],
)
def test_random_token_sequences_equal_whole_decode(tokenizer, skip_special_tokens, kind) -> None:
    rng = random.Random(skip_special_tokens)
    vocab = len(tokenizer)
    params = SamplingParams(skip_special_tokens=skip_special_tokens, output_kind=kind)
    for _ in range(150):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        pieces = stream(tokenizer, ids, params, chunk_sizes=lambda r: r.choice([1, 1, 1, 2, 5]))
        whole = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(pieces) == whole, ids


def test_stop_string_check_and_hold_back(tokenizer) -> None:
    ids = tokenizer.encode("ab cd ef", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(stop=["d e", "zz"]), [])
    seen, stop = "", None
    for t in ids:
        stop = detok.update([t], stop_terminated=False, finished=False)
        seen += detok.get_next_output_text(finished=stop is not None, delta=True)
        assert not seen.endswith(("d", "d ")), "a possible stop-string start is held back"
        if stop:
            break
    assert stop == "d e" and seen == "ab c" == detok.output_text
