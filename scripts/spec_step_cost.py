"""The costs of speculative decoding's steps against a target decode step (issue 20's H200
figures): an EAGLE head's forward, and a verify step of 1 + k tokens per request.

    python scripts/spec_step_cost.py --shape llama3-8b --methods none,eagle,eagle3
    python scripts/spec_step_cost.py --shape llama3-8b --methods none,eagle --batch 64

Dummy weights; the EAGLE heads are one-layer heads of the target's shape written to a
temporary folder (EAGLE-3 with a 32,000-token draft vocabulary). A random head proposes k
tokens every step and random weights accept almost none, so every step of a speculative run is
a verify step of 1 + k tokens per request emitting one token each (one prefill step in each
run, both timed runs alike): its cost is (wall time − draft time) / steps, against the plain
run's decode step. Per method: the target's decode step
(none), or the draft time per proposal and per head forward (a catch-up forward plus k - 1
one-token forwards), the verify step and its ratio to the decode step, the acceptance rate.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pagedllm import LLM, SamplingParams

HEADS = {
    "eagle": {},
    "eagle3": {"architectures": ["LlamaForCausalLMEagle3"], "draft_vocab_size": 32000},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3-8b", help="a config in pagedllm/configs/")
    parser.add_argument("--methods", default="none,eagle,eagle3")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1, help="requests decoding together")
    parser.add_argument("--kv-cache-memory", default="8GiB")
    ns = parser.parse_args()
    base = json.loads(
        (
            Path(__file__).resolve().parents[1] / "pagedllm" / "configs" / f"{ns.shape}.json"
        ).read_text()
    )
    tmp = Path(tempfile.mkdtemp(prefix="spec-heads-"))
    prompt = [{"prompt_token_ids": list(range(10 + i, 522 + i))} for i in range(ns.batch)]
    decode_ms = None
    params = SamplingParams(max_tokens=ns.output_len, temperature=0, ignore_eos=True)
    for method in ns.methods.split(","):
        spec = None
        if method != "none":
            head = tmp / f"{method}.json"
            head.write_text(json.dumps({**base, "num_hidden_layers": 1, **HEADS[method]}))
            spec = {"method": method, "model": str(head), "num_speculative_tokens": ns.k}
        llm = LLM(
            ns.shape, load_format="dummy", max_model_len=2048,
            kv_cache_memory=ns.kv_cache_memory, speculative_config=spec,
        )  # fmt: skip
        llm.generate(prompt, params, use_tqdm=False)  # warm-up
        before = llm.llm_engine.get_stats()
        start = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        wall = time.perf_counter() - start
        after = llm.llm_engine.get_stats()
        steps = after.num_steps - before.num_steps
        if spec is None:
            decode_ms = wall / steps * 1e3
            print(f"none (batch {ns.batch}): target decode step {decode_ms:.3f} ms")
        else:
            proposals = after.num_drafts - before.num_drafts
            draft_s = after.spec_draft_time_s - before.spec_draft_time_s
            # NOTE: one draft per request per step: the draft time of a step is all its drafts'.
            verify_ms = (wall - draft_s) / steps * 1e3
            ratio = f" ({verify_ms / decode_ms:.2f}x the decode step)" if decode_ms else ""
            print(
                f"{method} (batch {ns.batch}, k {ns.k}): {proposals} proposals, draft "
                f"{draft_s / steps * 1e3:.3f} ms per step ({draft_s / steps / ns.k * 1e3:.3f} ms "
                f"per head forward); verify step {verify_ms:.3f} ms{ratio}; acceptance "
                f"{after.spec_acceptance_rate:.3f}"
            )
        llm.llm_engine.engine_core.shutdown()
        del llm


if __name__ == "__main__":
    main()
