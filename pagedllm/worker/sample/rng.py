"""`SamplingRNG`: the one owner of sampling's randomness.

Which path draws the random rows is decided once, here (`SamplingRNG.use_kernel`: the one-pass
kernel on CUDA, the torch ops elsewhere), because the two paths need different randomness:

- the kernel path (`kernels.sample_rows`) hashes each row's Gumbel noise from a 64-bit key.
  A seeded row's key comes from its seed's key (`seed_key`, kept in the input batch's
  `seed_keys` column) and the output position being sampled; an unseeded row's from this step's
  key (`next_step_key`: one draw per step from a numpy generator seeded with the engine seed)
  and the row's index among the step's rows (`sample_keys`).
- the torch path (`ops.random_sample`) draws exponential noise from torch generators: the
  unseeded rows share `generator` (seeded with the engine seed, drawn in row order); a seeded
  request draws from its own (seeded with its seed), made when it first enters the batch and
  kept by request id until it finishes (`add_request` / `finish_request`), so that it outlives
  its preemptions.

Per row the input batch keeps one flag, `seeded` (the request has a seed), and the seed's key;
whether a seeded row then draws from its key or from its generator is `use_kernel`.
(It replaces two flags: `has_seed`, read by the kernel path's keys, and `seeded`, "has a torch
generator", which was has_seed on the torch path only.)

NOTE: a seeded request's draws depend on nothing but its seed and its tokens: not on the batch
around it, on preemption and recomputation, or on async scheduling (the kernel path: its key is
a function of (seed, output position), and the placeholders of steps in flight count in the
position; the torch path: its generator draws only for its own row, once per sampled token).
Unseeded rows are reproducible only for the same sequence of steps from the engine seed.
"""

from __future__ import annotations

import numpy as np
import torch

MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: splitmix64's increment


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic): a bijection whose output
    bits each depend on every input bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class SamplingRNG:
    """The engine seed, the per-step key of the kernel path, the torch generators of the torch
    path (the unseeded rows' and each seeded request's), and the seeded rows' keys."""

    def __init__(self, seed: int, device: torch.device, use_kernel: bool | None = None) -> None:
        """`use_kernel`: random rows are drawn by `kernels.sample_rows` (None: when `device` is
        CUDA; True on the CPU needs Triton's interpreter, for tests)."""
        self.seed = seed
        self.use_kernel = device.type == "cuda" if use_kernel is None else use_kernel
        # The torch path's unseeded rows.
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self._device = device
        # The kernel path's unseeded rows: one key per step, drawn on the host (no device sync).
        self._step_rng = np.random.default_rng(seed)
        # The torch path's seeded requests, by request id.
        self._generators: dict[str, torch.Generator] = {}

    # ----- requests -----

    def add_request(self, req_id: str, seed: int | None) -> None:
        """A request enters the batch (new, or resumed after a preemption): on the torch path a
        seeded one gets its generator, or gets back the one it had."""
        if seed is None or self.use_kernel or req_id in self._generators:
            return
        gen = torch.Generator(device=self._device)
        gen.manual_seed(seed)
        self._generators[req_id] = gen

    def finish_request(self, req_id: str) -> None:
        """A request ended (or failed): its generator goes. Not for a preemption."""
        self._generators.pop(req_id, None)

    def generator_of(self, req_id: str) -> torch.Generator:
        """The torch path's generator of a seeded request (`add_request` made it)."""
        return self._generators[req_id]

    # ----- steps -----

    def next_step_key(self) -> int | None:
        """This step's key of the kernel path's unseeded rows (None on the torch path).

        NOTE: drawn once per step, greedy or not (`build_sampling_metadata`), so a step's key
        depends only on the engine seed and the number of steps before it."""
        if not self.use_kernel:
            return None
        return int(self._step_rng.integers(1 << 63))

    @staticmethod
    def seed_key(seed: int) -> np.uint64:
        """A seed's 64-bit key (any seed of the 64-bit range, negative ones as two's
        complement): the base of its row's noise keys on the kernel path."""
        return mix64(np.array([seed & MASK64], np.uint64))[0]

    @staticmethod
    def sample_keys(
        seeded: np.ndarray, seed_keys: np.ndarray, positions: np.ndarray, step_key: int
    ) -> np.ndarray:
        """The rows' 64-bit noise keys (uint64 [R]) for `kernels.sample_rows`, from their
        `seeded` flags, `seed_keys` and output `positions` (the index of the output token being
        sampled). A seeded row's depends only on its seed and its position; an unseeded row's
        mixes `step_key` with the row's index among the `R` rows."""
        counter = np.where(
            seeded, positions.astype(np.uint64), np.arange(len(seeded), dtype=np.uint64)
        )
        base = np.where(seeded, seed_keys, np.uint64(step_key & MASK64))
        return mix64(base + counter * _GOLDEN)
