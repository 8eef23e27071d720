"""gpt-oss (`GptOssForCausalLM`) and the fused MoE options it needs, against HF transformers on
tiny random checkpoints built here (fp32, CPU):

- `FusedMoE` with biases, the "swigluoai" activation and "topk_softmax" routing, its weights
  loaded from gpt-oss's packed layout (`[E, H, 2 I]`, gate/up interleaved), against a per-token
  loop on the checkpoint's own layout and against HF's `GptOssMLP`;
- the model: logits of one forward and of the paged path fed in chunks (prompts longer than the
  sliding window), then greedy `LLM.generate` token for token against HF `generate` under the
  harness's regimes (plain, chunked prefill + prefix cache, preemption). HF's eager attention
  (sinks, sliding window) is the oracle. Slow: the same with the Triton attention backend, the
  fused prologue and the MoE kernels (under Triton's interpreter without a GPU).

Odd shapes: head_dim 40, 6 heads over 2 KV heads, 6 experts of 36, a window of 12, YaRN with a
small original length (64); a small `swiglu_limit` and a non-default `swiglu_alpha`, so the
clamps bite and the alpha read from the config matters.
"""

# ruff: noqa: E402 (the environment is read before triton's first import, below)
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.triton_interpreter import force_fused_kernels, interpret_without_cuda

# NOTE: before triton is first imported (the transformers model modules import it).
_TRITON_TOO_EARLY = interpret_without_cuda()

from torch.nn import functional as F
from transformers import GptOssConfig

from pagedllm.layers import fused
from pagedllm.layers.fused_moe import FusedMoE
from tests.models.harness import assert_greedy_matches_hf, save_hf_model
from tests.models.test_llama import _hf_logits, _load, _our_logits, _paged_logits, _random_ids

ALPHA, LIMIT = 1.3, 1.5  # swigluoai's sigmoid gain and clamp (gpt-oss: 1.702, 7.0)


def _config(**overrides: Any) -> GptOssConfig:
    fields: dict[str, Any] = dict(
        vocab_size=384, hidden_size=64, intermediate_size=36, head_dim=40,
        num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=4,
        num_local_experts=6, num_experts_per_tok=2, sliding_window=12,
        max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.25,
        swiglu_alpha=ALPHA, swiglu_limit=LIMIT, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=8.0, beta_fast=32.0,
                             beta_slow=1.0, truncate=False, original_max_position_embeddings=64),
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    fields.update(overrides)
    return GptOssConfig(**fields)


# ---------------------------------------------------------------------------------------------
# FusedMoE: biases, swigluoai, top-k-then-softmax routing, gpt-oss's packed layout
# ---------------------------------------------------------------------------------------------


def _gpt_oss_experts(experts: int, hidden: int, inter: int, seed: int) -> dict[str, torch.Tensor]:
    """Random expert tensors in gpt-oss's checkpoint layout (`x @ W`, gate/up interleaved)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "gate_up_proj": torch.randn(experts, hidden, 2 * inter, generator=g) * 0.3,
        "gate_up_proj_bias": torch.randn(experts, 2 * inter, generator=g),
        "down_proj": torch.randn(experts, inter, hidden, generator=g) * 0.3,
        "down_proj_bias": torch.randn(experts, hidden, generator=g),
    }


def _load_gpt_oss_experts(moe: FusedMoE, tensors: dict[str, torch.Tensor]) -> None:
    moe.weight_loader(moe.w13_weight, tensors["gate_up_proj"], transposed=True, interleaved=True)
    assert moe.w13_bias is not None and moe.w2_bias is not None
    moe.weight_loader(moe.w13_bias, tensors["gate_up_proj_bias"], interleaved=True)
    moe.weight_loader(moe.w2_weight, tensors["down_proj"], transposed=True)
    moe.weight_loader(moe.w2_bias, tensors["down_proj_bias"])


def naive_gpt_oss_moe(
    x: torch.Tensor, t: dict[str, torch.Tensor], logits: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Token by token, on the checkpoint's layout: top-k logits, softmax over them; per chosen
    expert `x @ W + b`, gate = even columns, up = odd, the clamped SwiGLU, `@ down + b`."""
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        top, ids = torch.topk(logits[i], top_k)
        for w, e in zip(torch.softmax(top, -1).tolist(), ids.tolist()):
            gate_up = x[i] @ t["gate_up_proj"][e] + t["gate_up_proj_bias"][e]
            gate = gate_up[0::2].clamp(max=LIMIT)
            up = gate_up[1::2].clamp(-LIMIT, LIMIT)
            act = (up + 1) * gate * torch.sigmoid(gate * ALPHA)
            out[i] += w * (act @ t["down_proj"][e] + t["down_proj_bias"][e])
    return out


@pytest.mark.parametrize(("experts", "top_k"), [(6, 2), (5, 3), (4, 1)])
def test_swigluoai_bias_moe_matches_a_per_token_loop(experts: int, top_k: int) -> None:
    hidden, inter, tokens = 24, 20, 41
    moe = FusedMoE(experts, top_k, hidden, inter, params_dtype=torch.float32, bias=True,
                   activation="swigluoai", swiglu_alpha=ALPHA, swiglu_limit=LIMIT,
                   routing="topk_softmax")  # fmt: skip
    tensors = _gpt_oss_experts(experts, hidden, inter, seed=experts + top_k)
    _load_gpt_oss_experts(moe, tensors)
    torch.manual_seed(top_k)
    x = torch.randn(tokens, hidden)
    logits = torch.randn(tokens, experts) * 2
    got = moe(x, logits)
    want = naive_gpt_oss_moe(x, tensors, logits, top_k)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # The clamps bite on both sides (otherwise the loop above could not tell them apart).
    gate_up = torch.einsum("th,ehi->eti", x, tensors["gate_up_proj"])
    assert (gate_up[..., 0::2] > LIMIT).any() and (gate_up[..., 1::2] < -LIMIT).any()
    # Softmax over the chosen k: renormalize has no say; the biases and the order matter.
    weights, ids = moe.route(logits)
    torch.testing.assert_close(weights.sum(-1), torch.ones(tokens))
    assert torch.equal(ids, torch.topk(logits, top_k).indices)


def test_moe_matches_hf_gpt_oss_mlp() -> None:
    """Router and experts loaded from HF `GptOssMLP`'s own parameters give its output."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    config = _config(hidden_size=32, intermediate_size=28, num_local_experts=5,
                     num_experts_per_tok=3)  # fmt: skip
    torch.manual_seed(3)
    hf = GptOssMLP(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0.0, 0.3)
    moe = FusedMoE(5, 3, 32, 28, params_dtype=torch.float32, bias=True, activation="swigluoai",
                   swiglu_alpha=ALPHA, swiglu_limit=LIMIT, routing="topk_softmax")  # fmt: skip
    experts = {name: p.detach() for name, p in hf.experts.named_parameters()}
    assert set(experts) == {"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"}
    _load_gpt_oss_experts(moe, experts)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        want, _ = hf(x)
        logits = F.linear(x.view(-1, 32), hf.router.weight, hf.router.bias)
        got = moe(x.view(-1, 32), logits).view_as(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_silu_with_biases_and_loader_checks() -> None:
    """SwiGLU experts with biases (the "silu" path reads them too); the de-interleaving is a
    real reordering; misuse is refused."""
    experts, hidden, inter = 3, 8, 6
    moe = FusedMoE(experts, 2, hidden, inter, params_dtype=torch.float32, bias=True)
    torch.manual_seed(0)
    for param in moe.parameters():
        param.data.normal_()
    x, logits = torch.randn(5, hidden), torch.randn(5, experts)
    weights, ids = moe.route(logits)
    want = torch.zeros(5, hidden)
    for t in range(5):
        for w, e in zip(weights[t].tolist(), ids[t].tolist()):
            gate_up = moe.w13_weight[e] @ x[t] + moe.w13_bias[e]  # type: ignore[index]
            act = F.silu(gate_up[:inter]) * gate_up[inter:]
            want[t] += w * (moe.w2_weight[e] @ act + moe.w2_bias[e])  # type: ignore[index]
    torch.testing.assert_close(moe(x, logits), want, rtol=1e-5, atol=1e-5)

    packed = torch.arange(experts * 2 * inter, dtype=torch.float32).view(experts, 2 * inter)
    moe.weight_loader(moe.w13_bias, packed, interleaved=True)  # type: ignore[arg-type]
    assert moe.w13_bias[0].tolist() == [*range(0, 12, 2), *range(1, 12, 2)]  # type: ignore[index]
    with pytest.raises(ValueError, match="interleaved"):
        moe.weight_loader(moe.w2_bias, torch.zeros(experts, hidden), interleaved=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape mismatch for packed bias"):
        moe.weight_loader(moe.w13_bias, torch.zeros(experts, inter))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="activation"):
        FusedMoE(2, 1, 4, 4, activation="gelu")
    with pytest.raises(ValueError, match="routing"):
        FusedMoE(2, 1, 4, 4, routing="sigmoid")


# ---------------------------------------------------------------------------------------------
# The model against HF
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(_config(), tmp_path_factory.mktemp("gpt_oss"))


def test_logits_match_hf(gpt_oss_dir: Path) -> None:
    """One forward of 50 tokens (past the window of 12 and the YaRN original length 64 with
    the offset start), and the paged path fed in chunks, against HF's eager forward."""
    from tests.tiny_models import load_hf

    hf = load_hf(gpt_oss_dir)
    ours = _load(gpt_oss_dir)
    layers = ours.model.layers
    assert [layer.self_attn.attn.sliding_window for layer in layers] == [12, None, 12, None]
    for ours_layer, hf_layer in zip(layers, hf.model.layers):
        assert torch.equal(ours_layer.self_attn.sinks, hf_layer.self_attn.sinks)
    ids = _random_ids(hf.config.vocab_size, 50, 1)
    for start in (0, 40):
        positions = torch.arange(start, start + len(ids))
        with torch.no_grad():
            expected = _hf_logits(hf, ids, positions)
        torch.testing.assert_close(_our_logits(ours, ids, positions), expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        expected = _hf_logits(hf, ids, torch.arange(len(ids)))
    actual = _paged_logits(ours, ids, [20, 7, 1, 1, 21])
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_greedy_matches_hf(gpt_oss_dir: Path) -> None:
    assert_greedy_matches_hf(gpt_oss_dir)


def test_mxfp4_checkpoint_is_refused(gpt_oss_dir: Path) -> None:
    ours = _load(gpt_oss_dir)
    blocks = [("model.layers.0.mlp.experts.gate_up_proj_blocks", torch.zeros(1))]
    with pytest.raises(NotImplementedError, match="MXFP4"):
        ours.load_weights(blocks)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_greedy_matches_hf_on_gpu(gpt_oss_dir: Path) -> None:
    """On CUDA: the fused attention prologue, the GPU attention backend with sinks and
    sliding windows, CUDA graphs for decode."""
    assert_greedy_matches_hf(gpt_oss_dir, regimes=("plain", "chunked"))


@pytest.mark.slow
def test_triton_kernels_greedy_match_hf(gpt_oss_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton attention backend (sinks, sliding windows), the fused prologue (YaRN's scaled
    cos/sin) and the MoE kernels (swigluoai, biases): without a GPU, under Triton's
    interpreter, on few short generations (the interpreter is slow)."""
    force_fused_kernels(monkeypatch, _TRITON_TOO_EARLY)
    from pagedllm.attention.triton.backend import TritonAttention
    from pagedllm.layers.fused_moe import kernels

    calls: list[str] = []
    moe_forward, attn_forward = kernels.forward_layer, TritonAttention.forward

    def counting_moe(layer: Any, *args: Any) -> torch.Tensor:
        calls.append(layer.activation)
        return moe_forward(layer, *args)

    def counting_attn(impl: TritonAttention, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(f"sinks {impl.sinks is not None}, window {impl.sliding_window}")
        return attn_forward(impl, *args, **kwargs)

    prologue = fused.kernels().rope_norm_and_cache_

    def counting_prologue(*args: Any, **kwargs: Any) -> None:
        calls.append("prologue")
        prologue(*args, **kwargs)

    monkeypatch.setattr(kernels, "forward_layer", counting_moe)
    monkeypatch.setattr(fused.kernels(), "rope_norm_and_cache_", counting_prologue)
    monkeypatch.setattr(TritonAttention, "forward", counting_attn)
    assert_greedy_matches_hf(gpt_oss_dir, generations=[(14, 5), (1, 3)],
                             regimes=("plain",), attention_backend="triton",
                             max_num_seqs=4)  # fmt: skip
    # The MoE kernels, the fused prologue and the Triton attention of both layer kinds (with
    # their sinks) ran.
    kinds = {"swigluoai", "prologue", "sinks True, window 12", "sinks True, window None"}
    assert set(calls) == kinds
