"""Bad input offline: a ValueError naming the problem, and the engine keeps working (no request
left behind, no KV block leaked)."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from tests.tiny_models import VOCAB_SIZE


@pytest.fixture(scope="module")
def llm(tiny_model_dirs) -> LLM:
    return LLM(tiny_model_dirs["llama"], dtype="float32", max_model_len=256, kv_cache_memory="8MiB")


def assert_idle(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    pool = engine.engine_core.scheduler.kv_cache_manager.pool
    assert pool.num_free_blocks == pool.num_blocks


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ([], "empty"),
        ("", "empty"),
        ([1, 2, VOCAB_SIZE + 5], "vocabulary"),
        ([-1], "vocabulary"),
        (list(range(3, 259)), "max_model_len"),
        ({"foo": 1}, "prompt"),
        (3.5, "prompt"),
        ({"prompt_token_ids": ["a"]}, "prompt_token_ids"),
        ([5, True, 6], "list of integers"),
        ([5, 6.0], "list of integers"),
        ([5, None], "list of integers"),
        ([5, 6, VOCAB_SIZE], "vocabulary"),
    ],
)
def test_bad_prompt_is_a_value_error_and_changes_nothing(llm: LLM, prompt, match) -> None:
    good = [5, 6, 7]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with pytest.raises(ValueError, match=match):
        llm.generate([good, prompt], params, use_tqdm=False)
    assert_idle(llm)
    out = llm.generate([good], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert_idle(llm)


def test_int_subclass_ids_are_accepted(llm: LLM) -> None:
    """Ids of an int subclass (an IntEnum, say) pass the slow path of the type check."""
    import enum

    class Tok(enum.IntEnum):
        A = 5
        B = 6

    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    out = llm.generate([[Tok.A, Tok.B, 7]], params, use_tqdm=False)
    assert out[0].prompt_token_ids == [5, 6, 7]
    assert_idle(llm)


def test_mismatched_params_list(llm: LLM) -> None:
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([[5], [6]], [SamplingParams()], use_tqdm=False)
    assert_idle(llm)


def test_engine_args_errors(tiny_model_dirs, tmp_path) -> None:
    path = tiny_model_dirs["llama"]
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(path, kv_cache_memory="lots")
    with pytest.raises(ValueError, match="dtype"):
        LLM(path, dtype="float8")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(path, max_model_len=10**6)
    with pytest.raises(ValueError, match="not a local folder"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        LLM(path, max_num_seqs=64, max_num_batched_tokens=32)


def test_kv_cache_too_small_for_one_request_fails_at_start_with_the_size(tiny_model_dirs) -> None:
    # 2 layers x 2 kv heads x 16 dims x 4 bytes x (K, V) = 512 bytes a token; 1000 tokens = 500 KB.
    with pytest.raises(
        ValueError, match=r"max_model_len=1000 needs 63 blocks.*kv_cache_memory=516096"
    ):
        LLM(tiny_model_dirs["llama"], dtype="float32", max_model_len=1000, kv_cache_memory=100_000)
