"""Tensor parallelism on CPU: two gloo ranks load one HF checkpoint and must reproduce HF's logits.

Exercises every layer's tp split and weight loader: vocab rows split unevenly (odd vocab), the
single KV head replicated on both ranks, row-parallel biases added once, and the collectives.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pagedllm.attention.backend import get_attention_backend
from pagedllm.config import ModelConfig
from pagedllm.distributed import get_tp_rank, get_tp_size
from pagedllm.forward_context import set_forward_context
from pagedllm.loader import load_model

# NOTE: this module imports no transformers at the top: each spawned rank re-imports it.
WORLD_SIZE = 2


def _rank_main(
    rank: int, init_file: str, hf_config: Any, ckpt: str, ids: torch.Tensor, out_dir: str
) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        torch.set_num_threads(1)
        assert (get_tp_size(), get_tp_rank()) == (WORLD_SIZE, rank)
        model_config = ModelConfig(
            model=ckpt,
            tokenizer=None,
            dtype="float32",
            max_model_len=hf_config.max_position_embeddings,
            seed=0,
            load_format="auto",
            architecture="LlamaForCausalLM",
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_attention_heads=hf_config.num_attention_heads,
            num_kv_heads=hf_config.num_key_value_heads,
            head_dim=hf_config.head_dim,
            hf_config=hf_config,
        )
        model = load_model(model_config, "cpu", get_attention_backend("torch", "cpu"))
        qkv = model.model.layers[0].self_attn.qkv_proj
        assert (qkv.num_heads, qkv.num_kv_heads, qkv.num_kv_head_replicas) == (2, 1, 2)
        with torch.no_grad(), set_forward_context(None):
            logits = model.compute_logits(model(ids, torch.arange(len(ids))))
        torch.save(logits, Path(out_dir) / f"logits{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tp2_logits_match_hf(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    from tests.models.test_llama import _hf_logits, _hf_model, _random_ids, _save

    config = LlamaConfig(
        vocab_size=321,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=128,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
    )
    hf = _hf_model(config)
    ckpt = _save(hf, tmp_path / "ckpt")
    ids = _random_ids(config.vocab_size, 19, 8)
    expected = _hf_logits(hf, ids, torch.arange(len(ids)))
    # NOTE: a plain namespace, so the ranks need not import transformers to unpickle it.
    plain_config = SimpleNamespace(**hf.config.to_dict())
    args = (str(tmp_path / "init"), plain_config, str(ckpt), ids, str(tmp_path))
    mp.spawn(_rank_main, args=args, nprocs=WORLD_SIZE, join=True)
    for rank in range(WORLD_SIZE):
        actual = torch.load(tmp_path / f"logits{rank}.pt")
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
