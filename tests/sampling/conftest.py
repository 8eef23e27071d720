"""Fixtures of the sampling tests: one tiny Llama (with its byte-level BPE tokenizer) and engines
over it, built once per session."""

from __future__ import annotations

import pytest

from tests.tiny_models import make_model


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> str:
    return str(make_model("llama", tmp_path_factory.mktemp("sampling") / "llama"))


@pytest.fixture(scope="session")
def llm(llama_dir):
    from pagedllm import LLM

    return LLM(llama_dir, dtype="float32", kv_cache_memory="64MiB", max_model_len=512)


@pytest.fixture(scope="session")
def tokenizer(llm):
    return llm.get_tokenizer()


@pytest.fixture(scope="session")
def small_llm(llama_dir):
    """Prompts chunked by 16 tokens, and a KV cache of 6 blocks: room for one 64-token sequence
    and a half, so a batch of them preempts."""
    from pagedllm import LLM

    return LLM(
        llama_dir,
        dtype="float32",
        max_model_len=64,
        num_gpu_blocks_override=6,
        max_num_batched_tokens=16,
        max_num_seqs=4,
    )
