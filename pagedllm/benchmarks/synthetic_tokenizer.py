"""A synthetic byte-level BPE vocabulary of any size, for benchmarks of dummy-weight models that
ship no tokenizer (`pagedllm/configs/*.json`) but need one: structured output compiles its
grammars against the vocabulary, and the cost of a token mask grows with its size and shape.

The vocabulary is GPT-2-style (byte-level: every byte is a token, the others are byte strings
written in GPT-2's byte-to-unicode alphabet): the 256 bytes, then generated pieces such as real
vocabularies hold: words with and without a leading space, capitalized, digit runs, punctuation
and JSON fragments (`{"`, `":`, `",`), whitespace runs, and some multi-byte characters; the
model's EOS id is a special token. No merges: text encodes byte by byte (benchmarks send token
ids); masks and decoding see a realistic vocabulary.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
_WEIGHTS = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0]
_WEIGHTS += [2.0, 1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
_PUNCT = list(".,;:!?-_'\"()[]{}<>/\\|@#$%^&*+=~`")
_JSON = ['{"', '":', '",', '"}', '"]', '["', '":"', '","', '": ', '", "', "},", "}]", "[{", "null"]


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (byte-level BPE's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
    printable += list(range(0xAE, 0x100))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def synthetic_pieces(count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct byte strings (no single bytes), shaped like a real vocabulary's."""
    rng = random.Random(seed)
    seen: set[bytes] = {bytes([b]) for b in range(256)}
    pieces: list[bytes] = []

    def add(text: str) -> None:
        data = text.encode("utf-8")
        if data not in seen:
            seen.add(data)
            pieces.append(data)

    for fragment in _JSON:
        add(fragment)
    while len(pieces) < count:
        kind = rng.random()
        if kind < 0.70:
            word = "".join(rng.choices(_LETTERS, _WEIGHTS, k=rng.randint(2, 10)))
            if rng.random() < 0.2:
                word = word.capitalize()
            add((" " if rng.random() < 0.55 else "") + word)
        elif kind < 0.78:
            add(str(rng.randint(0, 10 ** rng.randint(1, 3))))
        elif kind < 0.88:
            add("".join(rng.choices(_PUNCT, k=rng.randint(2, 3))))
        elif kind < 0.92:
            add(rng.choice([" ", "\n", "\t"]) * rng.randint(2, 16))
        else:
            add("".join(chr(rng.randint(0xA0, 0x9FFF)) for _ in range(rng.randint(1, 2))))
    return pieces


def write_synthetic_tokenizer(path: str | Path, vocab_size: int, eos_token_id: int) -> Path:
    """Writes tokenizer.json and tokenizer_config.json of a `vocab_size` vocabulary (token
    `eos_token_id` is `<|endoftext|>`) into `path`; returns the folder."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = byte_to_unicode()
    vocab: dict[str, int] = {alphabet[b]: b for b in range(256)}
    pieces = synthetic_pieces(vocab_size - 256 - 1)
    next_id = 256
    for piece in pieces:
        if next_id == eos_token_id:
            next_id += 1
        vocab["".join(alphabet[b] for b in piece)] = next_id
        next_id += 1
    eos = "<|endoftext|>"
    vocab[eos] = eos_token_id  # NOTE: in the model's vocabulary too, or it gets another id
    tokenizer: dict[str, Any] = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": eos_token_id,
                "content": eos,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": vocab,
            "merges": [],
        },
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "model_max_length": 1 << 20,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder
