"""Pipeline parallelism through the multiprocess executor (CPU, gloo): the layers split over
stages (unevenly when they do not divide), activations sent stage to stage, the last stage's
sampled ids broadcast back; greedy tokens equal HF's at PP=2 and TP=2×PP=2, on a dense model, a
tied-embedding one (the last stage holds its own copy of the embedding as the LM head) and an
MoE one; architectures that cannot split are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedllm import LLM
from tests.models.harness import assert_greedy_matches_hf, save_hf_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=307, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, initializer_range=0.25, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip
    return save_hf_model(config, tmp_path_factory.mktemp("llama_pp"))


def test_pp2_llama_greedy_equals_hf(llama3_dir: Path) -> None:
    assert_greedy_matches_hf(llama3_dir, pipeline_parallel_size=2)


def test_tp2_pp2_llama_greedy_equals_hf(llama3_dir: Path) -> None:
    assert_greedy_matches_hf(
        llama3_dir, regimes=("plain",), tensor_parallel_size=2, pipeline_parallel_size=2
    )


def test_pp2_tied_embeddings_greedy_equals_hf(tmp_path: Path) -> None:
    from transformers import Qwen3Config

    config = Qwen3Config(
        vocab_size=299, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=True, initializer_range=0.25, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip
    path = save_hf_model(config, tmp_path / "qwen3_tied", seed=2)
    assert_greedy_matches_hf(path, regimes=("plain",), pipeline_parallel_size=2)


def test_pp2_moe_greedy_equals_hf(tmp_path: Path) -> None:
    from transformers import MixtralConfig

    config = MixtralConfig(
        vocab_size=311, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=256, initializer_range=0.25,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    path = save_hf_model(config, tmp_path / "mixtral", seed=4)
    assert_greedy_matches_hf(path, regimes=("plain",), pipeline_parallel_size=2)


def test_pp_refusals(llama3_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pipeline_parallel_size=4 is larger than the model's 3"):
        LLM(str(llama3_dir), pipeline_parallel_size=4, skip_tokenizer_init=True)
    from transformers import Gemma2Config

    config = Gemma2Config(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    gemma = save_hf_model(config, tmp_path / "gemma2")
    with pytest.raises(ValueError, match="does not split its layers over pipeline stages"):
        LLM(str(gemma), pipeline_parallel_size=2, skip_tokenizer_init=True)
