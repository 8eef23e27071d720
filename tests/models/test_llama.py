"""The Llama family against HF transformers: tiny random checkpoints saved with `save_pretrained`,
loaded with `load_model`, compared logit for logit (fp32, 1e-4)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from pagedllm.attention.backend import get_attention_backend, kv_cache_shape
from pagedllm.attention.layer import Attention
from pagedllm.attention.utils import build_metadata
from pagedllm.config import ModelConfig
from pagedllm.forward_context import set_forward_context
from pagedllm.layers.rotary import compute_inv_freq, get_rope, get_rope_parameters
from pagedllm.loader import load_model
from pagedllm.models.registry import resolve_model_cls, supported_architectures

ATOL = 1e-4
TORCH_ATTN = get_attention_backend("torch", "cpu")

_COMMON: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)


def _llama3_tied() -> PretrainedConfig:
    rope = dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,  # so that the tiny head_dim spans all three bands
    )
    return LlamaConfig(
        **_COMMON,
        rope_parameters=rope,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
    )


def _llama_untied() -> PretrainedConfig:
    rope = dict(rope_type="linear", rope_theta=10000.0, factor=2.0)
    return LlamaConfig(**_COMMON, head_dim=32, rope_parameters=rope, tie_word_embeddings=False)


def _mistral(sliding_window: int = 4096) -> PretrainedConfig:
    return MistralConfig(**_COMMON, sliding_window=sliding_window, tie_word_embeddings=False)


def _qwen2(**kw: Any) -> PretrainedConfig:
    return Qwen2Config(**_COMMON, tie_word_embeddings=False, **kw)


def _qwen3() -> PretrainedConfig:
    return Qwen3Config(**_COMMON, head_dim=32, tie_word_embeddings=True)


CASES = {
    "llama3-tied": _llama3_tied,
    "llama-untied": _llama_untied,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3-tied": _qwen3,
}


def _hf_model(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """A random HF model; weights, biases and norm gains all far from their init values."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.15)
    return model.eval()


def _save(model: torch.nn.Module, path: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


def _model_config(path: Path | str, hf_config: Any, **overrides: Any) -> ModelConfig:
    head_dim = getattr(hf_config, "head_dim", None) or (
        hf_config.hidden_size // hf_config.num_attention_heads
    )
    fields: dict[str, Any] = dict(
        model=str(path),
        tokenizer=None,
        dtype="float32",
        max_model_len=hf_config.max_position_embeddings,
        seed=0,
        load_format="auto",
        architecture=(hf_config.architectures or ["?"])[0],
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads,
        head_dim=head_dim,
        hf_config=hf_config,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def _load(path: Path, **overrides: Any) -> torch.nn.Module:
    hf_config = AutoConfig.from_pretrained(path)
    return load_model(_model_config(path, hf_config, **overrides), "cpu", TORCH_ATTN)


@torch.no_grad()
def _our_logits(model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    with set_forward_context(None):
        return model.compute_logits(model(ids, positions))


@torch.no_grad()
def _hf_logits(model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids[None], position_ids=positions[None]).logits[0]


def _random_ids(vocab_size: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(case: str, tmp_path: Path) -> None:
    hf = _hf_model(CASES[case]())
    ours = _load(_save(hf, tmp_path))
    for seed, start in ((1, 0), (2, 37)):
        ids = _random_ids(hf.config.vocab_size, 23, seed)
        positions = torch.arange(start, start + len(ids))
        expected = _hf_logits(hf, ids, positions)
        actual = _our_logits(ours, ids, positions)
        assert actual.shape == (len(ids), hf.config.vocab_size)
        assert expected.abs().max() > 1.0  # the comparison is not between near-zero logits
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_sharded_checkpoint(tmp_path: Path) -> None:
    hf = _hf_model(_qwen2())
    _save(hf, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = _load(tmp_path)
    ids = _random_ids(hf.config.vocab_size, 17, 3)
    positions = torch.arange(len(ids))
    torch.testing.assert_close(
        _our_logits(ours, ids, positions), _hf_logits(hf, ids, positions), atol=ATOL, rtol=0
    )


def test_tied_and_fused_parameters(tmp_path: Path) -> None:
    tied = _load(_save(_hf_model(_qwen3()), tmp_path / "tied"))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    untied = _load(_save(_hf_model(_qwen2()), tmp_path / "untied"))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    names = {name for name, _ in untied.named_parameters()}
    assert "model.layers.0.self_attn.qkv_proj.bias" in names
    assert "model.layers.0.self_attn.o_proj.bias" not in names
    assert "model.layers.1.mlp.gate_up_proj.weight" in names
    attn_layers = [m for m in untied.modules() if isinstance(m, Attention)]
    assert len(attn_layers) == 2


def _paged_logits(
    model: torch.nn.Module, ids: torch.Tensor, chunks: list[int], block_size: int = 4
) -> torch.Tensor:
    """Logits of one request fed to the paged reference backend in chunks (prefill, then more)."""
    attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
    num_blocks = -(-len(ids) // block_size) + 2
    for layer in attn_layers:
        shape = kv_cache_shape(num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
        layer.kv_cache = torch.zeros(shape)
    # NOTE: blocks out of order, so a wrong slot mapping cannot pass by accident.
    block_table = list(range(num_blocks))[::-1]
    out, done = [], 0
    with torch.no_grad():
        for n in chunks:
            meta = build_metadata([n], [done + n], [block_table], block_size, "cpu")
            with set_forward_context(meta):
                hidden = model(ids[done : done + n], torch.arange(done, done + n))
            out.append(model.compute_logits(hidden))
            done += n
    return torch.cat(out)


@pytest.mark.parametrize(
    "config_fn",
    [
        lambda: _mistral(sliding_window=6),
        lambda: _qwen2(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    ],
    ids=["mistral", "qwen2-layer1-only"],
)
def test_sliding_window_paged_matches_hf(config_fn: Any, tmp_path: Path) -> None:
    hf = _hf_model(config_fn())
    ours = _load(_save(hf, tmp_path))
    windows = [m.sliding_window for m in ours.modules() if isinstance(m, Attention)]
    window = hf.config.sliding_window
    assert windows == ([window, window] if hf.config.model_type == "mistral" else [None, window])
    ids = _random_ids(hf.config.vocab_size, 20, 4)
    expected = _hf_logits(hf, ids, torch.arange(len(ids)))
    actual = _paged_logits(ours, ids, [9, 7, 1, 1, 1, 1])
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


def test_qwen_without_sliding_window_has_none(tmp_path: Path) -> None:
    ours = _load(_save(_hf_model(_qwen2(use_sliding_window=False, sliding_window=4)), tmp_path))
    assert [m.sliding_window for m in ours.modules() if isinstance(m, Attention)] == [None, None]


def test_bfloat16_built_in_dtype(tmp_path: Path) -> None:
    hf = _hf_model(_llama3_tied())
    ours = _load(_save(hf, tmp_path), dtype="bfloat16")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    rotary = ours.model.layers[0].self_attn.rotary_emb
    assert rotary.cos_cache.dtype == torch.float32
    ids = _random_ids(hf.config.vocab_size, 16, 5)
    positions = torch.arange(len(ids))
    expected = _hf_logits(hf, ids, positions)
    actual = _our_logits(ours, ids, positions)
    assert actual.dtype == torch.bfloat16
    assert (actual.float() - expected).abs().max() < 0.05 * expected.abs().max()


def test_dummy_load_format_builds_and_runs() -> None:
    config = _qwen3()
    config.architectures = ["Qwen3ForCausalLM"]

    def build(seed: int) -> torch.nn.Module:
        mc = _model_config("/nonexistent/model", config, load_format="dummy", seed=seed)
        return load_model(mc, "cpu", TORCH_ATTN)

    model, again, other = build(0), build(0), build(1)
    assert not model.training
    ids = _random_ids(config.vocab_size, 9, 6)
    logits = _our_logits(model, ids, torch.arange(len(ids)))
    assert logits.shape == (9, config.vocab_size) and torch.isfinite(logits).all()
    assert torch.equal(model.model.norm.weight, torch.ones(config.hidden_size))
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    assert 0 < qkv.abs().max() <= 1e-3
    assert torch.equal(qkv, again.model.layers[0].self_attn.qkv_proj.weight)
    assert not torch.equal(qkv, other.model.layers[0].self_attn.qkv_proj.weight)


def test_missing_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    config = _llama_untied()
    config.architectures = ["LlamaForCausalLM"]
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        load_model(_model_config(tmp_path, config), "cpu", TORCH_ATTN)


def test_incomplete_checkpoint_is_an_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _save(_hf_model(_mistral()), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_up_proj\.weight"):
        _load(tmp_path)


def test_unknown_architecture_lists_supported() -> None:
    with pytest.raises(ValueError) as err:
        resolve_model_cls(["FancyNewForCausalLM"])
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in str(err.value)
        assert name in supported_architectures()
    assert "FancyNewForCausalLM" in str(err.value)
    assert resolve_model_cls(["FancyNewForCausalLM", "Qwen2ForCausalLM"]).__name__ == (
        "Qwen2ForCausalLM"
    )


def _rope_config(rope_parameters: dict[str, Any]) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=512,
        num_attention_heads=4,  # head_dim 128, as in Llama 3
        max_position_embeddings=131072,
        rope_parameters=rope_parameters,
    )


LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)


def test_rotary_llama3_matches_hf_init_function() -> None:
    config = _rope_config(dict(LLAMA3_ROPE))
    expected, expected_scale = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    actual, scale = compute_inv_freq(128, get_rope_parameters(config))
    torch.testing.assert_close(actual, expected, atol=0, rtol=1e-6)
    assert scale == expected_scale
    # All three bands are present: kept, divided by the factor, and smoothly interpolated.
    plain, _ = compute_inv_freq(128, {"rope_type": "default", "rope_theta": 500000.0})
    ratio = plain / actual
    assert (ratio == 1).any() and (ratio == 8).any() and ((ratio > 1) & (ratio < 8)).any()


@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_type="default", rope_theta=10000.0),
        dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
        LLAMA3_ROPE,
    ],
    ids=["default", "linear", "llama3"],
)
def test_rotary_matches_hf_rotation(rope: dict[str, Any]) -> None:
    config = _rope_config(dict(rope))
    ours = get_rope(128, 4096, get_rope_parameters(config))
    positions = torch.tensor([0, 1, 5, 100, 2047, 4095])
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(len(positions), 4, 128, generator=gen)
    k = torch.randn(len(positions), 2, 128, generator=gen)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1), k.transpose(0, 1), cos[0], sin[0], 0)
    q_out, k_out = ours(positions, q.reshape(len(positions), -1), k.reshape(len(positions), -1))
    torch.testing.assert_close(q_out.view_as(q), q_ref.transpose(0, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(k_out.view_as(k), k_ref.transpose(0, 1), atol=1e-5, rtol=0)


def test_rope_parameters_transformers4_style() -> None:
    v4 = SimpleNamespace(
        rope_theta=500000.0,
        rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_theta", "rope_type")}
        | {"type": "llama3"},
        max_position_embeddings=131072,
    )
    v5 = _rope_config(dict(LLAMA3_ROPE))
    params_v4, params_v5 = get_rope_parameters(v4), get_rope_parameters(v5)
    assert params_v4["rope_type"] == "llama3" and params_v4["rope_theta"] == 500000.0
    inv_freq_v4, _ = compute_inv_freq(128, params_v4)
    inv_freq_v5, _ = compute_inv_freq(128, params_v5)
    torch.testing.assert_close(inv_freq_v4, inv_freq_v5, atol=0, rtol=0)
    plain = get_rope_parameters(SimpleNamespace(rope_theta=1e6, rope_scaling=None))
    assert plain == {"rope_theta": 1e6, "rope_type": "default"}
    with pytest.raises(NotImplementedError, match="dynamic"):
        compute_inv_freq(64, {"rope_type": "dynamic", "rope_theta": 1e4})


def test_layer_sliding_window_transformers4_configs() -> None:
    from pagedllm.models.llama import layer_sliding_window

    qwen_v4 = SimpleNamespace(sliding_window=8, use_sliding_window=True, max_window_layers=2)
    assert [layer_sliding_window(qwen_v4, i) for i in range(4)] == [None, None, 8, 8]
    qwen_v4_off = SimpleNamespace(sliding_window=8, use_sliding_window=False, max_window_layers=0)
    assert [layer_sliding_window(qwen_v4_off, i) for i in range(2)] == [None, None]
    mistral_v4 = SimpleNamespace(sliding_window=8)
    assert [layer_sliding_window(mistral_v4, i) for i in range(2)] == [8, 8]
    assert layer_sliding_window(SimpleNamespace(), 0) is None
