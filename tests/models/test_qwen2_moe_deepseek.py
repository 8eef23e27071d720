"""Qwen2-MoE and DeepSeek V2 / V3 on the CPU (fp32, tiny random models):

- DeepSeek's routing (`grouped_topk`: softmax / sigmoid scores, group-limited top-k by the
  group's max or top-2 sum, the correction bias for the choice only, renormalization, the
  routed scaling) against a per-token loop written here, and against HF's router modules;
- which layers get experts (`decoder_sparse_step`, `mlp_only_layers`, `first_k_dense_replace`,
  `moe_layer_freq`);
- each model through `LLM` equals HF transformers' greedy `generate` token for token, in every
  regime of `tests/models/harness.py` (plain, chunked prefill + prefix-cache hits,
  preemption): Qwen2-MoE with its gated shared expert; DeepSeek-V2 with a plain `q_proj`
  (`q_lora_rank=None`), group-limited greedy routing and a sharded checkpoint; DeepSeek-V3 with
  `q_lora_rank`, sigmoid routing with a (perturbed) correction bias, YaRN rope scaling with
  `mscale_all_dim`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pagedllm.attention.torch_ref import TorchRefBackend
from pagedllm.layers.fused_moe.router import GroupedTopK, select_experts
from pagedllm.models.utils import make_context
from tests.models.harness import assert_greedy_matches_hf

# (prompt length, new tokens): a one-token prompt, block boundaries crossed while decoding (the
# preemption regime needs them), a 40-token prompt chunked.
GENERATIONS = [(1, 20), (7, 22), (19, 14), (40, 8)]

COMMON = dict(
    vocab_size=320, hidden_size=48, intermediate_size=72, moe_intermediate_size=20,
    max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.25,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)  # fmt: skip
MLA = dict(
    num_attention_heads=3, num_key_value_heads=3, kv_lora_rank=13, qk_rope_head_dim=6,
    qk_nope_head_dim=10, v_head_dim=7,
)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Small ops: a second intra-op thread only adds barrier waits on a busy box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----- routing -----


def loop_route(logits, top_k, grouped: GroupedTopK, renormalize, bias=None):
    """DeepSeek's routing one token at a time, in plain Python over the experts."""
    num_tokens, num_experts = logits.shape
    size = num_experts // grouped.num_groups
    all_weights, all_ids = [], []
    for t in range(num_tokens):
        row = logits[t].double()
        scores = row.softmax(-1) if grouped.scoring == "softmax" else row.sigmoid()
        choice = [
            float(s) + (0.0 if bias is None else float(bias[e])) for e, s in enumerate(scores)
        ]
        groups = [choice[g * size : (g + 1) * size] for g in range(grouped.num_groups)]
        if grouped.group_score == "max":
            group_scores = [max(g) for g in groups]
        else:
            group_scores = [sum(sorted(g)[-2:]) for g in groups]
        kept = sorted(range(len(groups)), key=lambda g: -group_scores[g])[: grouped.topk_groups]
        allowed = [e for e in range(num_experts) if e // size in kept]
        ids = sorted(allowed, key=lambda e: -choice[e])[:top_k]
        weights = [float(scores[e]) for e in ids]
        if renormalize:
            weights = [w / sum(weights) for w in weights]
        all_weights.append([w * grouped.scaling_factor for w in weights])
        all_ids.append(ids)
    return torch.tensor(all_weights), torch.tensor(all_ids)


def by_id(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing with each token's experts in id order (top-k's order is not part of it)."""
    order = ids.argsort(dim=-1)
    return weights.gather(1, order).float(), ids.gather(1, order)


ROUTINGS = [
    # V2 "greedy"
    (8, 3, GroupedTopK("softmax", scaling_factor=1.0), False, False),
    # V2 "group_limited_greedy", scaled
    (12, 3, GroupedTopK("softmax", 4, 2, "max", 16.0), False, False),
    # V3 "noaux_tc": correction bias, renormalized, scaled
    (16, 4, GroupedTopK("sigmoid", 4, 2, "top2_sum", 2.5), True, True),
    # V3 with one group (Moonlight-like), not renormalized
    (10, 2, GroupedTopK("sigmoid", 1, 1, "top2_sum", 1.0), False, True),
]


@pytest.mark.parametrize(("experts", "top_k", "grouped", "renormalize", "with_bias"), ROUTINGS)
def test_grouped_topk_matches_a_per_token_loop(
    experts, top_k, grouped, renormalize, with_bias
) -> None:
    torch.manual_seed(experts)
    logits = torch.randn(41, experts) * 2
    bias = torch.randn(experts) * 0.3 if with_bias else None
    weights, ids = select_experts(logits, top_k, renormalize, grouped, bias)
    assert weights.dtype == torch.float32 and ids.shape == (41, top_k)
    want_w, want_ids = by_id(*loop_route(logits, top_k, grouped, renormalize, bias))
    got_w, got_ids = by_id(weights, ids)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    if with_bias:  # the bias changes the choice (else this case would not test it)
        assert not torch.equal(select_experts(logits, top_k, renormalize, grouped)[1], ids)


def test_grouped_topk_equals_hf_routers() -> None:
    from transformers import DeepseekV2Config, DeepseekV3Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from pagedllm.models.deepseek_v2 import routing_of

    torch.manual_seed(3)
    x = torch.randn(29, 48)
    v2 = DeepseekV2Config(
        **COMMON, **MLA, n_routed_experts=12, num_experts_per_tok=3, n_group=4, topk_group=2,
        topk_method="group_limited_greedy", routed_scaling_factor=16.0,
    )  # fmt: skip
    v3 = DeepseekV3Config(
        **COMMON, **MLA, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
        norm_topk_prob=True, routed_scaling_factor=2.5,
    )  # fmt: skip
    for cfg, router_cls, version in ((v2, DeepseekV2TopkRouter, 2), (v3, DeepseekV3TopkRouter, 3)):
        router = router_cls(cfg)
        torch.nn.init.normal_(router.weight, std=0.5)
        bias = getattr(router, "e_score_correction_bias", None)
        if bias is not None:
            bias.normal_(std=0.3)
        logits, hf_weights, hf_ids = router(x)
        grouped, renormalize = routing_of(cfg, version)
        weights, ids = select_experts(logits, cfg.num_experts_per_tok, renormalize, grouped, bias)
        got, want = by_id(weights, ids), by_id(hf_weights, hf_ids)
        assert torch.equal(got[1], want[1]), version
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)


def test_grouped_topk_refuses_bad_groups() -> None:
    logits = torch.randn(3, 12)
    with pytest.raises(ValueError, match="split"):
        select_experts(logits, 2, False, GroupedTopK("softmax", 5, 2))
    with pytest.raises(ValueError, match="exceeds"):
        select_experts(logits, 7, False, GroupedTopK("softmax", 4, 2))
    with pytest.raises(ValueError, match="topk_groups"):
        GroupedTopK("softmax", 2, 3)
    with pytest.raises(ValueError, match="grouped"):
        select_experts(logits, 2, True, None, torch.zeros(12))


# ----- layer kinds -----


def test_which_layers_have_experts() -> None:
    from transformers import DeepseekV2Config, Qwen2MoeConfig

    qwen = Qwen2MoeConfig(
        **COMMON, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
        num_experts_per_tok=2, shared_expert_intermediate_size=8, decoder_sparse_step=2,
        mlp_only_layers=[3],
    )  # fmt: skip
    qwen.architectures = ["Qwen2MoeForCausalLM"]
    ds = DeepseekV2Config(
        **COMMON, **MLA, num_hidden_layers=5, n_routed_experts=4, num_experts_per_tok=2,
        first_k_dense_replace=1, q_lora_rank=None, moe_layer_freq=2,
    )  # fmt: skip
    from pagedllm.models.deepseek_v2 import DeepseekV2ForCausalLM
    from pagedllm.models.qwen2_moe import Qwen2MoeForCausalLM

    kinds = [
        [type(layer.mlp).__name__ for layer in cls(make_context(cfg, TorchRefBackend)).model.layers]
        for cls, cfg in ((Qwen2MoeForCausalLM, qwen), (DeepseekV2ForCausalLM, ds))
    ]
    dense, qwen_moe, ds_moe = "LlamaMLP", "Qwen2MoeSparseMoeBlock", "DeepseekV2MoE"
    assert kinds[0] == [dense, qwen_moe, dense, dense, dense]
    assert kinds[1] == [dense, dense, ds_moe, dense, ds_moe]


# ----- whole models vs HF -----


def save_model(config, path: Path, max_shard_size: str | None = None) -> Path:
    """A random fp32 model of `config` at `path`: every parameter perturbed (as the harness
    does) and DeepSeek-V3's correction biases (buffers, zero at init) made random."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(std=0.3)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


def test_qwen2_moe_greedy_equals_hf(tmp_path: Path) -> None:
    """Sparse layers (7 experts, 3 per token, renormalized) with the gated shared expert beside
    a dense layer (`mlp_only_layers`); head_dim 14, 2 KV heads, q/k/v biases."""
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig(
        **{**COMMON, "hidden_size": 56}, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_experts=7, num_experts_per_tok=3, norm_topk_prob=True,
        shared_expert_intermediate_size=28, mlp_only_layers=[1],
    )  # fmt: skip
    assert_greedy_matches_hf(save_model(config, tmp_path / "qwen2_moe"), generations=GENERATIONS)


def test_deepseek_v2_greedy_equals_hf(tmp_path: Path) -> None:
    """V2-Lite's layout (`q_lora_rank=None`: a plain q_proj), a dense first layer, 2 shared
    experts, group-limited greedy routing (12 experts in 4 groups, 2 kept, 3 per token, scaled);
    experts loaded from a sharded checkpoint.

    NOTE: an even `kv_lora_rank`: HF's V2 views k_pe (a slice after the latent) as complex,
    which needs an even storage offset."""
    from transformers import DeepseekV2Config

    config = DeepseekV2Config(
        **COMMON, **{**MLA, "kv_lora_rank": 14}, num_hidden_layers=3, q_lora_rank=None, n_routed_experts=12,
        num_experts_per_tok=3, n_group=4, topk_group=2, topk_method="group_limited_greedy",
        routed_scaling_factor=1.7, first_k_dense_replace=1, n_shared_experts=2,
    )  # fmt: skip
    path = save_model(config, tmp_path / "deepseek_v2", max_shard_size="40KB")
    assert len(list(path.glob("*.safetensors"))) > 2
    assert_greedy_matches_hf(path, generations=GENERATIONS)


def deepseek_v3_config():
    """V3's layout: q_a_proj → q_a_layernorm → q_b_proj, interleaved rope with YaRN scaling
    (`mscale_all_dim`: the softmax scale too), sigmoid routing with a correction bias (16
    experts in 4 groups, 2 kept, 4 per token, renormalized, scaled), a dense first layer."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        **COMMON, **MLA, num_hidden_layers=3, q_lora_rank=20, n_routed_experts=16,
        num_experts_per_tok=4, n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5, first_k_dense_replace=1, n_shared_experts=1,
        rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 0.8,
        },
    )  # fmt: skip


def test_deepseek_v3_greedy_equals_hf(tmp_path: Path) -> None:
    path = save_model(deepseek_v3_config(), tmp_path / "deepseek_v3")
    assert_greedy_matches_hf(path, generations=GENERATIONS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deepseek_v3_on_cuda_equals_hf(tmp_path: Path) -> None:
    """On CUDA (fp32): MLA's torch path beside the Triton backend's metadata, the fused norms
    and the warm-up; decode runs eagerly (MLA is not CUDA-graph safe yet)."""
    path = save_model(deepseek_v3_config(), tmp_path / "deepseek_v3")
    assert_greedy_matches_hf(path, generations=GENERATIONS)
