"""DeepSeek V2 / V3 (the tiny random models of test_qwen2_moe_deepseek.py) through `LLM` with
MLA's decode in Triton (`attention/triton/mla_backend.py`) equal HF transformers' greedy
`generate` token for token; without a GPU under Triton's interpreter (the Triton path forced:
it is chosen on CUDA only), with the decode kernel counted so that the test fails if it never
ran. On a GPU (`gpu` marker), the same with CUDA graphs captured (the Triton MLA impl is
CUDA-graph safe)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.triton_interpreter import interpret_without_cuda, patch_interpreter

_TRITON_TOO_EARLY = interpret_without_cuda()

from pagedllm.attention import mla  # noqa: E402
from tests.models.harness import assert_greedy_matches_hf  # noqa: E402
from tests.models.test_qwen2_moe_deepseek import (  # noqa: E402
    COMMON,
    MLA,
    _one_thread,
    deepseek_v3_config,
    save_model,
)

__all__ = ["_one_thread"]

# Shorter than test_qwen2_moe_deepseek.py's (the interpreter is slow): a one-token prompt, block
# boundaries crossed while decoding (the preemption regime needs them), a prompt chunked beside
# decodes.
GENERATIONS = [(1, 12), (13, 8), (20, 14)]


def deepseek_v2_config():
    """test_qwen2_moe_deepseek.py's V2 (its routing, a dense first layer), one shard."""
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        **COMMON, **{**MLA, "kv_lora_rank": 14}, num_hidden_layers=3, q_lora_rank=None,
        n_routed_experts=12, num_experts_per_tok=3, n_group=4, topk_group=2,
        topk_method="group_limited_greedy", routed_scaling_factor=1.7, first_k_dense_replace=1,
        n_shared_experts=2,
    )  # fmt: skip


def force_triton_mla(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The Triton MLA path on (under the interpreter without CUDA); returns a list that grows
    by one per decode launch."""
    import os

    pytest.importorskip("triton", reason="triton is not installed")
    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1" or _TRITON_TOO_EARLY:
            pytest.skip("no GPU, and triton was imported without TRITON_INTERPRET=1")
        patch_interpreter()
    from pagedllm.attention.triton import mla_backend

    monkeypatch.setattr(mla, "use_triton_decode", lambda: True)
    calls: list[int] = []
    decode = mla_backend.mla_decode

    def counting(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        decode(*args, **kwargs)

    monkeypatch.setattr(mla_backend, "mla_decode", counting)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("model, splits", [("v2", 2), ("v3", None)])
def test_triton_mla_greedy_equals_hf(
    model: str, splits: int | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """V2's layout (plain q_proj, kv_lora_rank 14) with 2 KV splits forced on every decode
    step; V3's (q_lora_rank, YaRN, kv_lora_rank 13: padded kernel lanes) with the split count
    the heuristic picks (1 at these lengths). Every regime of the harness."""
    calls = force_triton_mla(monkeypatch)
    from pagedllm.attention.triton.mla_backend import MLATritonImpl

    monkeypatch.setattr(MLATritonImpl, "num_kv_splits", splits)
    config = deepseek_v2_config() if model == "v2" else deepseek_v3_config()
    path = save_model(config, tmp_path / model)
    assert_greedy_matches_hf(path, generations=GENERATIONS)
    assert calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deepseek_v3_triton_mla_on_cuda_equals_hf(tmp_path: Path, monkeypatch) -> None:
    """On CUDA (fp32, `PAGEDLLM_MLA_TRITON=1`): the Triton MLA decode is chosen, and decode
    runs in CUDA graphs; every regime of the harness."""
    from pagedllm.attention.triton.mla_backend import MLATritonBackend

    monkeypatch.setenv("PAGEDLLM_MLA_TRITON", "1")

    assert mla.mla_backend() is MLATritonBackend
    path = save_model(deepseek_v3_config(), tmp_path / "deepseek_v3")
    assert_greedy_matches_hf(path)
