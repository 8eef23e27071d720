"""`pagedllm bench throughput --backend pagedllm-json-schema,pagedllm` and its synthetic
vocabulary (benchmarks/synthetic_tokenizer.py): the vocabulary has exactly the model's size, its
EOS at the config's id, byte-level pieces that decode to their bytes; the constrained run
produces as many tokens as the unconstrained one (its schema stays open to max_tokens)."""

from __future__ import annotations

import argparse
import json

from pagedllm.benchmarks import throughput
from pagedllm.benchmarks.synthetic_tokenizer import byte_to_unicode, write_synthetic_tokenizer
from pagedllm.transformers_utils.tokenizer import get_tokenizer


def test_synthetic_vocabulary(tmp_path) -> None:
    folder = write_synthetic_tokenizer(tmp_path, 5000, 4321)
    tok = get_tokenizer(str(folder))
    assert len(tok) == 5000 and tok.eos_token_id == 4321
    vocab = tok.get_vocab()
    assert sorted(vocab.values()) == list(range(5000))
    alphabet = byte_to_unicode()
    assert len(set(alphabet.values())) == 256
    for b in (0, 10, 32, 65, 126):  # one byte each (ASCII: a character of its own)
        assert tok.decode([vocab[alphabet[b]]]) == chr(b)
    two = [vocab[alphabet[0xC3]], vocab[alphabet[0xA9]]]  # UTF-8 of é, byte by byte
    assert tok.decode(two) == "é"
    assert tok.decode([vocab[alphabet[ord("{")]], vocab[alphabet[ord('"')]]]) == '{"'
    pieces = {tok.decode([i]) for i in range(256, 300) if i != 4321}
    assert all(len(p.encode()) >= 2 for p in pieces), "past the bytes: multi-byte pieces"


def test_json_schema_backend_does_the_same_work(tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    throughput.add_cli_args(parser)
    ns = parser.parse_args(
        "--model smollm2-135m --load-format dummy --max-model-len 256 --num-prompts 4 "
        "--input-len 16 16 "
        "--output-len 24 24 --kv-cache-memory 256MiB --backend pagedllm-json-schema,pagedllm "
        f"--output-json {tmp_path / 'out.json'}".split()
    )
    constrained, free = throughput.main(ns)
    assert constrained.backend == "pagedllm-json-schema"
    assert constrained.output_tokens == free.output_tokens == 4 * 24
    results = json.loads((tmp_path / "out.json").read_text())
    assert [r["backend"] for r in results] == ["pagedllm-json-schema", "pagedllm"]
    assert "ratio pagedllm-json-schema/pagedllm" in capsys.readouterr().out
