"""`pagedllm bench spec`: speculative decoding on a copy-heavy workload, against no speculation in
the same run. Also `spec_decode_line`, the summary `bench latency` / `bench throughput` print
when `--speculative-config` is given.

The copy workload (`--workload copy`): chat prompts that ask the model to repeat or rewrite a
given text or code (repeat a paragraph, rename a function, fix a typo, add type hints, ...), so
that most of the answer is already in the prompt: what n-gram (prompt lookup) drafts find.
Requests run one at a time (batch 1, greedy, the model stops at its EOS or `--output-len`);
decode tokens/s is (output tokens - 1) / (last token - first token), summed over the requests,
as in `bench latency`. Greedy outputs must be identical with and without speculation (checked).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

from pagedllm.engine.stats import SchedulerStats
from pagedllm.engine_args import EngineArgs

DEFAULT_SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}

_CODE = '''def moving_average(values, window):
    """Return the moving averages of values over a sliding window."""
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result'''

_CODE2 = """class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty stack")
        return self.items.pop()

    def peek(self):
        return self.items[-1]

    def __len__(self):
        return len(self.items)"""

_TEXT = (
    "The library opens at nine in the morning and closes at six in the evening. Visitors may "
    "borrow up to five books at a time for three weeks. Books can be renewed once online or at "
    "the front desk, unless another reader has reserved them. Late returns cost ten cents per "
    "day per book. The reading room on the second floor is reserved for quiet study."
)

_TEXT2 = (
    "To make the bread, mix the flour, the salt and the yeast in a large bowl. Add the warm "
    "water slowly and knead the dough for ten minutes until it is smooth. Cover the bowl and "
    "let the dough rise for one hour. Shape it into a loaf, let it rise again for thirty "
    "minutes, then bake it at two hundred degrees for forty minutes."
)

COPY_TASKS = [
    f"Repeat the following text exactly, word for word:\n\n{_TEXT}",
    f"Rewrite this Python function with the function renamed to `rolling_mean`. Change "
    f"nothing else.\n\n```python\n{_CODE}\n```",
    f"Copy the following recipe exactly:\n\n{_TEXT2}",
    f"Add a docstring to the `pop` method of this class and return the whole class.\n\n"
    f"```python\n{_CODE2}\n```",
    f"Fix the typo in this text and return the corrected text: \n\n"
    f"{_TEXT.replace('borrow', 'borow')}",
    f"Rewrite this code so that the variable `total` is called `running_sum`. Return the "
    f"full code.\n\n```python\n{_CODE}\n```",
]


def spec_decode_line(stats: SchedulerStats, before: SchedulerStats | None = None) -> str:
    """Speculative decoding's counters (since `before`, if given): drafts, draft and accepted
    tokens, acceptance rate, mean accepted length (tokens per verifying step), draft time."""
    base = before or SchedulerStats()
    drafts = stats.num_drafts - base.num_drafts
    draft_tokens = stats.num_draft_tokens - base.num_draft_tokens
    accepted = stats.num_accepted_tokens - base.num_accepted_tokens
    diff = SchedulerStats(
        num_drafts=drafts, num_draft_tokens=draft_tokens, num_accepted_tokens=accepted
    )
    draft_s = stats.spec_draft_time_s - base.spec_draft_time_s
    return (
        f"spec decode: {drafts} drafts, {draft_tokens} draft tokens, {accepted} accepted "
        f"(acceptance rate {diff.spec_acceptance_rate:.3f}, mean accepted length "
        f"{diff.spec_mean_accepted_length:.2f} tokens per verify), draft time {draft_s:.2f} s"
    )


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", default="copy", choices=["copy"], help="copy: see above")
    parser.add_argument("--num-prompts", type=int, default=len(COPY_TASKS))
    parser.add_argument("--output-len", type=int, default=256, help="max tokens per request")
    parser.add_argument("--num-warmup", type=int, default=1)
    EngineArgs.add_cli_args(parser)


def _run(args: EngineArgs, prompts: list[dict[str, Any]], ns: argparse.Namespace) -> dict:
    from pagedllm import LLM
    from pagedllm.sampling_params import RequestOutputKind, SamplingParams

    llm = LLM(**vars(args))
    engine = llm.llm_engine
    params = SamplingParams(
        temperature=0, max_tokens=ns.output_len, output_kind=RequestOutputKind.DELTA
    )
    for i in range(ns.num_warmup):
        engine.add_request(f"warmup{i}", prompts[i % len(prompts)], params)
        while engine.has_unfinished_requests():
            engine.step()
    before = dataclasses.replace(engine.get_stats())
    outputs: list[list[int]] = []
    decode_s, decode_tokens = 0.0, 0
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
        tokens: list[int] = []
        first = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if first is None:
                    first = time.perf_counter()
                tokens += out.outputs[0].token_ids
        end = time.perf_counter()
        assert first is not None
        decode_s += end - first
        decode_tokens += len(tokens) - 1
        outputs.append(tokens)
    stats = engine.get_stats()
    engine.engine_core.shutdown()
    return {
        "outputs": outputs,
        "tok_per_s": decode_tokens / decode_s,
        "tokens": decode_tokens + len(prompts),
        "stats": stats,
        "before": before,
    }


def main(ns: argparse.Namespace) -> dict[str, float]:
    from pagedllm import LLM

    args = EngineArgs.from_cli_args(ns)
    base_args = dataclasses.replace(args, speculative_config=None)
    spec_args = dataclasses.replace(
        args, speculative_config=args.speculative_config or DEFAULT_SPEC
    )
    tasks = [COPY_TASKS[i % len(COPY_TASKS)] for i in range(ns.num_prompts)]
    renderer = LLM(**vars(base_args))
    prompts = [
        {"prompt_token_ids": renderer.render_chat([{"role": "user", "content": t}])[
            "prompt_token_ids"]}
        for t in tasks
    ]  # fmt: skip
    mc = renderer.llm_engine.config.model_config
    renderer.llm_engine.engine_core.shutdown()
    del renderer
    base = _run(base_args, prompts, ns)
    spec = _run(spec_args, prompts, ns)
    speedup = spec["tok_per_s"] / base["tok_per_s"]
    identical = base["outputs"] == spec["outputs"]
    print(
        f"model {mc.model} ({mc.dtype}): copy workload, {len(prompts)} requests one at a time, "
        f"greedy, up to {ns.output_len} tokens ({base['tokens']} output tokens)"
    )
    print(f"no speculation: {base['tok_per_s']:.1f} decode tok/s")
    print(f"speculation {spec_args.speculative_config}: {spec['tok_per_s']:.1f} decode tok/s")
    print(spec_decode_line(spec["stats"], spec["before"]))
    print(f"speed-up {speedup:.2f}x; greedy outputs identical: {identical}")
    stats, before = spec["stats"], spec["before"]
    draft_tokens = stats.num_draft_tokens - before.num_draft_tokens
    accepted = stats.num_accepted_tokens - before.num_accepted_tokens
    return {
        "base_tok_per_s": base["tok_per_s"],
        "spec_tok_per_s": spec["tok_per_s"],
        "speedup": speedup,
        "acceptance_rate": accepted / draft_tokens if draft_tokens else 0.0,
        "identical": float(identical),
    }
