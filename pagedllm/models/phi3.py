"""Phi-3 (`Phi3ForCausalLM`: Phi-3, Phi-3.5-mini, Phi-4-mini): the Llama decoder with changes
that live in the checkpoint and the config rather than in the layer.

What differs from Llama:
- the checkpoint stores q/k/v already fused as `self_attn.qkv_proj` (rows `[q; k; v]`) and
  gate/up as `mlp.gate_up_proj` (rows `[gate; up]`): they are our fused parameters' names, and
  those layers' weight loaders split a fused tensor by part (and by tensor-parallel rank);
- no biases anywhere;
- the long-context checkpoints scale RoPE with LongRoPE (`rope_type` "longrope": `short_factor`
  and `long_factor` lists, `original_max_position_embeddings`): `LongRopeRotaryEmbedding` in
  `layers/rotary.py`, short or long per sequence and step by the sequence's length, as
  transformers decides, with the attention factor (mscale) on cos/sin in both regimes;
- `partial_rotary_factor` (Phi-4-mini) rotates the first part of each head only;
- `sliding_window`, when the config sets one, applies in every layer (as HF's Phi-3 mask).

Head sizes need not be powers of two (Phi-3-mini's is 96). The fused Triton path (the attention
prologue: rotary, cache write) serves LongRoPE too: it reads the cos/sin rows the model maps the
positions to; partial rotary takes the eager rotation.

Where the engine's greedy tokens can differ from HF `generate` with LongRoPE (both regimes match
token for token otherwise, tests/models/test_phi3_olmo2.py):
- a sequence that crosses the original length while decoding: HF's Phi-3 `generate` drops its
  KV cache in that step and recomputes the whole sequence with the long factors; the engine
  keeps the keys and values computed with the short ones and continues from them;
- a prompt longer than the original length prefilled in chunks, or after a prefix-cache hit on
  blocks computed for a shorter sequence: the regime is decided per step (the earlier chunks or
  blocks short), where HF's one forward over the prompt is long throughout.
Matching those needs the scheduler: recompute a request in the step its length first exceeds
the original one, decide by the request's whole length, and keep the regime in the prefix-cache
block hashes.
"""

from __future__ import annotations

from typing import Any

from pagedllm.models.llama import LlamaFlags, LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama without biases, loading the fused `qkv_proj` / `gate_up_proj` checkpoint tensors."""

    @classmethod
    def arch_flags(cls, hf_config: Any) -> LlamaFlags:
        return LlamaFlags()
