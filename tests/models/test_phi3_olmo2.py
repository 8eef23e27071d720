"""Phi-3 and OLMo 2 against HF transformers, on tiny random checkpoints built here (not in
`tests/tiny_models.py`'s ARCHS, which every test session builds and runs end to end).

- Phi-3: LongRoPE with a small `original_max_position_embeddings` (64), so sequences run in
  both regimes; head sizes 24 and 48 (not powers of two); partial rotary; the checkpoint's fused
  `qkv_proj` / `gate_up_proj`; a sliding window. OLMo 2: q/k norms over the whole projection,
  post-attention and post-feedforward norms, no input norm; with tensor parallelism too.
- Logits of one forward (fp32, 1e-4); the paged path fed step by step and with requests of both
  regimes in one step; greedy `LLM.generate` token for token against HF `generate` (on the CPU
  with the torch reference backend; with the Triton backend and fused kernels, under Triton's
  interpreter without a GPU; on a GPU with CUDA graphs); LongRoPE's inverse frequencies,
  attention factor and cos/sin against transformers' own.
"""

# ruff: noqa: E402 (the environment is read before triton's first import, below)
from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.triton_interpreter import force_fused_kernels, interpret_without_cuda

# NOTE: before triton is first imported (the transformers model modules import it).
_TRITON_TOO_EARLY = interpret_without_cuda()

import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import DynamicCache, Olmo2Config, Phi3Config, PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from pagedllm import LLM, SamplingParams
from pagedllm.attention.backend import get_attention_backend, kv_cache_shape
from pagedllm.attention.layer import Attention
from pagedllm.attention.utils import build_metadata
from pagedllm.forward_context import set_forward_context
from pagedllm.layers.rotary import (
    LongRopeRotaryEmbedding,
    compute_inv_freq,
    get_rope,
    get_rope_parameters,
)
from pagedllm.loader import load_model
from pagedllm.models.registry import resolve_model_cls
from tests.models.test_llama import (
    ATOL,
    _hf_logits,
    _hf_model,
    _load,
    _model_config,
    _our_logits,
    _paged_logits,
    _random_ids,
    _save,
)
from tests.tiny_models import VOCAB_SIZE, hf_greedy, load_hf

ORIGINAL = 64  # LongRoPE's original_max_position_embeddings
MAX_POSITION = 256
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _longrope_factors(n: int, seed: int) -> tuple[list[float], list[float]]:
    """Short factors near 1 and long ones growing to ~30 towards low frequencies (Phi-3-128k's
    shape), so that the two regimes rotate very differently."""
    rng = random.Random(seed)
    short = [round(1.0 + 0.2 * rng.random(), 4) for _ in range(n)]
    long = [round(1.0 + 30.0 * (i / (n - 1)) ** 2 + rng.random(), 4) for i in range(n)]
    return short, long


def _phi3(
    hidden_size: int = 96,
    heads: int = 4,
    kv_heads: int = 2,
    *,
    longrope: bool = True,
    partial_rotary_factor: float = 1.0,
    max_position: int = MAX_POSITION,
    **kw: Any,
) -> Phi3Config:
    rotary_dim = int(hidden_size // heads * partial_rotary_factor)
    rope: dict[str, Any] = dict(
        rope_type="default", rope_theta=10000.0, partial_rotary_factor=partial_rotary_factor
    )
    if longrope:
        short, long = _longrope_factors(rotary_dim // 2, seed=rotary_dim)
        rope.update(rope_type="longrope", short_factor=short, long_factor=long)
    return Phi3Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position,
        # NOTE: Phi-3 keeps this at the top level, where it wins over the rope dict's.
        original_max_position_embeddings=ORIGINAL,
        rope_parameters=rope,
        rms_norm_eps=1e-5,
        **_TOKENS,
        **kw,
    )


def _olmo2(**kw: Any) -> Olmo2Config:
    fields: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITION,
        rms_norm_eps=1e-6,
        **_TOKENS,
    )
    return Olmo2Config(**(fields | kw))


CASES = {
    # head_dim 24: halves of 12, neither a power of two
    "phi3-longrope-hd24": lambda: _phi3(),
    # head_dim 48, half of it rotating (24), one KV head, tied embeddings, a sliding window
    "phi3-longrope-hd48-partial": lambda: _phi3(
        96, 2, 1, partial_rotary_factor=0.5, tie_word_embeddings=True, sliding_window=40
    ),
    "phi3-default-rope": lambda: _phi3(64, 4, 2, longrope=False, tie_word_embeddings=False),
    "olmo2": lambda: _olmo2(rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
    "olmo2-bias-tied-linear-rope": lambda: _olmo2(
        attention_bias=True,
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    ),
}
LONGROPE_CASES = ["phi3-longrope-hd24", "phi3-longrope-hd48-partial"]


def _is_longrope(config: PretrainedConfig) -> bool:
    return config.rope_parameters["rope_type"] == "longrope"


# ---------------------------------------------------------------------------------------------
# One forward: logits against HF
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(case: str, tmp_path: Path) -> None:
    """One forward, without attention metadata (the batch is one causal sequence; it knows no
    sliding window) and through the paged reference backend as one prefill."""
    hf = _hf_model(CASES[case]())
    ours = _load(_save(hf, tmp_path))
    assert isinstance(ours.model.rotary_emb, LongRopeRotaryEmbedding) == _is_longrope(hf.config)
    windowed = getattr(hf.config, "sliding_window", None) is not None
    # (seed, first position, length): HF picks LongRoPE's regime by max(position_ids) + 1, short
    # up to 64 and long from 65 on.
    for seed, start, n in ((1, 0, 23), (2, 37, 23), (3, 0, ORIGINAL), (4, 0, ORIGINAL + 1),
                           (5, 20, 150), (6, 0, 150)):  # fmt: skip
        ids = _random_ids(VOCAB_SIZE, n, seed)
        positions = torch.arange(start, start + n)
        expected = _hf_logits(hf, ids, positions)
        assert expected.abs().max() > 1.0  # the comparison is not between near-zero logits
        if not windowed:
            actual = _our_logits(ours, ids, positions)
            torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
        if start == 0:
            paged = _paged_logits(ours, ids, [n])
            torch.testing.assert_close(paged, expected, atol=ATOL, rtol=0)


def test_phi3_loads_the_fused_checkpoint_tensors(tmp_path: Path) -> None:
    from safetensors import safe_open

    hf = _hf_model(CASES["phi3-longrope-hd24"]())
    _save(hf, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any(".q_proj." in n or ".gate_proj." in n for n in names)
    ours = _load(tmp_path)
    qkv = ours.model.layers[0].self_attn.qkv_proj.weight
    torch.testing.assert_close(qkv, hf.model.layers[0].self_attn.qkv_proj.weight, atol=0, rtol=0)
    assert not any(name.endswith(".bias") for name, _ in ours.named_parameters())
    assert {m.head_dim for m in ours.modules() if isinstance(m, Attention)} == {24}


def test_olmo2_structure(tmp_path: Path) -> None:
    ours = _load(_save(_hf_model(CASES["olmo2"]()), tmp_path))
    params = dict(ours.named_parameters())
    assert params["model.layers.0.self_attn.q_norm.weight"].shape == (4 * 16,)  # all heads
    assert params["model.layers.0.self_attn.k_norm.weight"].shape == (2 * 16,)
    assert "model.layers.1.post_feedforward_layernorm.weight" in params
    assert not any("input_layernorm" in name for name in params)
    # The whole-projection norms run before `Attention`, which has no per-head ones.
    for layer in ours.model.layers:
        assert layer.self_attn.attn._prologue[1:] == (None, None)


# ---------------------------------------------------------------------------------------------
# The paged path: LongRoPE's regime per sequence and per step
# ---------------------------------------------------------------------------------------------


def _alloc_kv(model: torch.nn.Module, num_blocks: int, block_size: int) -> None:
    for layer in model.modules():
        if isinstance(layer, Attention):
            shape = kv_cache_shape(num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
            layer.kv_cache = torch.zeros(shape)


@torch.no_grad()
def _hf_stepwise_logits(hf: torch.nn.Module, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """HF's model fed `chunks` of `ids` one forward at a time over its KV cache: each forward
    picks LongRoPE's regime by its own length, and cached keys keep the rotation they got."""
    cache, out, done = DynamicCache(config=hf.config), [], 0
    for n in chunks:
        positions = torch.arange(done, done + n)[None]
        step = hf(input_ids=ids[None, done : done + n], position_ids=positions,
                  cache=cache, use_cache=True)  # fmt: skip
        out.append(step.logits[0])
        done += n
    return torch.cat(out)


@pytest.mark.parametrize("case", LONGROPE_CASES)
def test_paged_steps_switch_regime_as_hf_forward_does(case: str, tmp_path: Path) -> None:
    """Prefill of 40, chunks to 60 and 64 (short), then steps past 64 (long, over short keys).

    NOTE: this is HF's *model* over its cache; HF `generate` for Phi-3 instead recomputes the
    whole sequence in the step that crosses the original length (see the module docstring of
    `pagedllm/models/phi3.py`), which the engine does not."""
    hf = _hf_model(CASES[case]())
    ours = _load(_save(hf, tmp_path))
    ids = _random_ids(VOCAB_SIZE, 80, 11)
    chunks = [40, 20, 4, 1, 1, 14]
    expected = _hf_stepwise_logits(hf, ids, chunks)
    actual = _paged_logits(ours, ids, chunks)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", LONGROPE_CASES)
def test_short_and_long_requests_in_one_step(case: str, tmp_path: Path) -> None:
    """A short and a long prompt prefilled in one step, then decoded together: each request
    rotates by its own length (a batch-wide choice would fail one of them)."""
    hf = _hf_model(CASES[case]())
    ours = _load(_save(hf, tmp_path))
    lens = [30, 90]
    prompts = [_random_ids(VOCAB_SIZE, n + 1, 20 + n) for n in lens]
    block_size = 8
    per_req = -(-(max(lens) + 1) // block_size)
    _alloc_kv(ours, 2 * per_req, block_size)
    tables = [list(range(per_req)), list(range(per_req, 2 * per_req))[::-1]]
    with torch.no_grad():
        meta = build_metadata(lens, lens, tables, block_size, "cpu")
        ids = torch.cat([p[:n] for p, n in zip(prompts, lens)])
        positions = torch.cat([torch.arange(n) for n in lens])
        with set_forward_context(meta):
            prefill = ours.compute_logits(ours(ids, positions))
        meta = build_metadata([1, 1], [n + 1 for n in lens], tables, block_size, "cpu")
        with set_forward_context(meta):
            decode = ours.compute_logits(
                ours(torch.stack([p[n] for p, n in zip(prompts, lens)]), torch.tensor(lens))
            )
    ends = torch.tensor(lens).cumsum(0) - 1
    for i, (prompt, n) in enumerate(zip(prompts, lens)):
        expected = _hf_logits(hf, prompt, torch.arange(n + 1))
        torch.testing.assert_close(prefill[ends[i]], expected[n - 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(decode[i], expected[n], atol=ATOL, rtol=0)


def test_longrope_cache_rows_per_request() -> None:
    """Rows are positions, moved by `original` for the tokens of requests whose context at the
    end of the step exceeds it; padding rows past the metadata's tokens stay in range."""
    rope = get_rope(24, MAX_POSITION, get_rope_parameters(_phi3()))
    assert isinstance(rope, LongRopeRotaryEmbedding)
    assert rope.cos_cache.shape == (ORIGINAL + MAX_POSITION, 12)
    # Requests: 3 tokens ending at context 64 (short), 2 ending at 66 (long), 1 decode at 65.
    meta = build_metadata([3, 2, 1], [64, 66, 65], [[0] * 9] * 3, 8, "cpu")
    positions = torch.tensor([61, 62, 63, 64, 65, 64, 0, 0])  # two padding rows
    with set_forward_context(meta):
        rows = rope.cache_rows(positions)
    assert rows.tolist() == [61, 62, 63, 128, 129, 128, 64, 64]
    with set_forward_context(None):  # the profiling pass: one sequence of context 64
        assert rope.cache_rows(torch.arange(ORIGINAL)).tolist() == list(range(ORIGINAL))


# ---------------------------------------------------------------------------------------------
# LongRoPE against transformers' rope functions and rotary module
# ---------------------------------------------------------------------------------------------


_MSCALE_4 = math.sqrt(1 + math.log(MAX_POSITION / ORIGINAL) / math.log(ORIGINAL))


@pytest.mark.parametrize(
    ("extra", "max_position", "mscale"),
    [
        ({}, MAX_POSITION, _MSCALE_4),  # factor = max_position / original = 4
        ({"attention_factor": 1.3}, MAX_POSITION, 1.3),
        ({"factor": 2.0}, MAX_POSITION, math.sqrt(1 + math.log(2) / math.log(ORIGINAL))),
        ({}, ORIGINAL, 1.0),  # no extension: factor 1
    ],
    ids=["default-mscale", "attention-factor", "explicit-factor", "no-extension"],
)
def test_longrope_inv_freq_and_mscale_match_hf(
    extra: dict[str, Any], max_position: int, mscale: float
) -> None:
    config = _phi3(max_position=max_position)
    config.rope_parameters.update(extra)
    params = get_rope_parameters(config)
    init = ROPE_INIT_FUNCTIONS["longrope"]
    short, long = params["short_factor"], params["long_factor"]
    for seq_len, factors in ((None, short), (ORIGINAL, short), (ORIGINAL + 1, long)):
        expected, expected_mscale = init(config, "cpu", seq_len=seq_len)
        actual, actual_mscale = compute_inv_freq(24, params, seq_len=seq_len)
        torch.testing.assert_close(actual, expected, atol=0, rtol=0)
        plain, _ = compute_inv_freq(24, {"rope_type": "default", "rope_theta": 10000.0})
        torch.testing.assert_close(actual, plain / torch.tensor(factors), atol=0, rtol=1e-6)
        assert actual_mscale == pytest.approx(expected_mscale, rel=1e-12)
        assert actual_mscale == pytest.approx(mscale, rel=1e-12)


@pytest.mark.parametrize("case", LONGROPE_CASES)
def test_longrope_cos_sin_match_hf_rotary_module(case: str) -> None:
    """Our cos/sin rows against `Phi3RotaryEmbedding` (which switches its frequencies by the
    forward's `max(position_ids) + 1`), for sequences ending at and past the original length."""
    config = CASES[case]()
    head_dim = config.hidden_size // config.num_attention_heads
    rope = get_rope(head_dim, MAX_POSITION, get_rope_parameters(config))
    hf_rope = Phi3RotaryEmbedding(config)
    half = rope.rotary_dim // 2
    x = torch.zeros(1, dtype=torch.float32)
    cos_short = None
    for positions in (torch.arange(ORIGINAL), torch.tensor([0, 7, 63, 64]), torch.arange(200),
                      torch.tensor([3, MAX_POSITION - 1])):  # fmt: skip
        cos_ref, sin_ref = hf_rope(x, positions[None])
        context = torch.full_like(positions, int(positions.max()) + 1)
        rows = rope.cache_rows(positions, context)
        cos, sin = rope.cos_cache[rows], rope.sin_cache[rows]
        torch.testing.assert_close(torch.cat([cos, cos], -1), cos_ref[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.cat([sin, sin], -1), sin_ref[0], atol=1e-6, rtol=0)
        if len(positions) == ORIGINAL:
            cos_short = cos
        assert cos.shape == (len(positions), half)
    # The two regimes differ (so the comparisons above tell them apart).
    cos_long = rope.cos_cache[rope.cache_rows(torch.arange(ORIGINAL), torch.full((64,), 65))]
    assert cos_short is not None and (cos_short - cos_long).abs().max() > 0.1


def test_rope_parameters_longrope_transformers4_style() -> None:
    """A transformers-4 config (`rope_scaling`, `original_max_position_embeddings` at the top
    level) reads as transformers 5's standardized one."""
    v5 = _phi3()
    short, long = v5.rope_parameters["short_factor"], v5.rope_parameters["long_factor"]
    v4 = SimpleNamespace(
        rope_theta=10000.0,
        rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long},
        max_position_embeddings=MAX_POSITION,
        original_max_position_embeddings=ORIGINAL,
    )
    p4, p5 = get_rope_parameters(v4), get_rope_parameters(v5)
    assert p4["original_max_position_embeddings"] == p5["original_max_position_embeddings"] == 64
    assert p4["factor"] == p5["factor"] == MAX_POSITION / ORIGINAL
    for seq_len in (None, 100):
        freq4, mscale4 = compute_inv_freq(24, p4, seq_len=seq_len)
        freq5, mscale5 = compute_inv_freq(24, p5, seq_len=seq_len)
        assert torch.equal(freq4, freq5) and mscale4 == mscale5
    with pytest.raises(ValueError, match="short_factor has 12 entries"):
        compute_inv_freq(48, p5)


# ---------------------------------------------------------------------------------------------
# End to end: greedy LLM.generate against HF generate
# ---------------------------------------------------------------------------------------------

# (prompt length, new tokens). With LongRoPE (original 64), the first five never run a step past
# 64 tokens of context ((5, 60) ends at 64, (64, 1) prefills 64): short factors throughout; the
# last three start past it: long factors throughout. A sequence crossing 64 while decoding is
# left out: HF `generate` recomputes it then (see `pagedllm/models/phi3.py`).
GENERATIONS = [(1, 40), (5, 60), (30, 20), (50, 14), (64, 1), (65, 20), (100, 30), (180, 40)]


def _greedy_matches_hf_generate(
    case: str, tmp_path: Path, generations: list[tuple[int, int]] = GENERATIONS, **llm_kwargs: Any
) -> LLM:
    path = _save(_hf_model(CASES[case]()), tmp_path)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n, _ in generations]
    max_tokens = [m for _, m in generations]
    expected = hf_greedy(load_hf(path), prompts, max_tokens)

    # One step can hold every prompt whole: no prompt is chunked.
    llm = LLM(str(path), dtype="float32", max_model_len=MAX_POSITION, max_num_batched_tokens=1024,
              skip_tokenizer_init=True, **llm_kwargs)  # fmt: skip
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    return llm


GENERATE_CASES = [
    "phi3-longrope-hd24",
    "phi3-longrope-hd48-partial",
    "olmo2",
    "olmo2-bias-tied-linear-rope",
]


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_greedy_matches_hf_generate(case: str, tmp_path: Path) -> None:
    _greedy_matches_hf_generate(case, tmp_path, kv_cache_memory="64MiB")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", GENERATE_CASES)
def test_greedy_matches_hf_generate_on_gpu(case: str, tmp_path: Path) -> None:
    """On CUDA: the fused Triton kernels (the attention prologue reads LongRoPE's cache rows,
    the whole-projection q/k norms run on strided views), CUDA graphs for the decode steps."""
    llm = _greedy_matches_hf_generate(case, tmp_path, kv_cache_memory="256MiB")
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    assert runner.cuda_graphs is not None and runner.cuda_graphs.num_replays > 0
    rope = runner.model.model.rotary_emb
    # Partial rotary takes the eager rotation; whole heads the fused prologue.
    assert rope.fused_ok == (rope.rotary_dim == rope.head_dim)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["phi3-longrope-hd24", "olmo2"])
def test_triton_kernels_greedy_match_hf_generate(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Triton attention backend and the fused kernels (without a GPU, under Triton's
    interpreter): the fused prologue rotates by LongRoPE's cache rows (halves of 12: masked
    tiles) and writes the cache; OLMo 2's whole-projection norms run the fused RMSNorm on
    strided views of the qkv projection."""
    force_fused_kernels(monkeypatch, _TRITON_TOO_EARLY)
    from pagedllm.layers import fused_kernels

    calls: list[int] = []
    original = fused_kernels.rope_norm_and_cache_

    def counting(*args: Any, **kwargs: Any) -> None:
        calls.append(int(args[0].max()))  # the largest cache row the step rotates by
        original(*args, **kwargs)

    monkeypatch.setattr(fused_kernels, "rope_norm_and_cache_", counting)
    # Both LongRoPE regimes, short prompts and few tokens: the interpreter is slow.
    generations = [(5, 6), (40, 4), (64, 1), (70, 4)]
    _greedy_matches_hf_generate(case, tmp_path, generations, attention_backend="triton",
                                kv_cache_memory="8MiB", max_num_seqs=4)  # fmt: skip
    assert calls, "the fused prologue ran"
    if case.startswith("phi3"):  # long rows (original + position) were read
        assert max(calls) >= ORIGINAL + 70 - 1


# ---------------------------------------------------------------------------------------------
# OLMo 2 with tensor parallelism (CPU, two gloo ranks)
# ---------------------------------------------------------------------------------------------

WORLD_SIZE = 2


def _tp_rank_main(
    rank: int, init_file: str, hf_config: Any, ckpt: str, ids: torch.Tensor, out_dir: str
) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        torch.set_num_threads(1)
        model_config = _model_config(ckpt, hf_config)
        model = load_model(model_config, "cpu", get_attention_backend("torch", "cpu"))
        attn = model.model.layers[0].self_attn
        assert attn.q_norm.weight.shape == (2 * 16,) and attn.k_norm.weight.shape == (16,)
        with torch.no_grad(), set_forward_context(None):
            logits = model.compute_logits(model(ids, torch.arange(len(ids))))
        torch.save(logits, Path(out_dir) / f"logits{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_olmo2_tp2_logits_match_hf(tmp_path: Path) -> None:
    """Heads split over two ranks, the one KV head replicated on both: the whole-projection
    norms reduce their mean square across ranks and load their slice of the weight."""
    hf = _hf_model(_olmo2(num_key_value_heads=1, attention_bias=True))
    ckpt = _save(hf, tmp_path / "ckpt")
    ids = _random_ids(VOCAB_SIZE, 19, 8)
    expected = _hf_logits(hf, ids, torch.arange(len(ids)))
    plain_config = SimpleNamespace(**hf.config.to_dict())
    assert resolve_model_cls(plain_config.architectures).__name__ == "Olmo2ForCausalLM"
    args = (str(tmp_path / "init"), plain_config, str(ckpt), ids, str(tmp_path))
    mp.spawn(_tp_rank_main, args=args, nprocs=WORLD_SIZE, join=True)
    for rank in range(WORLD_SIZE):
        actual = torch.load(tmp_path / f"logits{rank}.pt")
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
