"""Scheduler and block pool under random add / step / abort sequences (hypothesis).

Invariants checked after every rule, with and without async scheduling: each block's ref count
equals the number of live requests holding it, a block is in the free queue iff its ref count is 0, step budgets and max_num_seqs
hold. At the end every request that was not aborted has exactly its expected tokens (the fake
model's tokens depend on the whole sequence, so a wrong recompute after preemption shows), and
every block is free again.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagedllm.config import CacheConfig, EngineConfig, SchedulerConfig
from pagedllm.engine.core import EngineCore
from pagedllm.engine.request import Request, RequestStatus
from pagedllm.sampling_params import SamplingParams
from tests.engine.fake_executor import FakeExecutor

MAX_MODEL_LEN = 64
VOCAB = 1000


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    toks = list(prompt)
    for _ in range(n):
        toks.append((sum(toks) * 31 + len(toks)) % VOCAB)
    return toks[len(prompt) :]


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([1, 2, 4, 8]),
        extra_blocks=st.integers(0, 24),
        max_num_seqs=st.integers(1, 8),
        budget=st.integers(8, 80),
        caching=st.booleans(),
        async_scheduling=st.booleans(),
    )
    def setup(
        self, block_size, extra_blocks, max_num_seqs, budget, caching, async_scheduling
    ) -> None:
        num_blocks = -(-MAX_MODEL_LEN // block_size) + extra_blocks
        self.sched_config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(budget, max_num_seqs),
            max_model_len=MAX_MODEL_LEN,
        )
        config = EngineConfig(
            model_config=None,  # type: ignore[arg-type]
            cache_config=CacheConfig(block_size=block_size, enable_prefix_caching=caching),
            scheduler_config=self.sched_config,
            parallel_config=None,  # type: ignore[arg-type]
            device_config=None,  # type: ignore[arg-type]
            async_scheduling=async_scheduling,
        )
        self.executor = FakeExecutor(num_blocks, VOCAB)
        self.core = EngineCore(config, self.executor)
        self.sched = self.core.scheduler
        self.live: dict[str, Request] = {}
        self.done: dict[str, Request] = {}
        self.aborted: set[str] = set()
        self.counter = 0
        self.preemptions = 0

    @rule(
        prompt_len=st.integers(1, 48),
        max_tokens=st.integers(1, 24),
        shared=st.booleans(),
        seed=st.integers(0, 3),
    )
    def add(self, prompt_len, max_tokens, shared, seed) -> None:
        # Shared prompts start with one of a few fixed prefixes, to exercise cache hits.
        prefix = [(seed * 7 + i) % VOCAB for i in range(prompt_len)] if shared else []
        prompt = prefix or [(self.counter * 13 + i * 5) % VOCAB for i in range(prompt_len)]
        req_id = f"r{self.counter}"
        self.counter += 1
        req = Request(
            req_id,
            prompt,
            SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            max_model_len=MAX_MODEL_LEN,
        )
        self.core.add_request(req)
        self.live[req_id] = req

    @rule()
    def step(self) -> None:
        self.core.step()
        out = self.executor.steps[-1] if self.executor.steps else None
        if out is not None:
            assert out.total_num_scheduled_tokens <= self.sched_config.max_num_batched_tokens
            assert len(out.num_scheduled_tokens) <= self.sched_config.max_num_seqs
        self._collect()

    @precondition(lambda self: bool(self.live))
    @rule(pick=st.integers(0, 1000))
    def abort(self, pick) -> None:
        req_id = sorted(self.live)[pick % len(self.live)]
        self.core.abort_requests([req_id])
        self.aborted.add(req_id)
        self.done[req_id] = self.live.pop(req_id)

    def _collect(self) -> None:
        for req_id, req in list(self.live.items()):
            if req.is_finished:
                self.done[req_id] = self.live.pop(req_id)

    @invariant()
    def blocks_consistent(self) -> None:
        if not hasattr(self, "sched"):
            return
        mgr = self.sched.kv_cache_manager
        holders = Counter(b.block_id for blocks in mgr.req_to_blocks.values() for b in blocks)
        for block in mgr.pool.blocks:
            assert block.ref_cnt == holders.get(block.block_id, 0), block
            assert (block.ref_cnt == 0) == (block.block_id in mgr.pool.free_queue), block
        for block_hash, block in mgr.pool.cached.items():
            assert block.block_hash == block_hash
        assert len(self.sched.running) <= self.sched_config.max_num_seqs
        assert set(mgr.req_to_blocks) <= {r.request_id for r in self.sched.running}
        for req in self.sched.running:
            assert req.status == RequestStatus.RUNNING
            assert 0 < req.num_computed_tokens <= req.num_tokens_with_placeholders
            assert 0 <= req.num_output_placeholders <= 2

    def teardown(self) -> None:
        if not hasattr(self, "sched"):
            return
        for _ in range(10_000):
            if not self.core.has_unfinished_requests():
                break
            self.step()
        assert not self.core.has_unfinished_requests()
        self._collect()
        assert not self.live
        for req_id, req in self.done.items():
            if req_id in self.aborted:
                assert req.status == RequestStatus.FINISHED_ABORTED
                continue
            assert req.status == RequestStatus.FINISHED_LENGTH_CAPPED
            assert req.num_output_tokens == req.max_tokens
            assert req.output_token_ids == expected_tokens(req.prompt_token_ids, req.max_tokens)
        mgr = self.sched.kv_cache_manager
        assert mgr.pool.num_free_blocks == mgr.pool.num_blocks
        assert not mgr.req_to_blocks


SchedulerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSchedulerMachine = SchedulerMachine.TestCase
