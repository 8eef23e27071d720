"""A model whose every layer has the same sliding window frees each request's blocks once they
fall out of the window: sequences longer than the whole KV cache run, and their greedy tokens
still equal HF transformers' `generate` (fp32, CPU), with chunked prefill, prefix caching on or
off, async scheduling on or off."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import MistralConfig

from pagedllm import LLM, SamplingParams
from tests.models.harness import save_hf_model
from tests.tiny_models import hf_greedy, load_hf

WINDOW = 20
# (prompt length, new tokens): each sequence is longer than the cache's 6 blocks of 16 tokens.
GENERATIONS = [(100, 40), (7, 130), (130, 12)]


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]], list]:
    config = MistralConfig(
        vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=512,
        sliding_window=WINDOW, tie_word_embeddings=False,
    )  # fmt: skip
    path = save_hf_model(config, tmp_path_factory.mktemp("mistral-swa"))
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 300) for _ in range(n)] for n, _ in GENERATIONS]
    expected = hf_greedy(load_hf(path), prompts, [m for _, m in GENERATIONS])
    return path, prompts, expected


@pytest.mark.parametrize(
    ("caching", "async_scheduling"), [(True, False), (False, False), (True, True)]
)
def test_sequences_longer_than_the_cache_match_hf(mistral, caching, async_scheduling) -> None:
    path, prompts, expected = mistral
    # 6 blocks of 16 = 96 tokens: less than any one sequence; a step needs the window's 2
    # blocks and its chunk's (16 tokens: at most 2 more).
    llm = LLM(
        str(path), dtype="float32", max_model_len=160, max_num_batched_tokens=16, max_num_seqs=2,
        num_gpu_blocks_override=6, enable_prefix_caching=caching, skip_tokenizer_init=True,
        async_scheduling=async_scheduling,
    )  # fmt: skip
    manager = llm.llm_engine.engine_core.scheduler.kv_cache_manager
    assert manager.sliding_window == WINDOW
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for _, m in GENERATIONS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outs] == expected
    assert manager.pool.num_free_blocks == 6 and not manager.num_dropped


def test_full_attention_model_keeps_its_blocks(tmp_path: Path) -> None:
    """Without a window the same cache cannot hold one such request: refused at start-up."""
    config = MistralConfig(
        vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=512,
        sliding_window=None, tie_word_embeddings=False,
    )  # fmt: skip
    path = save_hf_model(config, tmp_path)
    with pytest.raises(ValueError, match="needs 10 blocks"):
        LLM(str(path), dtype="float32", max_model_len=160, max_num_batched_tokens=16, max_num_seqs=2,
            num_gpu_blocks_override=6, skip_tokenizer_init=True)  # fmt: skip
