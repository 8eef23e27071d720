"""A torch-free stand-in for the worker: it tracks each request's tokens as the real runner does
and "samples" a deterministic token wherever the real one would sample.

`launch_model` computes the step at once (its sampled tokens are known to the next launch, as
the real runner's are on the device); `collect_output` hands the result over later."""

from __future__ import annotations

from pagedllm.engine.outputs import GrammarOutput, ModelRunnerOutput, SchedulerOutput


class FakeExecutor:
    def __init__(self, num_blocks: int, vocab_size: int = 1000) -> None:
        self.num_blocks = num_blocks
        self.vocab_size = vocab_size
        self.tokens: dict[str, list[int]] = {}
        self.steps: list[SchedulerOutput] = []
        self.grammars: list[GrammarOutput] = []

    def determine_num_blocks(self) -> int:
        return self.num_blocks

    def kv_cache_specs(self) -> dict:
        return {}

    def initialize_cache(self, num_blocks: int) -> None:
        pass

    def warm_up(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def collect_output(self, handle: ModelRunnerOutput) -> ModelRunnerOutput:
        return handle

    def sample_tokens(self, handle: ModelRunnerOutput, grammar: GrammarOutput) -> None:
        self.grammars.append(grammar)

    def bitmask_buffer(self, rows: int, words: int):
        import numpy as np

        return np.empty((rows, words), dtype=np.int32)

    def abandon_steps(self) -> None:
        pass

    def launch_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self.steps.append(out)
        for req_id in out.finished_req_ids | out.preempted_req_ids:
            self.tokens.pop(req_id, None)
        computed = {}
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.tokens
            self.tokens[new.req_id] = new.prompt_token_ids + new.output_token_ids
            computed[new.req_id] = new.num_computed_tokens
        for cached in out.scheduled_cached_reqs:
            computed[cached.req_id] = cached.num_computed_tokens
        req_ids, sampled = [], []
        for req_id, n in out.num_scheduled_tokens.items():
            toks = self.tokens[req_id]
            req_ids.append(req_id)
            if computed[req_id] + n == len(toks):
                # A token that depends on the whole sequence, like a real model's would.
                new = (sum(toks) * 31 + len(toks)) % self.vocab_size
                toks.append(new)
                sampled.append([new])
            else:
                assert computed[req_id] + n < len(toks)
                sampled.append([])
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled)
