"""The shared check of a model file: greedy tokens through `LLM` equal HF transformers' greedy
`generate`, token for token (fp32, CPU), under every scheduling regime the engine has.

`save_hf_model(config, path)` builds a tiny random HF model from a config and writes it;
`assert_greedy_matches_hf(path)` then checks, on the same prompts:
- the plain run (every prompt whole in one step);
- chunked prefill (`max_num_batched_tokens=16`), run twice: the second pass is served from the
  prefix cache (hits asserted);
- a KV cache too small for the batch (preemption asserted).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from pagedllm import LLM, SamplingParams
from tests.tiny_models import hf_greedy, load_hf

# (prompt length, new tokens): a one-token prompt, several block boundaries, a one-token output.
GENERATIONS = [(1, 24), (5, 30), (17, 12), (40, 1), (64, 20), (100, 16)]


def save_hf_model(config: Any, path: Path, seed: int = 0) -> Path:
    """A random-weight fp32 model of `config` (a transformers config) saved at `path`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # NOTE: some HF inits leave small or zero weights (norms at 0, biases at 0); perturb every
    # parameter so each one matters to the output.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(path)
    return path


def _generate(llm: LLM, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def assert_greedy_matches_hf(
    path: Path | str,
    *,
    generations: list[tuple[int, int]] = GENERATIONS,
    seed: int = 5,
    regimes: tuple[str, ...] = ("plain", "chunked", "preempted"),
    **llm_kwargs: Any,
) -> None:
    """Greedy tokens of `LLM` equal HF `generate` in each of `regimes` (see the module doc)."""
    hf = load_hf(Path(path))
    vocab = hf.config.get_text_config().vocab_size
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n, _ in generations]
    max_tokens = [m for _, m in generations]
    expected = hf_greedy(hf, prompts, max_tokens)
    longest = max(n + m for n, m in generations)
    max_model_len = 16 * -(-longest // 16)
    common: dict[str, Any] = dict(
        dtype="float32", max_model_len=max_model_len, skip_tokenizer_init=True
    )
    common.update(llm_kwargs)

    if "plain" in regimes:
        llm = LLM(str(path), kv_cache_memory="64MiB", max_num_batched_tokens=1024, **common)
        assert _generate(llm, prompts, max_tokens) == expected, "plain"
        del llm
    if "chunked" in regimes:
        llm = LLM(
            str(path), kv_cache_memory="64MiB", max_num_batched_tokens=16, max_num_seqs=8, **common
        )
        assert _generate(llm, prompts, max_tokens) == expected, "chunked prefill"
        assert _generate(llm, prompts, max_tokens) == expected, "second pass, prefix cache hits"
        assert llm.llm_engine.prefix_cache_stats.hits > 0
        del llm
    if "preempted" in regimes:
        # Just enough blocks for the longest sequence: the batch cannot fit at once.
        blocks = max_model_len // 16 + 1
        llm = LLM(str(path), num_gpu_blocks_override=blocks, **common)
        assert _generate(llm, prompts, max_tokens) == expected, "with preemption"
        assert llm.llm_engine.get_stats().num_preemptions > 0
        del llm
