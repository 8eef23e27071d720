"""Seeded sampling through the whole engine on the sampler's kernel path (the kernel itself:
tests/worker/sample/test_kernels.py; the torch path's: test_engine_sampling.py).

Without a GPU the kernel runs on CPU tensors under Triton's interpreter.
"""

from __future__ import annotations

import pytest

from tests.triton_interpreter import kernel_test_device

DEVICE = kernel_test_device()  # NOTE: before triton is first imported

from pagedllm import SamplingParams  # noqa: E402
from pagedllm.worker.sample import Sampler  # noqa: E402
from tests.triton_interpreter import patch_interpreter  # noqa: E402

if DEVICE == "cpu":
    patch_interpreter()


def kernel_llm(path: str, **kw):
    """An engine whose sampler takes the kernel path (under the interpreter on the CPU)."""
    from pagedllm import LLM

    llm = LLM(path, dtype="float32", **kw)
    set_path(llm, use_kernel=True)
    return llm


def set_path(llm, use_kernel: bool) -> None:
    """A fresh sampler (and so a fresh RNG owner) of the given path, before any request."""
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    seed = runner.config.model_config.seed
    runner.sampler = Sampler(use_kernel, seed=seed, device=runner.device)


@pytest.mark.slow
def test_engine_seeded_draws_through_the_kernel(llama_dir) -> None:
    """Seeded requests give the same ids alone, in a batch of other parameters (top-k rows take
    the filter path, greedy and unseeded rows beside them), with async scheduling, and when
    preempted and recomputed; greedy requests give the torch sampler's ids."""
    import random

    from tests.sampling.test_engine_sampling import ids_prompt

    roomy = kernel_llm(llama_dir, kv_cache_memory="64MiB", max_model_len=128)
    rng = random.Random(21)
    prompts = [ids_prompt(rng, 30) for _ in range(3)]
    seeded = [
        SamplingParams(temperature=t, seed=s, max_tokens=10, ignore_eos=True)
        for t, s in ((1.0, 1), (0.6, 2), (1.3, 3))
    ]
    alone = [roomy.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids
             for p, sp in zip(prompts, seeded)]  # fmt: skip
    others = [
        SamplingParams(temperature=t, top_k=k, seed=s, max_tokens=n, ignore_eos=True)
        for t, k, s, n in ((0.0, 0, None, 7), (0.8, 5, None, 12), (1.0, 0, None, 4), (0.7, 3, 1, 9))
    ]
    batch = roomy.generate(
        [ids_prompt(rng, 17), prompts[0], ids_prompt(rng, 40), prompts[1], ids_prompt(rng, 5),
         prompts[2], ids_prompt(rng, 11)],
        [others[0], seeded[0], others[1], seeded[1], others[2], seeded[2], others[3]],
        use_tqdm=False,
    )  # fmt: skip
    assert [batch[i].outputs[0].token_ids for i in (1, 3, 5)] == alone
    assert len(set(map(tuple, alone))) == 3

    async_llm = kernel_llm(
        llama_dir, kv_cache_memory="64MiB", max_model_len=128, async_scheduling=True
    )
    assert [
        o.outputs[0].token_ids for o in async_llm.generate(prompts, seeded, use_tqdm=False)
    ] == alone

    small = kernel_llm(
        llama_dir, max_model_len=64, num_gpu_blocks_override=5, max_num_batched_tokens=16,
        max_num_seqs=4,
    )  # fmt: skip
    got = small.generate(prompts, seeded, use_tqdm=False)
    assert small.llm_engine.get_stats().num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == alone

    from pagedllm import LLM

    torch_llm = LLM(llama_dir, dtype="float32", kv_cache_memory="64MiB", max_model_len=128)
    set_path(torch_llm, use_kernel=False)  # NOTE: on CUDA the default would be the kernel
    torch_ids = [
        o.outputs[0].token_ids for o in torch_llm.generate(prompts, seeded, use_tqdm=False)
    ]
    assert all(a != b for a, b in zip(alone, torch_ids)), "the kernel path's noise is its own"
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in torch_llm.generate(prompts, greedy, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in roomy.generate(prompts, greedy, use_tqdm=False)]
    assert got == expected
