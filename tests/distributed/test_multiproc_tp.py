"""Tensor parallelism through the multiprocess executor (CPU, gloo): `LLM(tensor_parallel_size=2)`
runs one worker process per rank, and its greedy tokens equal HF transformers' `generate` (fp32)
on dense and MoE models of odd shapes (one KV head replicated over the ranks, an odd vocabulary
split unevenly), with chunked prefill, prefix caching and preemption; MoE with the experts'
intermediate dimension split and with expert parallelism; the `mp` executor at one rank; grammar
bitmasks through shared memory; and a worker killed mid-run fails the run instead of hanging."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.sampling_params import StructuredOutputsParams
from tests.models.harness import assert_greedy_matches_hf, save_hf_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=331, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
        attention_bias=True, mlp_bias=True, tie_word_embeddings=False, initializer_range=0.25,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return save_hf_model(config, tmp_path_factory.mktemp("llama_tp"))


@pytest.fixture(scope="module")
def qwen3_moe_dir(tmp_path_factory) -> Path:
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=301, hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=6, num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[1],
        decoder_sparse_step=1, max_position_embeddings=256, rms_norm_eps=1e-6,
        initializer_range=0.25, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    return save_hf_model(config, tmp_path_factory.mktemp("qwen3_moe_tp"), seed=3)


def test_tp2_llama_greedy_equals_hf(llama_dir: Path) -> None:
    assert_greedy_matches_hf(llama_dir, tensor_parallel_size=2)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp-experts", "ep"])
def test_tp2_moe_greedy_equals_hf(qwen3_moe_dir: Path, expert_parallel: bool) -> None:
    assert_greedy_matches_hf(
        qwen3_moe_dir,
        regimes=("plain", "chunked"),
        tensor_parallel_size=2,
        enable_expert_parallel=expert_parallel,
    )


def test_mp_executor_at_one_rank_equals_hf(llama_dir: Path) -> None:
    assert_greedy_matches_hf(llama_dir, regimes=("plain",), distributed_executor_backend="mp")


def test_uni_executor_refuses_two_ranks(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="distributed_executor_backend='uni' runs one rank"):
        LLM(str(llama_dir), tensor_parallel_size=2, distributed_executor_backend="uni")


def test_heads_that_do_not_split_are_a_clear_error(llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide the model's 4"):
        LLM(str(llama_dir), tensor_parallel_size=3, skip_tokenizer_init=True, dtype="float32")


def test_tp2_grammar_bitmask_through_shared_memory(tmp_path: Path) -> None:
    """A constrained request at tp 2: the bitmask crosses to both ranks (sampled, T = 1)."""
    from tests.tiny_models import make_model

    path = make_model("llama", tmp_path / "llama")
    llm = LLM(str(path), tensor_parallel_size=2, dtype="float32", kv_cache_memory="64MiB")
    try:
        choices = ["alpha", "beta gamma", "delta"]
        params = SamplingParams(
            temperature=1.0,
            max_tokens=20,
            seed=3,
            structured_outputs=StructuredOutputsParams(choice=choices),
        )
        outs = llm.generate(["pick one:"] * 4, [params] * 4, use_tqdm=False)
        assert all(o.outputs[0].text in choices for o in outs), [o.outputs[0].text for o in outs]
        schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
        params = SamplingParams(
            temperature=1.0, max_tokens=40, structured_outputs=StructuredOutputsParams(json=schema)
        )
        out = llm.generate(["json:"], params, use_tqdm=False)[0].outputs[0]
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text)["n"], int)
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_killed_worker_fails_the_run_without_hanging(llama_dir: Path) -> None:
    from pagedllm.executor.multiproc import WorkerDiedError

    llm = LLM(
        str(llama_dir), tensor_parallel_size=2, dtype="float32", skip_tokenizer_init=True,
        kv_cache_memory="64MiB", max_model_len=256,
    )  # fmt: skip
    executor = llm.llm_engine.engine_core.executor
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert len(llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)) == 1
    victim = executor.procs[1]
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(timeout=30)
    with pytest.raises(WorkerDiedError, match="worker rank 1"):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
    llm.llm_engine.engine_core.shutdown()
    assert not any(p.is_alive() for p in executor.procs)


def test_dp2_llm_greedy_equals_hf_and_balances(llama_dir: Path) -> None:
    """Two engine cores behind one `LLM`: every regime equals HF; both cores take requests."""
    assert_greedy_matches_hf(llama_dir, data_parallel_size=2)
    llm = LLM(
        str(llama_dir), data_parallel_size=2, dtype="float32", skip_tokenizer_init=True,
        kv_cache_memory="64MiB", max_model_len=256,
    )  # fmt: skip
    try:
        cores = llm.llm_engine.engine_core.cores
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, n=2)
        outs = llm.generate([{"prompt_token_ids": [5 + i, 6, 7]} for i in range(6)], params)
        assert all(len(o.outputs) == 2 for o in outs)
        steps = [c.make_stats().num_generation_tokens for c in cores]
        assert all(s > 0 for s in steps), steps
        assert sum(steps) == llm.llm_engine.get_stats().num_generation_tokens == 6 * 2 * 4
        assert not any(c.scheduler.get_num_unfinished_requests() for c in cores)
    finally:
        llm.llm_engine.engine_core.shutdown()
