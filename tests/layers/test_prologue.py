"""The fused attention prologue (`fused_kernels.rope_norm_and_cache_`) against the unfused ops.

Kernel level, on random inputs: the eager `RMSNorm` (Qwen3's per-head q/k norm), the eager
`RotaryEmbedding` and the torch reference cache write (`write_to_kv_cache`) are the reference,
over head dims 64 and 128, GQA ratios 1, 2 and 4, plain and llama3-scaled rope, with and without
the q/k norm, with padding rows (slot -1, and rows past `num_tokens`) whose slots stay untouched.
Engine level: tiny Llama and Qwen3 models through `LLM` with the Triton backend give the same
greedy tokens with the prologue as without it (and as the torch reference backend).

Without a GPU everything runs on CPU tensors under Triton's interpreter, patched by
tests/triton_interpreter.py (among others: fp32 -> bf16 casts round to nearest even, as on a GPU,
where the interpreter truncates).

Tolerances, in rounding steps (ulps) of the dtype at the magnitude of each head's largest
reference value (`_max_ulps`); measured under the interpreter:
- without the q/k norm the kernel repeats the eager ops' roundings: bit-equal, fp32 to bf16;
- with it, the fp32 sum of squares adds in another order than torch's, so `rstd` may differ in
  its last bit. In fp16/bf16 that is mostly rounded away: within one step (measured: at most
  half a step at the head's magnitude). In fp32 nothing rounds it away and the norm's and the
  rotary's products carry it: within 4 ulps (measured: 3).
The V rows and the untouched slots are compared bit for bit in every case.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from tests.triton_interpreter import kernel_test_device

DEVICE = kernel_test_device()  # NOTE: before triton is first imported

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.attention.torch_ref import write_to_kv_cache  # noqa: E402
from pagedllm.attention.triton.backend import TritonAttention  # noqa: E402
from pagedllm.layers import fused, fused_kernels  # noqa: E402
from pagedllm.layers.layernorm import RMSNorm  # noqa: E402
from pagedllm.layers.rotary import get_rope  # noqa: E402
from tests.tiny_models import ARCHS, VOCAB_SIZE  # noqa: E402
from tests.triton_interpreter import one_thread, patch_interpreter  # noqa: E402, F401

# Largest difference allowed with the q/k norm (or compiled), in ulps (see the module docstring).
MAX_ULPS = {torch.float32: 4, torch.float16: 1, torch.bfloat16: 1}
MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 1000000.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
}  # fmt: skip


if DEVICE == "cpu":
    patch_interpreter()


def _max_ulps(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| over `[T, H, D]` heads, in ulps of the dtype at the head's
    largest |expected| value."""
    scale = expected.float().abs().amax(-1, keepdim=True)
    step = torch.exp2(torch.floor(torch.log2(scale)) - MANTISSA_BITS[expected.dtype])
    return ((actual.float() - expected.float()).abs() / step).max().item()


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.reshape(x.shape[0], -1, head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rope_name", list(ROPES))
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (8, 4), (8, 2)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prologue_matches_unfused_ops(
    head_dim: int,
    num_heads: int,
    num_kv_heads: int,
    qk_norm: bool,
    rope_name: str,
    dtype: torch.dtype,
) -> None:
    seed = head_dim * 100 + num_heads * 10 + num_kv_heads + 7 * qk_norm
    check_prologue(head_dim, num_heads, num_kv_heads, qk_norm, ROPES[rope_name], dtype, seed)


def check_prologue(
    head_dim: int,
    num_heads: int,
    num_kv_heads: int,
    qk_norm: bool,
    rope: dict,
    dtype: torch.dtype,
    seed: int,
) -> None:
    """`rope_norm_and_cache_` against the eager ops the layer runs without the fused path (the
    q/k `RMSNorm`, `RotaryEmbedding`, the torch cache write), with padding rows (slot -1, and
    rows past `num_tokens`) whose slots stay untouched. Shared with the head-dim tests."""
    gen = torch.Generator().manual_seed(seed)
    rotary = get_rope(head_dim, 8192, rope)
    total, num_tokens, block_size, num_blocks = 11, 9, 16, 5
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = (2 * torch.randn(total, q_size + 2 * kv_size, generator=gen)).to(dtype)
    positions = torch.randint(0, 8192, (total,), generator=gen)
    positions[num_tokens:] = 0  # as a CUDA graph's padding rows
    # Distinct slots over shuffled blocks; two padding rows (slot -1) among the real ones.
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[2, 6]] = -1
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    cache = cache.to(dtype)
    q_norm, k_norm = RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-6)
    for norm in (q_norm, k_norm):
        norm.weight.data = (1 + 0.2 * torch.randn(head_dim, generator=gen)).to(dtype)

    # Reference: the eager ops the layer runs without the fused path.
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    ref_q, ref_k = q, k
    if qk_norm:
        ref_q = q_norm(_heads(q, head_dim)).reshape(total, q_size)
        ref_k = k_norm(_heads(k, head_dim)).reshape(total, kv_size)
    ref_q, ref_k = rotary(positions, ref_q, ref_k)
    ref_cache = cache.clone()
    real = slots >= 0
    write_to_kv_cache(
        _heads(ref_k[:num_tokens][real], head_dim),
        _heads(v[:num_tokens][real], head_dim),
        ref_cache,
        slots[real],
    )

    dev_qkv, dev_cache = qkv.to(DEVICE, copy=True), cache.to(DEVICE, copy=True)
    dq, dk, dv = dev_qkv.split([q_size, kv_size, kv_size], dim=-1)
    fused_kernels.rope_norm_and_cache_(
        positions.to(DEVICE), dq, dk, dv,
        rotary.cos_cache.to(DEVICE), rotary.sin_cache.to(DEVICE),
        dev_cache, slots.to(DEVICE), num_tokens,
        q_norm_weight=q_norm.weight.data.to(DEVICE) if qk_norm else None,
        k_norm_weight=k_norm.weight.data.to(DEVICE) if qk_norm else None,
        eps=1e-6,
    )  # fmt: skip

    assert torch.equal(dev_qkv[:, q_size:].cpu(), qkv[:, q_size:]), "k and v are left as they were"
    changed = (dev_cache.cpu() != cache).flatten(3).any(-1)  # [2, blocks, block_size]
    assert changed.flatten(1).sum(-1).tolist() == [int(real.sum())] * 2, "only real slots written"
    got_k = dev_cache[0].flatten(0, 1)[slots[real].to(DEVICE)].cpu()
    got_v = dev_cache[1].flatten(0, 1)[slots[real].to(DEVICE)].cpu()
    assert torch.equal(got_v, _heads(v[:num_tokens][real], head_dim)), "V is stored as it was"
    exp_k = _heads(ref_k[:num_tokens][real], head_dim)
    got_q, exp_q = _heads(dq.cpu(), head_dim), _heads(ref_q, head_dim)
    max_ulps = _max_ulps(got_q, exp_q), _max_ulps(got_k, exp_k)
    if DEVICE == "cpu" and not qk_norm:
        assert max_ulps == (0, 0), "the interpreter runs the rotary's roundings as written"
    else:
        # NOTE: compiled on a GPU the casts between ops are not all kept (see test_fused).
        assert max(max_ulps) <= MAX_ULPS[dtype]


def test_prologue_rejects_one_norm_weight() -> None:
    qkv = torch.zeros(2, 3 * 64, device=DEVICE)
    q, k, v = qkv.split(64, dim=-1)
    rotary = get_rope(64, 16, ROPES["default"])
    cache = torch.zeros(2, 1, 16, 1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="together"):
        fused_kernels.rope_norm_and_cache_(
            torch.zeros(2, dtype=torch.int64, device=DEVICE), q, k, v,
            rotary.cos_cache.to(DEVICE), rotary.sin_cache.to(DEVICE), cache,
            torch.zeros(2, dtype=torch.int64, device=DEVICE), 2,
            q_norm_weight=torch.ones(64, device=DEVICE),
        )  # fmt: skip


def test_the_layer_fuses_its_prologue_only_where_it_may(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Attention` stores K/V itself (the fused prologue) only on a backend that reads K/V from
    the cache alone, with a rotary embedding the kernel supports, and with the switch on."""
    from pagedllm.attention.layer import Attention
    from pagedllm.attention.torch_ref import TorchRefBackend
    from pagedllm.attention.triton.backend import TritonBackend

    monkeypatch.setattr(fused, "enabled", lambda x, switch=None: switch is not False)
    rope = get_rope(64, 128, ROPES["default"])
    q = torch.zeros(2, 4 * 64)

    def fuses(backend, **kw) -> bool:
        layer = Attention(4, 64, 64**-0.5, 2, backend, **kw)
        return layer._fuses_prologue(q)

    assert fuses(TritonBackend, rotary_emb=rope)
    assert not fuses(TorchRefBackend, rotary_emb=rope)
    assert not fuses(TritonBackend)  # no rotary: nothing to fuse
    assert not fuses(TritonBackend, rotary_emb=rope, use_fused=False)
    with pytest.raises(ValueError, match="together"):
        Attention(4, 64, 64**-0.5, 2, TritonBackend, q_norm=RMSNorm(64))


# ----------------------------------------------------------------------------------------------
# End to end: the engine with the Triton backend, with and without the prologue
# ----------------------------------------------------------------------------------------------

PROMPT_LENS = [3, 21, 40]
MAX_TOKENS = [6, 3, 5]


@pytest.fixture(scope="module")
def prologue_models(tmp_path_factory, tiny_model_dirs) -> dict[str, str]:
    """Tiny Qwen3 (head_dim 32) and a tiny Llama with head_dim 32 (wider than the shared one's
    16), llama3 rope scaling, GQA 2."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.tiny_models import _BASE, make_tokenizer

    path = Path(tmp_path_factory.mktemp("prologue")) / "llama_hd32"
    config = AutoConfig.for_model(**{**_BASE, **ARCHS["llama"], "head_dim": 32})
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    make_tokenizer(path)
    return {"llama": str(path), "qwen3": tiny_model_dirs["qwen3"]}


def _greedy(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], list[float]]:
    """Greedy tokens, and the logprob of every generated token (flat)."""
    params = [
        SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=0) for m in MAX_TOKENS
    ]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [
        step[t].logprob
        for o in outs
        for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs or [], strict=True)
    ]
    return tokens, logprobs


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_engine_greedy_tokens_with_and_without_prologue(
    arch: str, prologue_models: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(11)
    prompts = [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in PROMPT_LENS]
    # One step mixes a prompt chunk with decode rows: both attention launches run.
    common = dict(dtype="float32", max_model_len=128, kv_cache_memory="8MiB", max_num_seqs=4,
                  max_num_batched_tokens=32)  # fmt: skip
    reference = _greedy(LLM(prologue_models[arch], attention_backend="torch", **common), prompts)

    calls = []
    original = fused_kernels.rope_norm_and_cache_

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs["q_norm_weight"] is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_kernels, "rope_norm_and_cache_", counting)
    # The fused kernels on CPU tensors.
    monkeypatch.setattr(fused, "enabled", lambda x, switch=None: True)
    # NOTE: the linears' GEMV kernels (tested in test_gemv) stay off: this test is the prologue's.
    monkeypatch.setattr(fused, "gemv_enabled", lambda: False, raising=False)
    llm = LLM(prologue_models[arch], attention_backend="triton", **common)
    with_prologue = _greedy(llm, prompts)
    assert calls and all(calls) == (arch == "qwen3"), "the prologue ran (with the q/k norm)"

    calls.clear()
    monkeypatch.setattr(TritonAttention, "accepts_prewritten_kv", False)
    without = _greedy(LLM(prologue_models[arch], attention_backend="triton", **common), prompts)
    assert not calls, "the unfused path: norms, rotary, then the backend's cache write"
    assert with_prologue[0] == without[0] == reference[0]
    # fp32: the prologue is bit-equal to the unfused ops, or a few ulps off with the q/k norm.
    torch.testing.assert_close(with_prologue[1], without[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(with_prologue[1], reference[1], rtol=0, atol=1e-4)
