"""The engine on a CUDA device (marker `gpu`; skipped without one).

- CUDA graphs: greedy tokens of tiny fp32 models with decode graphs (the default) equal those of
  eager steps (`enforce_eager`), of the torch-reference attention backend, and of HF `generate`;
  batch sizes between the captured sizes exercise the padding rows. Seeded sampling gives the
  same tokens with and without graphs, and with and without async scheduling.
- bf16 at the llama3-8b shape: the engine's log-probabilities (prompt and generated tokens)
  against HF transformers on the same random weights in fp32, with a tolerance calibrated by HF's
  own bf16 error on the same inputs.
"""

from __future__ import annotations

import random

import pytest
import torch

from pagedllm import LLM, SamplingParams
from tests.tiny_models import VOCAB_SIZE, hf_greedy, load_hf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NUM_REQS = 37  # between captured sizes (32 and 48): the replays pad
PROMPT_LENS = [1 + (i * 37) % 300 for i in range(NUM_REQS)]
MAX_TOKENS = [1 + (i * 13) % 40 for i in range(NUM_REQS)]


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB_SIZE) for _ in range(n)] for n in PROMPT_LENS]


def _run(llm: LLM, prompts: list[list[int]], **params) -> list[list[int]]:
    sp = [SamplingParams(max_tokens=m, ignore_eos=True, **params) for m in MAX_TOKENS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _graph_runner(llm: LLM):
    return llm.llm_engine.engine_core.executor.worker.model_runner.cuda_graphs


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cuda_graphs_match_eager_reference_and_hf(arch, tiny_model_dirs) -> None:
    path = tiny_model_dirs[arch]
    prompts = _prompts(99)
    common = dict(dtype="float32", max_model_len=512, kv_cache_memory="256MiB")
    graphs = LLM(path, **common)
    assert graphs.llm_engine.engine_core.async_scheduling, "the default on CUDA"
    runner = _graph_runner(graphs)
    assert runner is not None and 48 in runner.sizes
    got = _run(graphs, prompts, temperature=0)
    assert runner.num_replays > 0
    eager = LLM(path, enforce_eager=True, **common)
    assert _graph_runner(eager) is None
    assert _run(eager, prompts, temperature=0) == got
    reference = LLM(path, attention_backend="torch", **common)
    assert _run(reference, prompts, temperature=0) == got
    hf = load_hf(path).cuda()
    expected = hf_greedy(hf, prompts[:8], MAX_TOKENS[:8])
    assert got[:8] == expected

    seeded = dict(temperature=0.8, top_p=0.9, seed=7)
    assert _run(graphs, prompts, **seeded) == _run(eager, prompts, **seeded)
    # One step at a time (no async scheduling) gives the same tokens.
    sync = LLM(path, async_scheduling=False, **common)
    assert _run(sync, prompts, temperature=0) == got
    assert _run(sync, prompts, **seeded) == _run(graphs, prompts, **seeded)


def test_llama3_8b_shape_bf16_logprobs_close_to_fp32_reference() -> None:
    """bf16 engine vs HF fp32 on the same random weights, prompt and generated tokens.

    Tolerance: the engine's largest log-prob error against the fp32 reference is at most twice
    HF bf16's own (plus 0.02), measured on the same tokens.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from pagedllm.engine_args import CONFIGS_DIR

    llm = LLM(
        "llama3-8b",
        load_format="dummy",
        dtype="bfloat16",
        max_model_len=2048,
        max_num_seqs=16,
        kv_cache_memory="4GiB",  # leaves room for the HF model
    )
    config = AutoConfig.from_pretrained(CONFIGS_DIR / "llama3-8b.json")
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model = llm.llm_engine.engine_core.executor.worker.model
    model.load_weights(hf.state_dict().items())

    rng = random.Random(3)
    prompts = [[rng.randrange(config.vocab_size) for _ in range(n)] for n in (37, 300, 1000)]
    params = SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, logprobs=0, prompt_logprobs=0
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    def reference_logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = hf(torch.tensor([ids], device="cuda")).logits[0, :-1].float()
        target = torch.tensor(ids[1:], device="cuda")
        return logits.log_softmax(-1).gather(1, target[:, None])[:, 0].cpu()

    ours, seqs = [], []
    for prompt, out in zip(prompts, outs):
        comp = out.outputs[0]
        seq = prompt + list(comp.token_ids)
        lp = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], prompt[1:])]
        lp += [d[t].logprob for d, t in zip(comp.logprobs, comp.token_ids)]
        ours.append(torch.tensor(lp[: len(seq) - 1]))
        seqs.append(seq)
    hf_bf16 = [reference_logprobs(s) for s in seqs]
    hf.float()
    fp32 = [reference_logprobs(s) for s in seqs]
    our_err = max(float((a - r).abs().max()) for a, r in zip(ours, fp32))
    hf_err = max(float((b - r).abs().max()) for b, r in zip(hf_bf16, fp32))
    print(f"max |logprob - fp32 reference|: pagedllm bf16 {our_err:.4f}, HF bf16 {hf_err:.4f}")
    assert our_err <= 2 * hf_err + 0.02
