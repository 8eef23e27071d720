"""Speculative decoding with a draft model (method "draft_model"), tiny random models, fp32 CPU.

- config: a draft without a model, of another vocabulary, or missing, is refused at start-up;
- the scheduler: the worker's drafts (`ModelRunnerOutput.draft_token_ids`) are scheduled next
  step, cut to the room; the draft's lookahead slots are reserved and every block comes back;
- the rejection sampler with a probabilistic draft (accept with min(1, p / q), residual
  max(p - q, 0)) keeps the target's distribution (chi-square over many draws, fixed p and q);
- the engine: greedy output identical with and without a draft model (a smaller random draft:
  low acceptance; the target as its own draft: every draft accepted), with chunked prefill,
  prefix-cache hits and preemption; seeded sampling reproducible and batch-independent; no KV
  block leaked under random add / step / abort.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from pagedllm.engine.outputs import ModelRunnerOutput, SchedulerOutput
from pagedllm.engine.request import Request
from pagedllm.engine.scheduler import Scheduler
from pagedllm.worker.sample.metadata import SamplingMetadata
from pagedllm.worker.sample.rejection import DraftLayout, rejection_sample, target_probs
from tests.test_spec_decode import CHI2_999, VOCAB, KVFakeModel, _chi_square, _expected
from tests.tiny_models import _BASE, ARCHS, make_tokenizer

COMMON = dict(dtype="float32", max_model_len=256, seed=0)


def _make_small_model(path: Path, seed: int, **overrides) -> str:
    """A random llama smaller than the tiny target (one layer, narrower), same vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**_BASE, **ARCHS["llama"], "num_hidden_layers": 1, "hidden_size": 32,
           "intermediate_size": 64, **overrides}  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    model.save_pretrained(path)
    make_tokenizer(path)
    return str(path)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory) -> str:
    return _make_small_model(tmp_path_factory.mktemp("draft") / "small", seed=5)


def _spec(model: str, k: int) -> dict:
    return {"method": "draft_model", "model": model, "num_speculative_tokens": k}


# ----- config -----


def test_draft_configs_refused(tiny_model_dirs, tmp_path) -> None:
    target = tiny_model_dirs["llama"]
    with pytest.raises(ValueError, match="needs model"):
        SpeculativeConfig.from_dict({"method": "draft_model"})
    with pytest.raises(ValueError, match="draft_model_config"):
        SpeculativeConfig.from_dict({"method": "draft_model", "draft_model_config": 1})
    with pytest.raises(ValueError, match=r"speculative_config.model='/nowhere'"):
        LLM(target, speculative_config=_spec("/nowhere", 2), **COMMON)
    # refused before anything is loaded (bare config.json files): another vocabulary, and a
    # draft shorter than max_model_len
    for name, extra, message in (
        ("vocab", {"vocab_size": 256}, r"speculative_config.model=.*vocabulary has 256"),
        ("short", {"max_position_embeddings": 64}, "speculative_config.model=.*max_position"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        cfg = {**_BASE, **ARCHS["llama"], **extra, "architectures": ["LlamaForCausalLM"]}
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=message):
            LLM(target, speculative_config=_spec(str(folder), 2), **COMMON)


# ----- scheduler: the worker's drafts, against the fake model of test_spec_decode -----


class DraftingFakeModel(KVFakeModel):
    """KVFakeModel whose worker proposes after each step, like the draft model: for each
    request that sampled, up to k tokens (right or wrong at random), never into a slot its
    blocks do not hold (the draft writes its K/V at positions n - 1 .. n + k - 2)."""

    def __init__(self, scheduler: Scheduler, k: int, rnd: random.Random) -> None:
        super().__init__(scheduler)
        self.k, self.rnd = k, rnd

    def run(self, out: SchedulerOutput) -> ModelRunnerOutput:
        result = super().run(out)
        sched, bs = self.scheduler, self.scheduler.block_size
        for req_id, sampled in zip(result.req_ids, result.sampled_token_ids):
            if not sampled:
                continue
            request = sched.requests[req_id]
            tokens = request.all_token_ids + sampled
            held = len(sched.kv_cache_manager.req_to_blocks[req_id]) * bs
            num = min(self.k, held - len(tokens) + 1)
            drafts = []
            for _ in range(num):
                right = KVFakeModel.next_token(tokens + drafts)
                drafts.append(right if self.rnd.random() < 0.7 else self.rnd.randrange(VOCAB))
            if drafts:
                result.draft_token_ids[req_id] = drafts
        return result


@pytest.mark.parametrize("seed", range(6))
def test_scheduler_worker_drafts(seed: int) -> None:
    rnd = random.Random(seed)
    block_size = rnd.choice([2, 4, 8])
    num_blocks = 96 // block_size + 1 + rnd.randrange(0, 12)
    k = rnd.randrange(1, 6)
    sched = Scheduler(
        SchedulerConfig(max_num_seqs=rnd.randrange(1, 6),
                        max_num_batched_tokens=rnd.randrange(8, 40), max_model_len=96),
        CacheConfig(block_size=block_size, enable_prefix_caching=rnd.random() < 0.7),
        num_blocks,
        speculative_config=SpeculativeConfig(method="draft_model", model="x",
                                             num_speculative_tokens=k),
    )  # fmt: skip
    assert sched.proposer is None and sched.num_lookahead == k
    model = DraftingFakeModel(sched, k, rnd)
    want: dict[str, list[int]] = {}
    done: dict[str, list[int]] = {}
    aborted: set[str] = set()
    for i in range(24):
        if rnd.random() < 0.6:
            prompt = [rnd.randrange(VOCAB) for _ in range(rnd.randrange(2, 30))]
            n = rnd.randrange(1, 40)
            sched.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=n,
                              ignore_eos=True), max_model_len=96))  # fmt: skip
            want[f"r{i}"] = _expected(prompt, n)
        if rnd.random() < 0.1 and sched.requests:
            victim = rnd.choice(list(sched.requests))
            sched.abort_requests([victim])
            aborted.add(victim)
        for _ in range(rnd.randrange(1, 6)):
            _step(sched, model, done)
    while sched.has_unfinished_requests():
        _step(sched, model, done)
    for req_id, tokens in want.items():
        if req_id not in aborted:
            assert done[req_id] == tokens, req_id
    assert sched.kv_cache_manager.pool.num_free_blocks == num_blocks
    assert not sched.kv_cache_manager.req_to_blocks and not sched.worker_drafts
    stats = sched.make_stats()
    assert 0 < stats.num_accepted_tokens <= stats.num_draft_tokens


def _step(sched: Scheduler, model: KVFakeModel, done: dict[str, list[int]]) -> None:
    out = sched.schedule()
    for req_id, drafts in out.scheduled_spec_decode_tokens.items():
        request = sched.requests[req_id]
        max_more = request.max_tokens - request.num_output_tokens
        assert len(drafts) < max_more, "the token after the drafts fits max_tokens"
    for req_id in out.num_scheduled_tokens:
        done[req_id] = sched.requests[req_id].output_token_ids
    sched.update_from_output(out, model.run(out))


# ----- the rejection sampler with a probabilistic draft -----


@pytest.mark.parametrize("temperature", [0.8, 1.5])
def test_rejection_sampler_probabilistic_draft(temperature: float) -> None:
    """Drafts drawn from q (k = 2): the first emitted token is distributed as p_0, the second
    (given the first draft accepted) as p_1, and d_1 is accepted with sum min(p_0, q_0)."""
    vocab, k, n = 5, 2, 40000
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(k + 1, vocab, generator=gen) * 1.5
    q = torch.rand(k, vocab, generator=gen) ** 2 + 0.05
    q = q / q.sum(-1, keepdim=True)
    drafts = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=gen)
                          for j in range(k)], dim=1)  # fmt: skip
    layout = DraftLayout.from_counts(np.full(n, k), drafts.reshape(-1).numpy())
    md = SamplingMetadata(
        all_greedy=False, all_random=True, temperature=torch.full((n * (k + 1),), temperature)
    )
    probs = target_probs(base.repeat(n, 1), md)
    noise = torch.empty_like(probs).exponential_(generator=gen)
    uniforms = torch.rand(n * k, generator=gen)
    _, tokens = rejection_sample(probs, layout, noise, uniforms, None, q.repeat(n, 1))
    p = (base / temperature).softmax(-1).double().numpy()
    first = np.bincount([t[0] for t in tokens], minlength=vocab)
    assert _chi_square(first, p[0]) < CHI2_999[vocab - 1]
    second = np.bincount([t[1] for t in tokens if len(t) > 1], minlength=vocab)
    assert second.sum() > 1000
    assert _chi_square(second, p[1]) < CHI2_999[vocab - 1]
    rate = np.mean([len(t) > 1 for t in tokens])
    expected = np.minimum(p[0], q[0].double().numpy()).sum()
    assert abs(rate - expected) < 4 * np.sqrt(expected * (1 - expected) / n)


def test_rejection_sampler_draft_equal_to_target() -> None:
    """q = p: every draft is accepted."""
    n, vocab = 2000, 7
    base = torch.randn(3, vocab)
    md = SamplingMetadata(all_greedy=False, all_random=True, temperature=torch.ones(3 * n))
    probs = target_probs(base.repeat(n, 1), md)
    q = base[:2].softmax(-1)
    drafts = torch.stack([torch.multinomial(q[j], n, replacement=True) for j in range(2)], 1)
    layout = DraftLayout.from_counts(np.full(n, 2), drafts.reshape(-1).numpy())
    noise = torch.empty_like(probs).exponential_()
    _, tokens = rejection_sample(probs, layout, noise, torch.rand(2 * n), None, q.repeat(n, 1))
    assert all(len(t) == 3 for t in tokens)


# ----- the engine end to end -----


def _prompts(seed: int) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randrange(3, 500) for _ in range(rnd.randrange(3, 60))] for _ in range(6)]


MAX_TOKENS = [40, 3, 25, 40, 1, 33]


def _generate(llm: LLM, prompts: list[list[int]], **params) -> list[list[int]]:
    sp = [SamplingParams(max_tokens=m, ignore_eos=True, **params) for m in MAX_TOKENS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def greedy_reference(tiny_model_dirs) -> list[list[int]]:
    llm = LLM(tiny_model_dirs["llama"], kv_cache_memory="64MiB", **COMMON)
    return _generate(llm, _prompts(0), temperature=0)


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_identical_with_small_draft(k, tiny_model_dirs, draft_dir, greedy_reference):
    prompts = _prompts(0)
    llm = LLM(tiny_model_dirs["llama"], speculative_config=_spec(draft_dir, k),
              kv_cache_memory="64MiB", max_num_batched_tokens=16, max_num_seqs=4,
              **COMMON)  # fmt: skip
    drafter = llm.llm_engine.engine_core.executor.worker.drafter
    run, sizes = drafter._run, []

    def spy(rows, starts, query_lens, logits):
        sizes.append((int(query_lens.sum()), logits))
        return run(rows, starts, query_lens, logits)

    drafter._run = spy
    assert _generate(llm, prompts, temperature=0) == greedy_reference  # chunked prefill
    assert max(n for n, _ in sizes) <= 16, "no draft forward exceeds a step's token budget"
    assert any(not logits for _, logits in sizes), "long prompts caught up in chunks"
    assert _generate(llm, prompts, temperature=0) == greedy_reference, "prefix-cache hits"
    stats = llm.llm_engine.get_stats()
    assert stats.num_drafts > 0 and stats.num_draft_tokens >= stats.num_drafts
    assert stats.prefix_cache_stats.hits > 0 and stats.spec_draft_time_s > 0
    tight = LLM(tiny_model_dirs["llama"], speculative_config=_spec(draft_dir, k),
                num_gpu_blocks_override=9, max_num_seqs=6, block_size=16,
                **{**COMMON, "max_model_len": 128})  # fmt: skip
    assert _generate(tight, prompts, temperature=0) == greedy_reference
    assert tight.llm_engine.get_stats().num_preemptions > 0


def test_target_as_its_own_draft(tiny_model_dirs, greedy_reference) -> None:
    target = tiny_model_dirs["llama"]
    llm = LLM(target, speculative_config=_spec(target, 3), kv_cache_memory="64MiB", **COMMON)
    assert _generate(llm, _prompts(0), temperature=0) == greedy_reference
    stats = llm.llm_engine.get_stats()
    assert stats.num_draft_tokens > 50
    # NOTE: the same model: its argmax is the target's (fp32, far from ties)
    assert stats.spec_acceptance_rate > 0.95
    assert stats.spec_mean_accepted_length > 3.5
    # sampled: q = p up to rounding, so nearly every draft is accepted too
    _generate(llm, _prompts(1), temperature=0.9, seed=1)
    after = llm.llm_engine.get_stats()
    accepted = after.num_accepted_tokens - stats.num_accepted_tokens
    assert accepted > 0.9 * (after.num_draft_tokens - stats.num_draft_tokens)


def test_seeded_sampling_with_draft(tiny_model_dirs, draft_dir) -> None:
    llm = LLM(tiny_model_dirs["llama"], speculative_config=_spec(draft_dir, 3),
              kv_cache_memory="64MiB", **COMMON)  # fmt: skip
    prompts = _prompts(2)
    first = _generate(llm, prompts, temperature=0.8, seed=11)
    assert _generate(llm, prompts, temperature=0.8, seed=11) == first
    sp = SamplingParams(max_tokens=MAX_TOKENS[0], ignore_eos=True, temperature=0.8, seed=11)
    alone = llm.generate([{"prompt_token_ids": prompts[0]}], sp, use_tqdm=False)
    assert alone[0].outputs[0].token_ids == first[0], "independent of the batch"


def test_no_block_leaked_random_abort(tiny_model_dirs, draft_dir, greedy_reference) -> None:
    rnd = random.Random(7)
    prompts = _prompts(0)
    llm = LLM(tiny_model_dirs["llama"], speculative_config=_spec(draft_dir, 3),
              num_gpu_blocks_override=17, block_size=8, max_num_seqs=4,
              max_num_batched_tokens=24, **{**COMMON, "max_model_len": 128})  # fmt: skip
    engine = llm.llm_engine
    outputs: dict[str, list[int]] = {}
    live: list[str] = []
    aborted: set[str] = set()

    def step() -> None:
        for out in engine.step():
            outputs[out.request_id] = out.outputs[0].token_ids
            if out.finished and out.request_id in live:
                live.remove(out.request_id)

    order = list(range(len(prompts))) * 2
    rnd.shuffle(order)
    for n, i in enumerate(order):
        temperature = 0 if rnd.random() < 0.6 else 0.9
        sp = SamplingParams(max_tokens=MAX_TOKENS[i], ignore_eos=True, temperature=temperature)
        req_id = f"{n}:{i}:{temperature}"
        engine.add_request(req_id, {"prompt_token_ids": prompts[i]}, sp)
        live.append(req_id)
        for _ in range(rnd.randrange(0, 4)):
            step()
        if rnd.random() < 0.3 and live:
            victim = rnd.choice(live)
            engine.abort_request([victim])
            live.remove(victim)
            aborted.add(victim)
    while engine.has_unfinished_requests():
        step()
    scheduler = engine.engine_core.scheduler
    assert scheduler.kv_cache_manager.pool.num_free_blocks == engine.engine_core.num_blocks
    assert not scheduler.kv_cache_manager.req_to_blocks and not scheduler.worker_drafts
    for req_id, tokens in outputs.items():
        _, i, temperature = req_id.split(":")
        if req_id not in aborted and float(temperature) == 0:
            assert tokens == greedy_reference[int(i)], req_id
    assert engine.get_stats().num_drafts > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_greedy_identical_with_speculation(tiny_model_dirs, draft_dir) -> None:
    """On CUDA (Triton attention, decode graphs between verify steps): greedy output equals the
    one without speculation, for n-gram, a small draft and the target as its own draft."""
    target = tiny_model_dirs["llama"]
    common = dict(dtype="float32", max_model_len=512, kv_cache_memory="256MiB", seed=0)
    prompts = [(p * 4)[:90] for p in _prompts(3)]  # repetitive: n-gram drafts too
    want = _generate(LLM(target, **common), prompts, temperature=0)
    for spec in (
        {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3},
        _spec(draft_dir, 4),
        _spec(target, 4),
    ):
        llm = LLM(target, speculative_config=spec, **common)
        assert _generate(llm, prompts, temperature=0) == want, spec
        stats = llm.llm_engine.get_stats()
        assert stats.num_drafts > 0, spec
        if spec.get("model") == target:
            assert stats.spec_acceptance_rate > 0.95
