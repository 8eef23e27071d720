"""`MLAAttention` (absorbed latent attention over the paged latent cache) against the expanded
multi-head computation HF transformers runs, written out here on random tensors:

- each request's keys `[k_nope | k_pe]` and values expanded per head by `kv_b_proj` from the
  latents, RoPE applied by HF's own functions (V2's complex product, V3's interleaved and
  rotate-half forms), causal softmax attention in float64;
- requests in two steps: a first chunk, then a mixed step of prompt chunks after cached context
  and decode rows (shuffled block ids), so later rows read latents an earlier step wrote;
- the profiling pass (no metadata: the batch as one causal sequence, nothing cached);
- `MLASpec` (one latent row per token, no separate V) and the backend's cache shape.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from pagedllm.attention.mla import MLAAttention, MLATorchBackend, latent_attention
from pagedllm.attention.utils import build_metadata
from pagedllm.engine.kv_cache_spec import KVCacheSpec, MLASpec, block_bytes
from pagedllm.forward_context import set_forward_context
from pagedllm.layers.rotary import get_rope

HEADS, NOPE, ROPE, V_DIM, RANK = 3, 10, 6, 7, 13
BLOCK = 16
THETA = 10000.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_layer(interleaved: bool, scale: float = 0.37) -> MLAAttention:
    kv_b = nn.Linear(RANK, HEADS * (NOPE + V_DIM), bias=False)
    nn.init.normal_(kv_b.weight, std=0.4)
    rope = get_rope(ROPE, 512, {"rope_type": "default", "rope_theta": THETA})
    layer = MLAAttention(
        HEADS, NOPE, ROPE, V_DIM, RANK, scale, kv_b, rope, rope_interleaved=interleaved
    )
    layer._keep = (kv_b, rope)  # type: ignore[attr-defined]  # NOTE: the model owns these
    return layer


def hf_rotate(mode: str, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor):
    """q [1, H, S, R], k [1, 1, S, R] rotated as HF's DeepSeek modules rotate them."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3

    inv_freq = 1.0 / (THETA ** (torch.arange(0, ROPE, 2).float() / ROPE))
    freqs = pos[None, :, None].float() * inv_freq  # [1, S, R / 2]
    if mode == "v2":
        return v2.apply_rotary_emb(q, k, torch.polar(torch.ones_like(freqs), freqs))
    emb = torch.cat([freqs, freqs], dim=-1)
    fn = v3.apply_rotary_pos_emb_interleave if mode == "v3" else v3.apply_rotary_pos_emb
    return fn(q, k, emb.cos(), emb.sin())


def expanded_reference(
    layer: MLAAttention, mode: str, q: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor
) -> torch.Tensor:
    """One sequence as HF computes it: `[S, H * V]` (float64 attention)."""
    seq = q.shape[0]
    q = q.view(seq, HEADS, NOPE + ROPE).transpose(0, 1)[None]  # [1, H, S, Dqk]
    q_nope, q_pe = q.split([NOPE, ROPE], dim=-1)
    q_pe, k_rot = hf_rotate(mode, q_pe, k_pe.view(1, 1, seq, ROPE), torch.arange(seq))
    kv = layer._kv_b_proj[0](kv_c).view(seq, HEADS, NOPE + V_DIM).transpose(0, 1)[None]
    k_nope, value = kv.split([NOPE, V_DIM], dim=-1)
    key = torch.cat([k_nope, k_rot.expand(-1, HEADS, -1, -1)], dim=-1)
    query = torch.cat([q_nope, q_pe], dim=-1)
    scores = (query.double() @ key.double().transpose(-1, -2)) * layer.scale
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = probs @ value.double()  # [1, H, S, V]
    return out[0].transpose(0, 1).reshape(seq, HEADS * V_DIM).float()


# (tokens of step 1, tokens of step 2) per request: whole prompts, chunks after context, decodes.
STEPS = [(1, 1), (17, 1), (40, 9), (5, 0), (0, 23), (33, 1), (16, 16)]


@pytest.mark.parametrize("mode", ["v2", "v3", "v3_rotate_half"])
def test_absorbed_equals_expanded_attention(mode: str) -> None:
    torch.manual_seed(0)
    layer = make_layer(interleaved=mode != "v3_rotate_half")
    lens = [a + b for a, b in STEPS]
    seqs = [
        (torch.randn(n, HEADS * (NOPE + ROPE)), torch.randn(n, RANK), torch.randn(n, ROPE))
        for n in lens
    ]
    total_blocks = sum(-(-n // BLOCK) for n in lens) + 3
    ids = list(range(total_blocks))
    random.Random(1).shuffle(ids)
    tables, at = [], 0
    for n in lens:
        tables.append(ids[at : at + -(-n // BLOCK)])
        at += len(tables[-1])
    spec = layer.kv_cache_spec(BLOCK, "float32")
    layer.kv_cache = torch.zeros(MLATorchBackend.kv_cache_shape(total_blocks, spec))
    outputs: list[list[torch.Tensor]] = [[] for _ in lens]
    done = [0] * len(lens)
    for step in (0, 1):
        reqs = [i for i, s in enumerate(STEPS) if s[step] > 0]
        rows = [(i, done[i], done[i] + STEPS[i][step]) for i in reqs]
        md = build_metadata(
            [hi - lo for _, lo, hi in rows], [hi for _, _, hi in rows],
            [tables[i] for i in reqs], BLOCK, "cpu",
        )  # fmt: skip
        q, kv_c, k_pe = (torch.cat([seqs[i][j][lo:hi] for i, lo, hi in rows]) for j in range(3))
        positions = torch.cat([torch.arange(lo, hi) for _, lo, hi in rows])
        with set_forward_context(md), torch.no_grad():
            out = layer(q, kv_c, k_pe, positions)
        at = 0
        for i, lo, hi in rows:
            outputs[i].append(out[at : at + hi - lo])
            at += hi - lo
            done[i] = hi
    with torch.no_grad():
        for i, (q, kv_c, k_pe) in enumerate(seqs):
            want = expanded_reference(layer, mode, q, kv_c, k_pe)
            torch.testing.assert_close(torch.cat(outputs[i]), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["v2", "v3_rotate_half"])
def test_profiling_pass_is_one_causal_sequence(mode: str) -> None:
    """Without metadata the batch is one sequence and nothing is written to the cache."""
    torch.manual_seed(1)
    layer = make_layer(interleaved=mode == "v2")
    seq = 45
    q, kv_c, k_pe = (
        torch.randn(seq, HEADS * (NOPE + ROPE)),
        torch.randn(seq, RANK),
        torch.randn(seq, ROPE),
    )
    with set_forward_context(None), torch.no_grad():
        got = layer(q, kv_c, k_pe, torch.arange(seq))
        want = expanded_reference(layer, mode, q, kv_c, k_pe)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_latent_attention_masks_keys() -> None:
    """A masked latent gets no weight, and the value is the latents' first dimensions."""
    torch.manual_seed(2)
    q, lat = torch.randn(2, 4, 9), torch.randn(2, 6, 9)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    got = latent_attention(q, lat, mask[:, None, :], 5, 0.5)
    probs = (q @ lat.transpose(1, 2) * 0.5).masked_fill(~mask[:, None, :], float("-inf"))
    torch.testing.assert_close(got, probs.softmax(-1) @ lat[..., :5])


def test_mla_spec_counts_one_latent_row_per_token() -> None:
    layer = make_layer(interleaved=True)
    spec = layer.kv_cache_spec(BLOCK, "bfloat16")
    assert isinstance(spec, MLASpec) and spec.qk_rope_head_dim == ROPE
    assert spec.page_size_bytes == BLOCK * (RANK + ROPE) * 2
    # Half what a K-and-V spec of one head of that width would take.
    assert (
        2 * spec.page_size_bytes == KVCacheSpec(BLOCK, 1, RANK + ROPE, "bfloat16").page_size_bytes
    )
    assert block_bytes({"a": spec, "b": spec}) == 2 * spec.page_size_bytes
    assert layer.backend.kv_cache_shape(7, spec) == (7, BLOCK, RANK + ROPE)
    with pytest.raises(ValueError, match="one latent head"):
        MLASpec(BLOCK, 2, RANK + ROPE, "float32", RANK)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        MLASpec(BLOCK, 1, RANK, "float32", RANK)
    assert not MLATorchBackend.get_impl_cls().cuda_graph_safe  # the Triton decode's is
