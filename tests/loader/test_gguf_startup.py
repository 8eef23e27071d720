"""GGUF conversion speed-ups: the faster reader and the direct tokenizer route are exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")

from gguf import GGUFReader

from pagedllm.loader.gguf import open_gguf
from pagedllm.models import default as default_model
from tests.loader.test_gguf import write_tiny_gguf


def assert_same_reader(ours: GGUFReader, ref: GGUFReader) -> None:
    assert list(ours.fields) == list(ref.fields)
    for name, field in ref.fields.items():
        mine = ours.fields[name]
        assert mine.types == field.types and mine.data == field.data, name
        assert mine.contents() == field.contents(), name
        assert len(mine.parts) == len(field.parts)
        for a, b in zip(mine.parts, field.parts):
            assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert ours.data_offset == ref.data_offset and ours.alignment == ref.alignment
    assert len(ours.tensors) == len(ref.tensors)
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.name, a.tensor_type, a.n_elements, a.n_bytes) == (
            b.name,
            b.tensor_type,
            b.n_elements,
            b.n_bytes,
        )
        assert np.array_equal(a.shape, b.shape) and a.data.dtype == b.data.dtype
        assert np.array_equal(a.data, b.data), a.name


def test_fast_reader_equals_gguf_reader(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=False, rope_scaling=True)
    assert_same_reader(open_gguf(path), GGUFReader(path))


@pytest.mark.slow
def test_fast_reader_equals_gguf_reader_on_smollm2() -> None:
    try:
        path = default_model.default_model_path()
    except FileNotFoundError:
        pytest.skip("the default model is not installed")
    assert_same_reader(open_gguf(path), GGUFReader(path))


def test_tokenizer_route_equals_auto_tokenizer(tmp_path: Path) -> None:
    """convert_gguf builds the tokenizer with PreTrainedTokenizerFast(gguf_file=...) directly,
    skipping AutoTokenizer's config pass: both must write the same files."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=True)
    direct = PreTrainedTokenizerFast.from_pretrained(str(tmp_path), gguf_file=path.name)
    auto = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert type(direct) is type(auto)
    direct.save_pretrained(tmp_path / "direct")
    auto.save_pretrained(tmp_path / "auto")
    names = sorted(p.name for p in (tmp_path / "auto").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "direct").iterdir())
    for name in names:
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "auto" / name).read_bytes()
