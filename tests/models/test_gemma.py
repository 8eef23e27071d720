"""Gemma 2 and Gemma 3 (text) against HF transformers, on tiny random checkpoints built here.

Shapes chosen so a wrong index shows: head dims 40 and 24 (not powers of two), GQA (2 and 3
query heads per KV head), `query_pre_attn_scalar` unlike the head dim, a sliding window of 16
(shorter than most prompts), several layers of each kind; Gemma 2 soft-caps its attention
scores and logits at values its random weights reach; Gemma 3 has a global rope with linear
scaling (factor 8) and a local one with another base.

- Logits of the paged reference backend, fed in chunks (prefill over the window, then steps),
  against HF's forward (fp32, 1e-4);
- greedy `LLM.generate` token for token against HF `generate` under the harness's regimes
  (plain, chunked prefill + prefix-cache hits, preemption);
- the per-layer windows and rotaries, the rope settings read across transformers versions,
  and each rotary's cos/sin against HF's own rotary module;
- (slow) the Triton backend and the fused kernels under Triton's interpreter: the fused norms
  and Gemma 3's fused q/k-norm prologue with `GemmaRMSNorm`'s `1 + w` weights.
"""

# ruff: noqa: E402 (the environment is read before triton's first import, below)
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.triton_interpreter import force_fused_kernels, interpret_without_cuda

# NOTE: before triton is first imported (the transformers model modules import it).
_TRITON_TOO_EARLY = interpret_without_cuda()

from transformers import Gemma2Config, Gemma3TextConfig, PretrainedConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

from pagedllm.attention.layer import Attention
from pagedllm.layers.layernorm import GemmaRMSNorm
from pagedllm.layers.rotary import get_rope
from pagedllm.models.gemma2 import Gemma2ForCausalLM, gemma_layer_is_sliding
from pagedllm.models.gemma3 import Gemma3ForCausalLM, gemma3_rope_parameters
from tests.models.harness import assert_greedy_matches_hf, save_hf_model
from tests.models.test_llama import ATOL, _hf_logits, _load, _paged_logits, _random_ids
from tests.tiny_models import VOCAB_SIZE

WINDOW = 16
MAX_POSITION = 256
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=96,
    intermediate_size=128,
    max_position_embeddings=MAX_POSITION,
    sliding_window=WINDOW,
    rms_norm_eps=1e-6,
    # NOTE: a wide init spreads the logits: greedy argmax far from ties.
    initializer_range=0.25,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Gemma 3's rope per layer type: global 1M scaled linearly by 8, local 10k unscaled.
_GEMMA3_ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}


def _gemma2(**kw: Any) -> Gemma2Config:
    fields = dict(
        num_hidden_layers=4,  # sliding, full, sliding, full
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=40,
        query_pre_attn_scalar=32,
        attn_logit_softcapping=4.0,
        final_logit_softcapping=5.0,
    )
    return Gemma2Config(**(_COMMON | fields | kw))


def _gemma3(**kw: Any) -> Gemma3TextConfig:
    fields = dict(
        num_hidden_layers=4,
        sliding_window_pattern=2,  # sliding, full, sliding, full
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=24,
        query_pre_attn_scalar=20,
        rope_parameters={k: dict(v) for k, v in _GEMMA3_ROPE.items()},
    )
    return Gemma3TextConfig(**(_COMMON | fields | kw))


CASES = {"gemma2": _gemma2, "gemma3": _gemma3}
EXPECTED_CLS = {"gemma2": Gemma2ForCausalLM, "gemma3": Gemma3ForCausalLM}


def _hf_model(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A random HF model whose norm weights are far from 0 (Gemma scales by `1 + w`)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(-0.5, 0.5)
            else:
                param.normal_(0.0, 0.2)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Structure: layer kinds, rotaries
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_structure(case: str, tmp_path: Path) -> None:
    hf = _hf_model(CASES[case]())
    hf.save_pretrained(tmp_path)
    ours = _load(tmp_path)
    assert type(ours) is EXPECTED_CLS[case]
    attns = [m for m in ours.modules() if isinstance(m, Attention)]
    want = [WINDOW if t == "sliding_attention" else None for t in hf.config.layer_types]
    assert [a.sliding_window for a in attns] == want
    assert want.count(None) >= 2 and want.count(WINDOW) >= 2  # both kinds, twice or more
    scale = hf.config.query_pre_attn_scalar**-0.5
    assert all(a.scale == scale for a in attns)
    assert all(a.logits_soft_cap == hf.config.attn_logit_softcapping for a in attns)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied
    norms = [m for m in ours.modules() if isinstance(m, GemmaRMSNorm)]
    per_layer = 6 if case == "gemma3" else 4  # + q/k norms
    assert len(norms) == per_layer * hf.config.num_hidden_layers + 1
    # The loader stored `1 + w` in float32.
    layer0 = ours.model.layers[0]
    expected = hf.model.layers[0].post_feedforward_layernorm.weight + 1.0
    assert layer0.post_feedforward_layernorm.weight.dtype == torch.float32
    torch.testing.assert_close(layer0.post_feedforward_layernorm.weight, expected)
    if case == "gemma3":
        ropes = [layer.self_attn.attn._prologue[0] for layer in ours.model.layers]
        local, global_ = ours.model.rotary_emb_local, ours.model.rotary_emb
        assert ropes == [local if w else global_ for w in want]
        assert global_.rope_parameters["rope_type"] == "linear"
        assert layer0.self_attn.attn._prologue[1] is layer0.self_attn.q_norm


def test_layer_kinds_without_layer_types() -> None:
    """Configs of older transformers: every `pattern`-th layer global (Gemma 2: 2, Gemma 3:
    `sliding_window_pattern`, 6 by default)."""
    gemma2 = SimpleNamespace()
    assert [gemma_layer_is_sliding(gemma2, i, 2) for i in range(4)] == [True, False, True, False]
    gemma3 = SimpleNamespace(sliding_window_pattern=3)
    assert [gemma_layer_is_sliding(gemma3, i, 6) for i in range(6)] == [
        True, True, False, True, True, False,
    ]  # fmt: skip
    assert [gemma_layer_is_sliding(SimpleNamespace(), i, 6) for i in range(6)].count(False) == 1
    typed = SimpleNamespace(layer_types=["full_attention", "sliding_attention"])
    assert [gemma_layer_is_sliding(typed, i, 2) for i in range(2)] == [False, True]


def test_gemma3_rope_parameters_across_transformers_versions() -> None:
    """transformers 5's per-layer-type dict and transformers 4's flat keys read the same."""
    v5 = _gemma3()
    v4 = SimpleNamespace(
        rope_theta=1_000_000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        rope_local_base_freq=10_000.0,
        max_position_embeddings=MAX_POSITION,
    )
    for layer_type in ("full_attention", "sliding_attention"):
        p5, p4 = gemma3_rope_parameters(v5, layer_type), gemma3_rope_parameters(v4, layer_type)
        keys = ("rope_type", "rope_theta", "factor")
        assert {k: p5.get(k) for k in keys} == {k: p4.get(k) for k in keys}
    assert gemma3_rope_parameters(v4, "full_attention")["factor"] == 8.0
    assert gemma3_rope_parameters(v4, "sliding_attention")["rope_theta"] == 10_000.0
    # Defaults: 1M global, 10k local.
    bare = SimpleNamespace(max_position_embeddings=MAX_POSITION)
    assert gemma3_rope_parameters(bare, "full_attention")["rope_theta"] == 1_000_000.0
    assert gemma3_rope_parameters(bare, "sliding_attention")["rope_theta"] == 10_000.0


def test_gemma3_rotaries_match_hf() -> None:
    config = _gemma3()
    hf_rope = Gemma3RotaryEmbedding(config)
    positions = torch.tensor([0, 1, 7, 16, 100, MAX_POSITION - 1])
    x = torch.zeros(1)
    previous = None
    for layer_type in ("full_attention", "sliding_attention"):
        rope = get_rope(24, MAX_POSITION, gemma3_rope_parameters(config, layer_type))
        cos_ref, sin_ref = hf_rope(x, positions[None], layer_type)
        cos, sin = rope.cos_cache[positions], rope.sin_cache[positions]
        torch.testing.assert_close(torch.cat([cos, cos], -1), cos_ref[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.cat([sin, sin], -1), sin_ref[0], atol=1e-6, rtol=0)
        if previous is not None:
            assert (previous - cos).abs().max() > 0.1  # the two rotaries differ
        previous = cos


# ---------------------------------------------------------------------------------------------
# Logits through the paged reference backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_paged_logits_match_hf(case: str, tmp_path: Path) -> None:
    """A 30-token prefill (past the window of 16), chunks, then decode steps, over the cache."""
    hf = _hf_model(CASES[case]())
    hf.save_pretrained(tmp_path)
    ours = _load(tmp_path)
    ids = _random_ids(VOCAB_SIZE, 60, 3)
    expected = _hf_logits(hf, ids, torch.arange(len(ids)))
    actual = _paged_logits(ours, ids, [30, 9, 1, 1, 17, 1, 1])
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
    cap = hf.config.final_logit_softcapping
    if cap is not None:
        # The cap bites: logits come close to it (tanh(x / cap) * cap < cap).
        assert expected.abs().max() > 0.8 * cap
    else:
        assert expected.abs().max() > 1.0


def test_gemma2_soft_caps_matter(tmp_path: Path) -> None:
    """Without either soft cap, HF's logits move far past the tolerance above."""
    ids = _random_ids(VOCAB_SIZE, 40, 4)
    positions = torch.arange(len(ids))
    reference = _hf_logits(_hf_model(_gemma2()), ids, positions)
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        other = _hf_logits(_hf_model(_gemma2(**{field: None})), ids, positions)
        assert (other - reference).abs().max() > 0.05, field


# ---------------------------------------------------------------------------------------------
# End to end: greedy LLM.generate against HF generate
# ---------------------------------------------------------------------------------------------


# (prompt length, new tokens): the harness's prompt lengths (most past the window), fewer tokens.
GENERATIONS = [(1, 10), (5, 12), (17, 8), (40, 1), (64, 10), (100, 8)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_matches_hf(case: str, tmp_path: Path) -> None:
    path = save_hf_model(CASES[case](), tmp_path)
    assert_greedy_matches_hf(path, generations=GENERATIONS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_matches_hf_on_gpu(case: str, tmp_path: Path) -> None:
    """The Triton backend (soft cap and windows in the kernels), the fused norms with `1 + w`
    weights and Gemma 3's fused q/k-norm prologue, CUDA graphs for the decode steps."""
    path = save_hf_model(CASES[case](), tmp_path)
    assert_greedy_matches_hf(path, generations=GENERATIONS, regimes=("plain", "chunked"))


@pytest.mark.slow
def test_triton_backend_and_fused_kernels_greedy_match_hf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemma 3 on the Triton backend with the fused kernels (without a GPU, under Triton's
    interpreter): fused RMSNorms with float32 `1 + w` weights, the fused prologue normalizing
    q/k by them, the windowed and global kernels."""
    force_fused_kernels(monkeypatch, _TRITON_TOO_EARLY)
    from pagedllm.layers import fused_kernels

    calls: list[bool] = []
    original = fused_kernels.rope_norm_and_cache_

    def counting(*args: Any, **kwargs: Any) -> None:
        calls.append(kwargs.get("q_norm_weight") is not None)
        original(*args, **kwargs)

    monkeypatch.setattr(fused_kernels, "rope_norm_and_cache_", counting)
    path = save_hf_model(_gemma3(), tmp_path)
    assert_greedy_matches_hf(
        path, generations=[(5, 4), (30, 3), (40, 1)], regimes=("plain",),
        attention_backend="triton", max_num_seqs=4,
    )  # fmt: skip
    assert calls and all(calls), "the fused prologue ran, with the q/k norms"
