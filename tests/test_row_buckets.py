"""Row buckets (`worker/buckets.py`) and the runner's padding to them.

The GPU pads eager steps' token rows and the LM head's rows to buckets that start-up runs once
each (a cuBLAS kernel's first launch stalls the host); the CPU does not. The engine test turns
the padding off, then on, on either device (fp32): padded steps give the same greedy tokens as
HF and the same logprobs and prompt logprobs as unpadded steps."""

from __future__ import annotations

import pytest

from pagedllm import LLM
from pagedllm.worker import model_runner
from pagedllm.worker.buckets import padded_rows, row_bucket, row_buckets
from pagedllm.worker.cuda_graph import MAX_CAPTURE_SIZE, capture_sizes
from tests.test_async_scheduling import _assert_same, _outputs
from tests.test_llm_vs_hf import MAX_TOKENS, generate, random_prompts
from tests.tiny_models import hf_greedy, load_hf


@pytest.mark.parametrize("cap", [1, 3, 8, 100, 512, 1000, 8192, 10000, 16384])
def test_every_count_pads_to_a_warmed_bucket(cap: int) -> None:
    buckets = row_buckets(cap)
    assert buckets == sorted(set(buckets)) and buckets[-1] == cap
    for rows in range(1, cap + 1):
        padded = padded_rows(rows, cap)
        assert padded in buckets and rows <= padded <= cap
        if rows > 512:  # at most 1/8 of padding past 512 rows
            assert padded <= rows * 9 / 8
    assert padded_rows(cap + 5, cap) == cap + 5  # past the cap: unpadded (not warmed)


def test_bucket_grid() -> None:
    assert [row_bucket(r) for r in (1, 2, 3, 5, 8, 9, 17, 512, 513, 2049, 8193)] == [
        1, 2, 4, 8, 8, 16, 32, 512, 576, 2304, 8704,
    ]  # fmt: skip
    assert len(row_buckets(16384)) == 100


@pytest.mark.parametrize("max_num_seqs", [1, 5, 100, 256, 1024])
def test_graph_sizes_are_the_buckets(max_num_seqs: int) -> None:
    """A decode step of B requests replays the graph of the bucket of B, whose output rows are
    what the LM head takes (padded the same way): the two grids must agree."""
    sizes = capture_sizes(max_num_seqs)
    assert sizes == row_buckets(min(max_num_seqs, MAX_CAPTURE_SIZE))
    for rows in range(1, min(max_num_seqs, MAX_CAPTURE_SIZE) + 1):
        assert padded_rows(rows, min(max_num_seqs, MAX_CAPTURE_SIZE)) in sizes


def test_padded_steps_match_unpadded(tiny_model_dirs, monkeypatch) -> None:
    path = tiny_model_dirs["llama"]
    prompts = random_prompts(4321)
    common = dict(
        dtype="float32",
        max_model_len=512,
        max_num_batched_tokens=24,
        max_num_seqs=8,
        kv_cache_memory="64MiB",
    )
    runner = model_runner.ModelRunner
    monkeypatch.setattr(runner, "_padded_rows", lambda self, rows, cap: rows)
    plain = LLM(path, **common)
    want = _outputs(plain, prompts, temperature=0.0, logprobs=3, prompt_logprobs=2)

    calls = []

    def pad_anyway(self, rows: int, cap: int) -> int:
        calls.append((rows, padded_rows(rows, cap)))
        return padded_rows(rows, cap)

    monkeypatch.setattr(runner, "_padded_rows", pad_anyway)
    padded = LLM(path, **common)
    assert generate(padded, prompts) == hf_greedy(load_hf(path), prompts, MAX_TOKENS)
    got = _outputs(padded, prompts, temperature=0.0, logprobs=3, prompt_logprobs=2)
    _assert_same(got, want)
    assert any(p > r for r, p in calls), "no step was padded: the test shows nothing"
