"""YaRN rope (`rope_type` "yarn") against transformers' own: `ROPE_INIT_FUNCTIONS["yarn"]`'s
inverse frequencies and attention factor, and the cos/sin of the HF rotary modules (gpt-oss's,
Llama's), for gpt-oss's settings (`truncate` False), DeepSeek's (`mscale` / `mscale_all_dim`),
an explicit `attention_factor`, a missing `factor`, partial rotary and a top-level
`original_max_position_embeddings`; plus the transformers-4 config style.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import GptOssConfig, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from pagedllm.layers.rotary import compute_inv_freq, get_rope, get_rope_parameters, yarn_mscale

GPT_OSS_ROPE = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                    original_max_position_embeddings=64, rope_theta=150000.0)  # fmt: skip


def _gpt_oss(head_dim: int = 40, **rope: Any) -> GptOssConfig:
    return GptOssConfig(
        hidden_size=64,
        head_dim=head_dim,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=2048,
        rope_parameters={**GPT_OSS_ROPE, **rope},
    )


def _llama(head_dim: int = 24, **config: Any) -> LlamaConfig:
    return LlamaConfig(hidden_size=96, head_dim=head_dim, num_attention_heads=4,
                       num_hidden_layers=1, max_position_embeddings=1024, **config)  # fmt: skip


def _yarn(**rope: Any) -> dict[str, Any]:
    return {"rope_type": "yarn", "rope_theta": 1e4, "original_max_position_embeddings": 128, **rope}


CASES = {
    "gpt-oss-hd40": lambda: _gpt_oss(),
    "gpt-oss-hd24-truncate": lambda: _gpt_oss(24, truncate=True),
    "gpt-oss-hd64-factor4-betas": lambda: _gpt_oss(64, factor=4.0, beta_fast=16.0, beta_slow=2.0),
    "attention-factor": lambda: _gpt_oss(40, attention_factor=0.75),
    "deepseek-mscale": lambda: _llama(
        rope_parameters=_yarn(factor=40.0, mscale=1.0, mscale_all_dim=0.707, beta_fast=32)
    ),
    "deepseek-equal-mscales": lambda: _llama(
        rope_parameters=_yarn(factor=40.0, mscale=1.0, mscale_all_dim=1.0)
    ),
    "factor-from-lengths": lambda: _llama(rope_parameters=_yarn(factor=None)),  # 1024 / 128
    "partial-rotary": lambda: _llama(
        48,
        rope_parameters=_yarn(
            factor=8.0,
            rope_theta=5e5,
            original_max_position_embeddings=256,
            partial_rotary_factor=0.5,
        ),
    ),
}


def _rotary_dim(config: Any) -> int:
    return int(config.head_dim * get_rope_parameters(config).get("partial_rotary_factor", 1.0))


@pytest.mark.parametrize("case", CASES)
def test_yarn_inv_freq_and_attention_factor_match_hf(case: str) -> None:
    config = CASES[case]()
    params = get_rope_parameters(config)
    assert params["rope_type"] == "yarn"
    expected, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    actual, actual_factor = compute_inv_freq(_rotary_dim(config), params)
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=0, rtol=1e-6)
    assert actual_factor == pytest.approx(expected_factor, rel=1e-12)
    # The highest frequency is kept, the lowest divided by the factor (both ends of the ramp).
    plain, _ = compute_inv_freq(_rotary_dim(config), {**params, "rope_type": "default"})
    ratio = actual / plain
    assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(1 / params["factor"])


def test_yarn_attention_factors() -> None:
    """The attention factor's three sources, by hand (the HF comparison above could share a
    mistake with ours only if both were wrong in the same way)."""
    base = dict(rope_type="yarn", rope_theta=10000.0, original_max_position_embeddings=64)
    _, default = compute_inv_freq(16, {**base, "factor": 32.0})
    assert default == pytest.approx(0.1 * math.log(32.0) + 1)
    _, ratio = compute_inv_freq(16, {**base, "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.5})
    assert ratio == pytest.approx((0.1 * math.log(40) + 1) / (0.05 * math.log(40) + 1))
    _, explicit = compute_inv_freq(16, {**base, "factor": 4.0, "attention_factor": 1.25})
    assert explicit == 1.25
    assert yarn_mscale(1.0) == yarn_mscale(0.5) == 1.0


@pytest.mark.parametrize("case", ["gpt-oss-hd40", "gpt-oss-hd24-truncate", "attention-factor"])
def test_yarn_cos_sin_match_gpt_oss_rotary_module(case: str) -> None:
    """Our cos/sin cache rows (already scaled by the attention factor) against
    `GptOssRotaryEmbedding`, whose cos/sin are the halves (not repeated)."""
    config = CASES[case]()
    rope = get_rope(config.head_dim, config.max_position_embeddings, get_rope_parameters(config))
    hf_rope = GptOssRotaryEmbedding(config)
    positions = torch.tensor([0, 1, 7, 63, 64, 65, 500, 2047])
    cos_ref, sin_ref = hf_rope(torch.zeros(1), positions[None])
    assert cos_ref.shape[-1] == config.head_dim // 2
    torch.testing.assert_close(rope.cos_cache[positions], cos_ref[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(rope.sin_cache[positions], sin_ref[0], atol=1e-6, rtol=0)
    if "attention_factor" not in config.rope_parameters:
        assert rope.cos_cache[0, 0] == pytest.approx(0.1 * math.log(32.0) + 1, rel=1e-6)


@pytest.mark.parametrize("case", ["deepseek-mscale", "partial-rotary"])
def test_yarn_rotation_matches_llama_rotary_module(case: str) -> None:
    """The rotation of q and k (partial rotary: the rest passes through) against HF Llama's
    rotary module and `apply_rotary_pos_emb`."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    config = CASES[case]()
    head_dim, heads = config.head_dim, 3
    rope = get_rope(head_dim, config.max_position_embeddings, get_rope_parameters(config))
    positions = torch.tensor([0, 3, 127, 128, 129, 1000])
    torch.manual_seed(0)
    q = torch.randn(len(positions), heads, head_dim)
    k = torch.randn(len(positions), 1, head_dim)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])
    rot = rope.rotary_dim
    q_ref, k_ref = apply_rotary_pos_emb(
        q[None, ..., :rot].transpose(1, 2), k[None, ..., :rot].transpose(1, 2), cos, sin
    )
    q_out, k_out = rope(positions, q.clone().reshape(len(positions), -1), k.clone().flatten(1))
    q_out, k_out = q_out.view_as(q), k_out.view_as(k)
    torch.testing.assert_close(q_out[..., :rot], q_ref[0].transpose(0, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(k_out[..., :rot], k_ref[0].transpose(0, 1), atol=1e-5, rtol=0)
    assert torch.equal(q_out[..., rot:], q[..., rot:])


def test_yarn_transformers4_style_and_top_level_original() -> None:
    """A transformers-4 config (`rope_theta` beside `rope_scaling` with "type") reads as the
    transformers-5 one; a top-level `original_max_position_embeddings` wins over the dict's."""
    v5 = _gpt_oss()
    scaling = {k: v for k, v in GPT_OSS_ROPE.items() if k not in ("rope_type", "rope_theta")}
    v4 = SimpleNamespace(
        rope_theta=150000.0, rope_scaling={"type": "yarn", **scaling}, max_position_embeddings=2048
    )
    p4, p5 = get_rope_parameters(v4), get_rope_parameters(v5)
    assert p4["rope_type"] == "yarn" and "type" not in p4
    f4, a4 = compute_inv_freq(40, p4)
    f5, a5 = compute_inv_freq(40, p5)
    assert torch.equal(f4, f5) and a4 == a5
    v4.original_max_position_embeddings = 128
    assert get_rope_parameters(v4)["original_max_position_embeddings"] == 128
    missing = SimpleNamespace(rope_theta=1e4, max_position_embeddings=512,
                              rope_scaling={"type": "yarn", "factor": None})  # fmt: skip
    params = get_rope_parameters(missing)
    assert params["original_max_position_embeddings"] == 512 and params["factor"] == 1.0
