"""The sampling metadata built from the input batch's columns (pagedllm/worker/sample/metadata.py):
the penalties and token masks against a per-row reference, and the randomness of each path (the
kernel path's keys and inverse temperatures, the torch path's generators)."""

from __future__ import annotations

import math

import numpy as np
import torch

from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.input_batch import InputBatch
from pagedllm.worker.sample.metadata import build_sampling_metadata, row_sample_keys
from pagedllm.worker.sample.ops import apply_logits_processors
from pagedllm.worker.sample.rng import SamplingRNG
from pagedllm.worker.staging import HostStager

VOCAB = 64
NEG_INF = float("-inf")
CPU = torch.device("cpu")


def random_logits(rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=g) * 3


def torch_rng() -> SamplingRNG:
    return SamplingRNG(0, CPU, use_kernel=False)


def ref_processed(
    row: list[float], prompt: list[int], output: list[int], sp: SamplingParams, eos: int
) -> list[float]:
    """One row through allowed ids, bad words, min_tokens, logit bias and the penalties."""
    out = list(row)
    if sp.allowed_token_ids:
        out = [x if i in sp.allowed_token_ids else NEG_INF for i, x in enumerate(out)]
    for word in sp.bad_words_token_ids:
        if len(word) - 1 <= len(output) and output[len(output) - len(word) + 1 :] == word[:-1]:
            out[word[-1]] = NEG_INF
    if len(output) < sp.min_tokens:
        for t in sp.all_stop_token_ids | {eos}:
            out[t] = NEG_INF
    for t, bias in (sp.logit_bias or {}).items():
        out[t] += bias
    for t in range(len(out)):
        count = output.count(t)
        if t in prompt or count:
            rp = sp.repetition_penalty
            out[t] = out[t] / rp if out[t] > 0 else out[t] * rp
        out[t] -= sp.frequency_penalty * count + sp.presence_penalty * (count > 0)
    return out


def random_params(rng: np.random.Generator) -> SamplingParams:
    sp = SamplingParams(
        temperature=1.0,
        presence_penalty=float(rng.choice([0.0, 0.5, -1.0])),
        frequency_penalty=float(rng.choice([0.0, 0.3, 1.5])),
        repetition_penalty=float(rng.choice([1.0, 1.3, 0.7])),
        min_tokens=int(rng.choice([0, 0, 8])),
        max_tokens=32,
        stop_token_ids=[int(rng.integers(VOCAB))],
        logit_bias={int(t): float(rng.normal() * 5) for t in rng.integers(0, VOCAB, 3)}
        if rng.random() < 0.5
        else None,
        allowed_token_ids=[int(t) for t in rng.integers(0, VOCAB, 20)]
        if rng.random() < 0.3
        else None,
    )
    if rng.random() < 0.5:
        sp.bad_words_token_ids = [
            [int(t) for t in rng.integers(0, VOCAB, n)] for n in rng.integers(1, 4, 3)
        ]
    return sp


def test_penalties_and_token_masks_from_the_input_batch() -> None:
    rng = np.random.default_rng(3)
    eos = 2
    batch = InputBatch(
        max_num_reqs=16, max_model_len=64, max_blocks_per_req=4, eos_token_ids=(eos,)
    )
    reqs = []
    for i in range(12):
        sp = random_params(rng)
        # Few distinct tokens, so tokens repeat and bad-word prefixes match now and then.
        prompt = [int(t) for t in rng.integers(0, 8, rng.integers(1, 20))]
        output = [int(t) for t in rng.integers(0, 8, rng.integers(0, 12))]
        if sp.bad_words_token_ids and output and rng.random() < 0.7:
            word = sp.bad_words_token_ids[0]
            sp.bad_words_token_ids[0] = output[len(output) - len(word) + 1 :] + [word[-1]]
        batch.add_request(f"r{i}", prompt, output, [], sp)
        reqs.append((prompt, output, sp))
    # Bad words look at output tokens only: a prompt ending in a bad word's prefix bans nothing.
    sp = SamplingParams(max_tokens=8)
    sp.bad_words_token_ids = [[1, 2, 3], [4, 5]]
    batch.add_request("r12", [7, 1, 2, 4], [], [], sp)
    reqs.append(([7, 1, 2, 4], [], sp))
    # Rows are reused: a removed request's entries must not leak into the next one's row.
    batch.remove_request("r3")
    batch.add_request("r13", [5, 6], [7], [], SamplingParams(max_tokens=8))
    reqs.append(([5, 6], [7], SamplingParams(max_tokens=8)))
    names = [f"r{i}" for i in range(14) if i != 3]
    rows = np.array([batch.req_to_row[names[i]] for i in rng.permutation(len(names))])
    logits = random_logits(len(rows), 4)
    md = build_sampling_metadata(batch, rows, HostStager(CPU), torch_rng())
    processed = logits.clone()
    apply_logits_processors(processed, md)
    row_to_req = {batch.req_to_row[n]: reqs[int(n[1:])] for n in names}
    for k, row in enumerate(rows):
        prompt, output, sp = row_to_req[int(row)]
        expected = torch.tensor(ref_processed(logits[k].tolist(), prompt, output, sp, eos))
        torch.testing.assert_close(processed[k], expected, rtol=1e-5, atol=1e-5)


def batch_with(requests: list[SamplingParams], num_tokens: list[int]) -> InputBatch:
    """Requests r0, r1, ... in rows 0, 1, ...: 5 prompt tokens, then outputs up to `num_tokens`."""
    batch = InputBatch(max_num_reqs=8, max_model_len=64, max_blocks_per_req=4)
    for i, (sp, n) in enumerate(zip(requests, num_tokens)):
        batch.add_request(f"r{i}", list(range(5)), list(range(n - 5)), [], sp)
    return batch


def test_sampling_metadata_carries_keys_and_inverse_temperature() -> None:
    batch = batch_with([SamplingParams(temperature=0.0), SamplingParams(temperature=0.6)], [6, 6])
    rng = SamplingRNG(9, CPU, use_kernel=True)
    md = build_sampling_metadata(batch, np.arange(2), HostStager(CPU), rng)
    assert md.inv_temperature is not None and md.sample_keys is not None
    assert md.inv_temperature.dtype == torch.float32 and md.sample_keys.dtype == torch.int64
    assert md.inv_temperature.tolist() == [0.0, float(np.float32(1) / np.float32(0.6))]
    step_key = SamplingRNG(9, CPU, use_kernel=True).next_step_key()  # the step's first draw
    assert step_key is not None
    assert torch.equal(
        md.sample_keys,
        torch.from_numpy(row_sample_keys(batch, np.arange(2), step_key).view(np.int64)),
    )
    assert md.generator is None and md.generators == {}, "the kernel path draws no generator"


def test_torch_path_metadata_carries_the_generators() -> None:
    """The shared generator for the unseeded rows, each seeded row's own (by its index among
    the sampled rows), and no keys."""
    params = [
        SamplingParams(temperature=1.0, seed=5),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0, seed=6),
        SamplingParams(temperature=0.8, seed=7),
    ]
    batch = batch_with(params, [6, 7, 8, 9])
    rng = torch_rng()
    for i, sp in enumerate(params):
        rng.add_request(f"r{i}", sp.seed)
    rows = np.array([3, 1, 0, 2])
    md = build_sampling_metadata(batch, rows, HostStager(CPU), rng)
    assert md.sample_keys is None and md.inv_temperature is None
    assert md.generator is rng.generator
    assert md.generators == {
        0: rng.generator_of("r3"),
        2: rng.generator_of("r0"),
        3: rng.generator_of("r2"),
    }
    # All greedy: no randomness at all.
    md = build_sampling_metadata(batch, np.array([2]), HostStager(CPU), rng)
    assert md.all_greedy and md.generator is None and md.generators == {}


def test_filters_and_logprobs_are_only_there_when_used() -> None:
    batch = batch_with(
        [
            SamplingParams(temperature=1.0, top_k=5, logprobs=2),
            SamplingParams(temperature=1.0, top_p=0.5, min_p=0.1),
            SamplingParams(temperature=1.0),
        ],
        [6, 6, 6],
    )
    stager = HostStager(CPU)
    plain = build_sampling_metadata(batch, np.array([2]), stager, torch_rng())
    assert (plain.top_k, plain.top_p, plain.min_p, plain.max_num_logprobs) == (None,) * 4
    assert plain.penalties is None and plain.banned is None and plain.token_bitmask is None
    md = build_sampling_metadata(batch, np.array([1, 0, 2]), stager, torch_rng())
    assert md.top_k is not None and md.top_k.tolist() == [0, 5, 0] and md.max_top_k == 5
    assert not md.top_k_in_all_rows
    assert md.top_p is not None and md.min_p is not None and md.max_num_logprobs == 2
    assert math.isclose(md.top_p.tolist()[0], 0.5)
