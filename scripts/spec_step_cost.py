"""The cost of speculative decoding's draft steps against a target decode step, at batch 1
(issue 20's H200 figure: an EAGLE head's forward against the target's decode step).

    python scripts/spec_step_cost.py --shape llama3-8b --methods none,eagle,eagle3

Dummy weights; the EAGLE heads are one-layer heads of the target's shape written to a
temporary folder (EAGLE-3 with a 32,000-token draft vocabulary). Per method: the target's
decode ms/token (none), or the draft time per proposal and per head forward (a catch-up forward
plus k - 1 one-token forwards per proposal), the wall time and the acceptance rate (random
weights accept almost nothing: the step costs are what counts).
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
    parser.add_argument("--kv-cache-memory", default="4GiB")
    ns = parser.parse_args()
    base = json.loads(
        (
            Path(__file__).resolve().parents[1] / "pagedllm" / "configs" / f"{ns.shape}.json"
        ).read_text()
    )
    tmp = Path(tempfile.mkdtemp(prefix="spec-heads-"))
    prompt = [{"prompt_token_ids": list(range(10, 522))}]
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
        if spec is None:
            print(f"none: target decode {wall / ns.output_len * 1e3:.3f} ms/token")
        else:
            proposals = after.num_drafts - before.num_drafts
            draft_s = after.spec_draft_time_s - before.spec_draft_time_s
            print(
                f"{method}: {proposals} proposals, {draft_s / proposals * 1e3:.3f} ms each "
                f"({draft_s / proposals / ns.k * 1e3:.3f} ms per head forward), wall {wall:.2f} s, "
                f"acceptance {after.spec_acceptance_rate:.3f}"
            )
        llm.llm_engine.engine_core.shutdown()
        del llm


if __name__ == "__main__":
    main()
