"""Mixtral and the fused MoE layer on the CPU (fp32, tiny random models):

- `select_experts` and `FusedMoE.forward_torch` against a per-token loop over the chosen experts;
- the weight loader: HF's per-expert w1/w2/w3 and the packed [E, ...] tensors give the same
  parameters; bad shapes and ids are refused;
- `MixtralForCausalLM` through `LLM` equals HF transformers' greedy `generate`, token for token,
  with several experts per token, prompts of several lengths, chunked prefill.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch.nn import functional as F

from pagedllm import LLM, SamplingParams
from pagedllm.layers.fused_moe import FusedMoE, select_experts
from tests.tiny_models import hf_greedy, load_hf, make_tokenizer


def naive_moe(x, w13, w2, logits, top_k, renormalize):
    out = torch.zeros_like(x)
    probs = torch.softmax(logits.float(), -1)
    inter = w2.shape[-1]
    for t in range(x.shape[0]):
        weights, ids = torch.topk(probs[t], top_k)
        if renormalize:
            weights = weights / weights.sum()
        for w, e in zip(weights.tolist(), ids.tolist()):
            gu = w13[e] @ x[t]
            out[t] += w * (w2[e] @ (F.silu(gu[:inter]) * gu[inter:]))
    return out


@pytest.mark.parametrize(
    ("experts", "top_k", "renormalize"), [(4, 2, True), (8, 3, False), (5, 1, True)]
)
def test_fused_moe_matches_a_per_token_loop(experts, top_k, renormalize) -> None:
    torch.manual_seed(experts * 10 + top_k)
    hidden, inter, tokens = 24, 40, 37
    moe = FusedMoE(experts, top_k, hidden, inter, renormalize, params_dtype=torch.float32)
    moe.w13_weight.data.normal_()
    moe.w2_weight.data.normal_()
    x = torch.randn(tokens, hidden)
    logits = torch.randn(tokens, experts)
    got = moe(x, logits)
    want = naive_moe(x, moe.w13_weight, moe.w2_weight, logits, top_k, renormalize)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    weights, ids = select_experts(logits, top_k, renormalize)
    assert ids.shape == (tokens, top_k) and weights.dtype == torch.float32
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(tokens))


def test_weight_loader_per_expert_and_packed() -> None:
    torch.manual_seed(0)
    experts, hidden, inter = 3, 8, 6
    w1 = torch.randn(experts, inter, hidden)
    w3 = torch.randn(experts, inter, hidden)
    w2 = torch.randn(experts, hidden, inter)
    a = FusedMoE(experts, 2, hidden, inter, params_dtype=torch.float32)
    for e in range(experts):
        a.weight_loader(a.w13_weight, w1[e], "w1", e)
        a.weight_loader(a.w13_weight, w3[e], "w3", e)
        a.weight_loader(a.w2_weight, w2[e], "w2", e)
    b = FusedMoE(experts, 2, hidden, inter, params_dtype=torch.float32)
    b.weight_loader(b.w13_weight, torch.cat([w1, w3], dim=1))
    b.weight_loader(b.w2_weight, w2)
    assert torch.equal(a.w13_weight, b.w13_weight) and torch.equal(a.w2_weight, b.w2_weight)
    with pytest.raises(ValueError, match="shape mismatch"):
        a.weight_loader(a.w2_weight, w1[0], "w2", 0)
    with pytest.raises(ValueError, match="expert id"):
        a.weight_loader(a.w13_weight, w1[0], "w1", experts)
    with pytest.raises(ValueError, match="shard_id"):
        a.weight_loader(a.w13_weight, w1[0], "w4", 0)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM

    path = tmp_path_factory.mktemp("mixtral")
    config = MixtralConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=6,
        num_experts_per_tok=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        initializer_range=0.25, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False, sliding_window=None,
    )  # fmt: skip
    torch.manual_seed(0)
    MixtralForCausalLM(config).to(torch.float32).save_pretrained(path)
    make_tokenizer(path)
    return path


def test_mixtral_greedy_equals_hf(mixtral_dir) -> None:
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (5, 17, 40, 3)]
    max_tokens = [24, 9, 16, 30]
    expected = hf_greedy(load_hf(mixtral_dir), prompts, max_tokens)
    llm = LLM(
        str(mixtral_dir), dtype="float32", max_model_len=256, max_num_batched_tokens=16,
        max_num_seqs=4, kv_cache_memory="64MiB",
    )  # fmt: skip
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected


@pytest.fixture(scope="module")
def qwen3_moe_dir(tmp_path_factory):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    path = tmp_path_factory.mktemp("qwen3_moe")
    config = Qwen3MoeConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=40,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1],
        decoder_sparse_step=1, max_position_embeddings=512, rms_norm_eps=1e-6,
        initializer_range=0.25, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(1)
    Qwen3MoeForCausalLM(config).to(torch.float32).save_pretrained(path)
    make_tokenizer(path)
    return path


def test_qwen3_moe_greedy_equals_hf(qwen3_moe_dir) -> None:
    """Sparse layers (8 experts, 3 per token, no renormalization) beside a dense one
    (`mlp_only_layers`), Qwen3's q/k norms."""
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (6, 29, 2)]
    max_tokens = [20, 12, 25]
    expected = hf_greedy(load_hf(qwen3_moe_dir), prompts, max_tokens)
    llm = LLM(str(qwen3_moe_dir), dtype="float32", max_model_len=256, kv_cache_memory="64MiB")
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    model = llm.llm_engine.engine_core.executor.worker.model_runner.model
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["MixtralMoE", "LlamaMLP", "MixtralMoE"]
