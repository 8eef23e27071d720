"""The Transformers fallback (`models/transformers.py`) against HF transformers, on tiny random
checkpoints built here (fp32; CPU, plus one CUDA test).

- GPT-NeoX (no pagedllm model file: served through the fallback by `model_impl="auto"`): head
  dim 15, partial rotary (6 of 15 dims), parallel residual, untied head under a legacy checkpoint
  name (`embed_out`, renamed as transformers renames it); greedy tokens equal HF `generate` in
  every regime of `assert_greedy_matches_hf` (plain, chunked prefill + prefix-cache hits,
  preemption); the start-up message names the architecture.
- GPT-2: learned positions, Conv1D projections, tied embeddings, a per-layer attention scale
  (`scale_attn_by_inverse_layer_idx`, read from the HF module by the construction trace).
- Starcoder2: grouped KV heads and a sliding window (24 tokens) shorter than the prompts.
- Llama (native) forced through `model_impl="transformers"`: the same tokens as HF.
- Resolution and refusals: `native` on an architecture without a model file is a clear error,
  as is an unknown `model_impl`; `--model-impl` is a CLI flag; encoder-decoder, non-causal and
  models whose attention bypasses transformers' attention interface are refused.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    BartConfig,
    BertConfig,
    BloomConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    Starcoder2Config,
)

from pagedllm import LLM
from pagedllm.attention.backend import get_attention_backend
from pagedllm.engine_args import EngineArgs
from pagedllm.models.registry import resolve_model
from pagedllm.models.transformers import TransformersForCausalLM
from pagedllm.models.utils import make_context
from tests.models.harness import assert_greedy_matches_hf, save_hf_model
from tests.tiny_models import hf_greedy, load_hf

VOCAB = 320
_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Fewer, shorter generations for the architectures after the first (runtime).
SHORT = [(1, 12), (17, 9), (40, 1), (70, 14)]


def _with_arch(config: Any, arch: str) -> Any:
    config.architectures = [arch]
    return config


def neox_config() -> GPTNeoXConfig:
    return _with_arch(
        GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=60, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=96, max_position_embeddings=256, rotary_pct=0.4,
            use_parallel_residual=True, attention_bias=True, tie_word_embeddings=False,
            initializer_range=0.25, **_IDS,
        ),
        "GPTNeoXForCausalLM",
    )  # fmt: skip


def gpt2_config() -> GPT2Config:
    return _with_arch(
        GPT2Config(
            vocab_size=VOCAB, n_embd=72, n_layer=3, n_head=6, n_positions=256,
            scale_attn_by_inverse_layer_idx=True, initializer_range=0.25, **_IDS,
        ),
        "GPT2LMHeadModel",
    )  # fmt: skip


def starcoder2_config() -> Starcoder2Config:
    return _with_arch(
        Starcoder2Config(
            vocab_size=VOCAB, hidden_size=80, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            sliding_window=24, use_bias=True, initializer_range=0.25, **_IDS,
        ),
        "Starcoder2ForCausalLM",
    )  # fmt: skip


def llama_config() -> LlamaConfig:
    return _with_arch(
        LlamaConfig(
            vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24,
            max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.25,
            **_IDS,
        ),
        "LlamaForCausalLM",
    )  # fmt: skip


@pytest.fixture(scope="module")
def neox_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_model(neox_config(), tmp_path_factory.mktemp("neox"))


def _fallback_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pagedllm.models.transformers"]


# ----- greedy tokens against HF -----


def test_gpt_neox_served_by_the_fallback_matches_hf(
    neox_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    arch, cls = resolve_model(["GPTNeoXForCausalLM"])
    assert (arch, cls) == ("GPTNeoXForCausalLM", TransformersForCausalLM)
    with caplog.at_level(logging.INFO, logger="pagedllm.models.transformers"):
        assert_greedy_matches_hf(neox_path)
    messages = _fallback_messages(caplog)
    assert messages and all("Transformers fallback" in m for m in messages)
    assert "GPTNeoXForCausalLM: no native pagedllm model" in messages[0]
    warned = [r for r in caplog.records if r.name == "pagedllm.models.transformers"]
    assert all(r.levelno == logging.WARNING for r in warned)


@pytest.mark.parametrize("make_config", [gpt2_config, starcoder2_config], ids=["gpt2", "sc2"])
def test_other_layouts_match_hf(make_config: Any, tmp_path: Path) -> None:
    path = save_hf_model(make_config(), tmp_path)
    assert resolve_model(make_config().architectures)[1] is TransformersForCausalLM
    assert_greedy_matches_hf(path, generations=SHORT, regimes=("plain", "chunked"))


def test_native_architecture_forced_through_transformers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert resolve_model(["LlamaForCausalLM"])[1].__name__ == "LlamaForCausalLM"
    assert resolve_model(["LlamaForCausalLM"], "transformers")[1] is TransformersForCausalLM
    path = save_hf_model(llama_config(), tmp_path)
    with caplog.at_level(logging.INFO, logger="pagedllm.models.transformers"):
        assert_greedy_matches_hf(
            path, generations=SHORT, regimes=("chunked",), model_impl="transformers"
        )
    messages = _fallback_messages(caplog)
    assert messages and "model_impl='transformers'" in messages[0]


def test_weights_bound_and_attention_layers_found(neox_path: Path) -> None:
    """Every HF attention module has one pagedllm `Attention`, shaped as the module attends."""
    llm = LLM(str(neox_path), dtype="float32", skip_tokenizer_init=True, kv_cache_memory="8MiB")
    worker = llm.llm_engine.engine_core.executor.worker
    model = worker.model_runner.model
    assert isinstance(model, TransformersForCausalLM)
    assert list(worker.attention_layers) == [f"attn.{i}" for i in range(3)]
    layer = worker.attention_layers["attn.1"]
    assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (4, 4, 15)
    assert layer.scale == pytest.approx(15**-0.5)
    assert layer.prefix == "model.gpt_neox.layers.1.attention.attn"
    assert layer.kv_cache.numel() > 0, "the worker bound its cache"
    hf = load_hf(neox_path)
    ours = dict(model.model.named_parameters())
    for name, param in hf.named_parameters():
        torch.testing.assert_close(ours[name].cpu(), param, rtol=0, atol=0)


# ----- resolution, options, refusals -----


def test_native_on_an_architecture_without_a_model_file_is_a_clear_error(
    neox_path: Path,
) -> None:
    with pytest.raises(ValueError, match=r"GPTNeoXForCausalLM.*model_impl='native'") as err:
        resolve_model(["GPTNeoXForCausalLM"], "native")
    assert "LlamaForCausalLM" in str(err.value) and "'transformers'" in str(err.value)
    with pytest.raises(ValueError, match="model_impl='native'"):
        EngineArgs(model=str(neox_path), model_impl="native").create_engine_config()
    with pytest.raises(ValueError, match="model_impl must be one of auto, native, transformers"):
        EngineArgs(model=str(neox_path), model_impl="hf").create_engine_config()
    with pytest.raises(ValueError, match="not supported"):
        resolve_model(["FancyNewForCausalLM"], "transformers")


def test_model_impl_flag(neox_path: Path) -> None:
    from pagedllm.entrypoints.cli import build_parser

    ns = build_parser().parse_args(
        ["serve", "--model", str(neox_path), "--model-impl", "transformers"]
    )
    args = EngineArgs.from_cli_args(ns)
    assert args.model_impl == "transformers"
    config = args.create_engine_config()
    assert config.model_config.model_impl == "transformers"
    assert config.model_config.architecture == "GPTNeoXForCausalLM"
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    assert EngineArgs.from_cli_args(parser.parse_args([])).model_impl == "auto"
    assert "--model-impl" in parser.format_help()


def _build(config: Any) -> TransformersForCausalLM:
    ctx = make_context(config, get_attention_backend(None, "cpu"))
    return TransformersForCausalLM(ctx)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (_with_arch(BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=2, decoder_attention_heads=2,
                               encoder_ffn_dim=16, decoder_ffn_dim=16), "BartForCausalLM"),
         "encoder-decoder"),
        (_with_arch(BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2),
                    "BloomForCausalLM"),
         "attention interface"),
        (_with_arch(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=16), "BertLMHeadModel"),
         "not causal"),
    ],
    ids=["encoder-decoder", "no-attention-interface", "not-causal"],
)  # fmt: skip
def test_refuses_what_cannot_be_paged(config: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _build(config)


# ----- CUDA -----


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_and_triton_match_hf(neox_path: Path) -> None:
    """On a GPU: the Triton backend, decode CUDA graphs replayed, tokens equal HF's on CUDA."""
    import random

    rng = random.Random(3)
    lens = [1 + (i * 37) % 150 for i in range(21)]
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in lens]
    max_tokens = [1 + (i * 13) % 30 for i in range(21)]
    llm = LLM(str(neox_path), dtype="float32", max_model_len=256, kv_cache_memory="256MiB",
              skip_tokenizer_init=True)  # fmt: skip
    from tests.models.harness import _generate

    got = _generate(llm, prompts, max_tokens)
    graphs = llm.llm_engine.engine_core.executor.worker.model_runner.cuda_graphs
    assert graphs is not None and graphs.num_replays > 0
    hf = load_hf(neox_path).cuda()
    assert got == hf_greedy(hf, prompts, max_tokens)
