"""The one RNG owner (pagedllm/worker/sample/rng.py): the kernel path's keys (pinned to their
values of before the sampling package), the per-step key, the seeded requests' generators and
their lifetime, and on both paths: a seeded request's samples do not depend on the batch around
it or on a preemption.

Without a GPU the kernel path runs on CPU tensors under Triton's interpreter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.triton_interpreter import kernel_test_device

DEVICE = kernel_test_device()  # NOTE: before triton is first imported

from pagedllm import SamplingParams  # noqa: E402
from pagedllm.worker.input_batch import InputBatch  # noqa: E402
from pagedllm.worker.sample import Sampler, SamplingRNG  # noqa: E402
from pagedllm.worker.sample.metadata import row_sample_keys  # noqa: E402
from pagedllm.worker.staging import HostStager  # noqa: E402
from tests.triton_interpreter import patch_interpreter  # noqa: E402
from tests.worker.sample.test_metadata import batch_with  # noqa: E402

if DEVICE == "cpu":
    patch_interpreter()

CPU = torch.device("cpu")


# ----- keys -----


def test_seeded_keys_depend_on_seed_and_position_only() -> None:
    seeded = SamplingParams(temperature=1.0, seed=42)
    other = SamplingParams(temperature=0.5, seed=7)
    free = SamplingParams(temperature=1.0)
    a = batch_with([seeded, free, other], [9, 9, 9])
    b = batch_with([free, free, other, free, seeded], [5, 12, 9, 6, 9])
    ka = row_sample_keys(a, np.arange(3), step_key=1)
    kb = row_sample_keys(b, np.array([3, 4, 0, 1, 2]), step_key=2)
    assert ka[0] == kb[1] and ka[2] == kb[4], "same (seed, position): same key in any batch"
    assert len({int(k) for k in ka} | {int(k) for k in kb}) == 6
    # The next position (the placeholder of a step in flight counts) gives another key.
    a.add_placeholders(np.array([0]), step_id=1)
    assert row_sample_keys(a, np.array([0]), step_key=1)[0] != ka[0]
    # Unseeded rows: another step key or another row index, another key.
    assert row_sample_keys(a, np.array([1]), 3)[0] != row_sample_keys(a, np.array([1]), 4)[0]
    # Any seed of the 64-bit range is fine, negative or the largest (SamplingParams refuses more).
    c = batch_with(
        [SamplingParams(temperature=1.0, seed=-3), SamplingParams(seed=2**64 - 1)], [6, 6]
    )
    assert row_sample_keys(c, np.arange(2), 0).dtype == np.uint64


def test_keys_are_the_ones_of_before() -> None:
    """The kernel path's keys, bit for bit as `InputBatch.sample_keys` made them before the
    sampling package (values computed at commit 6c42bef): seeded, unseeded, negative and
    largest seeds, in two orders."""
    specs = [(42, 9), (None, 9), (7, 12), (-3, 6), (2**64 - 1, 5), (0, 20)]
    batch = batch_with(
        [SamplingParams(temperature=1.0, seed=s) for s, _ in specs], [n for _, n in specs]
    )
    keys = row_sample_keys(batch, np.arange(6), step_key=123456789)
    assert [hex(int(k)) for k in keys] == [
        "0xc4b6b24ef01890e",
        "0x223c74d93deb7679",
        "0x660295fd0c2fa166",
        "0x26a8d66606a3e716",
        "0x4bffd802ebfb15e4",
        "0xb54e0f1600cc4d19",
    ]
    keys = row_sample_keys(batch, np.array([5, 1, 3]), step_key=2**62 + 5)
    assert [hex(int(k)) for k in keys] == [
        "0xb54e0f1600cc4d19",
        "0x2f770c426d82cde6",
        "0x26a8d66606a3e716",
    ]


def test_step_keys_come_from_the_engine_seed_once_per_step() -> None:
    """The kernel path draws one step key per metadata build, all-greedy steps included (so the
    keys of step N depend only on N and the engine seed); the torch path draws none."""
    numpy_rng = np.random.default_rng(11)
    expected = [int(numpy_rng.integers(1 << 63)) for _ in range(3)]
    rng = SamplingRNG(11, CPU, use_kernel=True)
    batch = batch_with([SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)], [6, 6])
    stager = HostStager(CPU)
    batch.make_sampling_metadata(np.array([0]), stager, rng)  # all greedy: it draws a key even so
    md = batch.make_sampling_metadata(np.array([1]), stager, rng)
    assert md.sample_keys is not None
    assert (
        md.sample_keys.tolist()
        == row_sample_keys(batch, np.array([1]), expected[1]).view(np.int64).tolist()
    )
    assert rng.next_step_key() == expected[2]
    assert SamplingRNG(11, CPU, use_kernel=False).next_step_key() is None


def test_generators_outlive_preemptions_and_go_with_the_request() -> None:
    rng = SamplingRNG(0, CPU, use_kernel=False)
    rng.add_request("a", 5)
    rng.add_request("b", None)
    gen = rng.generator_of("a")
    first = torch.rand(3, generator=gen)
    rng.add_request("a", 5)  # resumed after a preemption: the same generator, where it was
    assert rng.generator_of("a") is gen
    assert not torch.equal(torch.rand(3, generator=gen), first)
    with pytest.raises(KeyError):
        rng.generator_of("b")  # an unseeded request shares `rng.generator`
    rng.finish_request("a")
    rng.add_request("a", 5)  # a new request of the same id starts over
    assert torch.equal(torch.rand(3, generator=rng.generator_of("a")), first)
    # A negative seed goes to torch.Generator as it is.
    rng.add_request("neg", -3)
    assert torch.equal(
        torch.rand(3, generator=rng.generator_of("neg")),
        torch.rand(3, generator=torch.Generator().manual_seed(-3)),
    )
    kernel = SamplingRNG(0, CPU, use_kernel=True)
    kernel.add_request("a", 5)  # the kernel path keys seeded rows: no generator
    with pytest.raises(KeyError):
        kernel.generator_of("a")
    assert SamplingRNG(0, torch.device("cpu")).use_kernel is False


# ----- a seeded request in any batch, before and after a preemption -----

VOCAB = 256


def fake_logits(tokens: np.ndarray) -> torch.Tensor:
    """A model of sorts: the next-token logits are a function of the tokens so far only."""
    h = 0
    for t in tokens.tolist():
        h = (h * 1000003 + int(t) + 1) % (1 << 61)
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(h)) * 2


class Engine:
    """The model runner's sampling calls over an input batch, one step at a time."""

    def __init__(self, use_kernel: bool) -> None:
        self.batch = InputBatch(max_num_reqs=8, max_model_len=64, max_blocks_per_req=1)
        self.sampler = Sampler(use_kernel, seed=1, device=DEVICE)
        self.stager = HostStager(torch.device(DEVICE))
        self.requests: dict[str, tuple[list[int], SamplingParams]] = {}
        self.step_id = 0

    def add(self, req_id: str, prompt: list[int], sp: SamplingParams) -> None:
        self.requests[req_id] = (prompt, sp)
        self._enter(req_id, [])

    def _enter(self, req_id: str, output: list[int]) -> None:
        prompt, sp = self.requests[req_id]
        self.sampler.rng.add_request(req_id, sp.seed)
        self.batch.add_request(req_id, prompt, output, [], sp)

    def output(self, req_id: str) -> list[int]:
        b = self.batch
        row = b.req_to_row[req_id]
        return b.token_ids[row, b.num_prompt_tokens[row] : b.num_tokens[row]].tolist()

    def preempt(self, req_id: str) -> list[int]:
        output = self.output(req_id)
        self.batch.remove_request(req_id)
        return output

    def resume(self, req_id: str, output: list[int]) -> None:
        self._enter(req_id, output)

    def finish(self, req_id: str) -> list[int]:
        output = self.output(req_id)
        self.batch.remove_request(req_id)
        self.sampler.rng.finish_request(req_id)
        return output

    def step(self, req_ids: list[str]) -> None:
        b = self.batch
        self.step_id += 1
        rows = np.array([b.req_to_row[r] for r in req_ids])
        logits = torch.stack([fake_logits(b.token_ids[r, : b.num_tokens[r]]) for r in rows])
        md = b.make_sampling_metadata(rows, self.stager, self.sampler.rng)
        ids = self.sampler.sample(logits.to(DEVICE), md).token_ids.cpu().numpy()
        positions = b.add_placeholders(rows, self.step_id)
        b.fill_tokens(rows, positions, ids, b.generation[rows].copy(), self.step_id)


SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=12)
PROMPT = [3, 1, 4, 1, 5]


def alone(use_kernel: bool, steps: int = 12) -> list[int]:
    engine = Engine(use_kernel)
    engine.add("s", PROMPT, SEEDED)
    for _ in range(steps):
        engine.step(["s"])
    return engine.finish("s")


@pytest.mark.parametrize("use_kernel", [False, True], ids=["torch", "kernel"])
def test_seeded_request_ignores_its_batch_and_preemption(use_kernel) -> None:
    """The same ids alone; in a batch of others (greedy, unseeded, other seeds and filters,
    coming and going, in changing orders); and preempted mid-way, resumed in another row."""
    expected = alone(use_kernel)
    assert len(set(expected)) > 3, "a spread of tokens"

    engine = Engine(use_kernel)
    others = {
        "g": SamplingParams(temperature=0.0, max_tokens=12),
        "u": SamplingParams(temperature=1.3, top_k=7, max_tokens=12),
        "o": SamplingParams(temperature=0.7, seed=42, min_p=0.05, max_tokens=12),
        "p": SamplingParams(temperature=1.0, presence_penalty=1.0, max_tokens=12),
    }
    engine.add("g", [9, 9], others["g"])
    engine.add("u", [8], others["u"])
    engine.step(["g", "u"])
    engine.add("s", PROMPT, SEEDED)
    engine.add("o", [2, 7, 1], others["o"])
    rng = np.random.default_rng(0)
    live = ["g", "u", "s", "o"]
    resumed_at, held = None, None
    for i in range(12):
        if i == 4:
            engine.add("p", [6, 6, 6], others["p"])
            live.append("p")
        if i == 6:
            engine.finish("g")
            live.remove("g")
        engine.step([live[j] for j in rng.permutation(len(live))])
    got_batch = engine.finish("s")
    assert got_batch == expected

    engine = Engine(use_kernel)
    engine.add("u", [8], others["u"])
    engine.add("s", PROMPT, SEEDED)
    for i in range(12):
        if i == 5:
            held = engine.preempt("s")  # its row goes; others take rows and draw meanwhile
            engine.add("o", [2, 7, 1], others["o"])
            engine.step(["o", "u"])
            engine.step(["u", "o"])
            resumed_at = i
            engine.resume("s", held)
        engine.step(["o", "s", "u"] if resumed_at is not None else ["s", "u"])
    assert resumed_at == 5 and held is not None and len(held) == 5
    assert engine.finish("s") == expected


def test_the_paths_draw_differently_but_each_is_reproducible() -> None:
    torch_ids, kernel_ids = alone(False), alone(True)
    assert torch_ids != kernel_ids, "each path's noise is its own"
    assert alone(False) == torch_ids and alone(True) == kernel_ids
