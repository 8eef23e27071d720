"""Persistent per-request state of the worker, held in preallocated host arrays.

Each live request owns a row: its token ids (prompt then output), its block table, and its
sampling parameters as columns of per-row arrays. A step gathers its model inputs and its
`SamplingMetadata` from these rows with vectorized numpy indexing instead of per-request Python.
Per-row token lists (allowed ids, logit bias, stop ids for min_tokens, bad words) are kept as
flat tables of (row, token) entries, rebuilt only when a request that uses them comes or goes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.sampler import (
    MAX_TOP_K_CANDIDATES,
    Penalties,
    SamplingMetadata,
    TokenPairs,
)
from pagedllm.worker.staging import HostStager

ToDevice = Callable[[np.ndarray], torch.Tensor]

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio: splitmix64's increment


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic): a bijection whose output
    bits each depend on every input bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class RowTokenTable:
    """Per-row token-id lists (with optional float values), flattened for vectorized lookup."""

    def __init__(self) -> None:
        self._lists: dict[int, tuple[list[int], list[float]]] = {}
        self._rows = np.zeros(0, np.int64)
        self._ids = np.zeros(0, np.int64)
        self._values = np.zeros(0, np.float32)
        self._dirty = False

    def __bool__(self) -> bool:
        return bool(self._lists)

    def set(self, row: int, ids: list[int], values: list[float] | None = None) -> None:
        self._lists.pop(row, None)
        if ids:
            self._lists[row] = (list(ids), list(values) if values is not None else [])
        self._dirty = True

    def remove(self, row: int) -> None:
        if self._lists.pop(row, None) is not None:
            self._dirty = True

    def select(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The entries of the rows with `pos[row] >= 0`, as (pos[row], token id, value)."""
        if self._dirty:
            self._rebuild()
        sel = pos[self._rows]
        keep = sel >= 0
        return sel[keep], self._ids[keep], self._values[keep] if self._values.size else self._values

    def _rebuild(self) -> None:
        items = list(self._lists.items())
        lens = [len(ids) for _, (ids, _) in items]
        self._rows = np.repeat(np.array([r for r, _ in items], np.int64), lens)
        self._ids = np.array([t for _, (ids, _) in items for t in ids], np.int64)
        values = [v for _, (_, vals) in items for v in vals]
        self._values = np.array(values, np.float32)
        self._dirty = False


class BadWordsTable:
    """Every live row's bad words, flattened: a bad word bans its last token when the row's
    latest output tokens equal the word's other tokens (vLLM's rule)."""

    def __init__(self) -> None:
        self._words: dict[int, list[list[int]]] = {}
        self._dirty = False
        self._rows = np.zeros(0, np.int64)
        self._prefix = np.zeros((0, 0), np.int64)  # right-aligned, padded with -1
        self._prefix_len = np.zeros(0, np.int64)
        self._last = np.zeros(0, np.int64)

    def __bool__(self) -> bool:
        return bool(self._words)

    def set(self, row: int, words: list[list[int]]) -> None:
        self._words.pop(row, None)
        if words:
            self._words[row] = [list(w) for w in words]
        self._dirty = True

    def remove(self, row: int) -> None:
        if self._words.pop(row, None) is not None:
            self._dirty = True

    def _rebuild(self) -> None:
        entries = [(row, w) for row, words in self._words.items() for w in words]
        width = max((len(w) - 1 for _, w in entries), default=0)
        self._rows = np.array([r for r, _ in entries], np.int64)
        self._prefix = np.full((len(entries), width), -1, np.int64)
        for i, (_, w) in enumerate(entries):
            if len(w) > 1:
                self._prefix[i, width - len(w) + 1 :] = w[:-1]
        self._prefix_len = np.array([len(w) - 1 for _, w in entries], np.int64)
        self._last = np.array([w[-1] for _, w in entries], np.int64)
        self._dirty = False

    def banned(
        self, pos: np.ndarray, token_ids: np.ndarray, num_tokens: np.ndarray, num_prompt: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(pos[row], token id) of each bad word whose prefix ends the row's output tokens."""
        if self._dirty:
            self._rebuild()
        sel = pos[self._rows] >= 0
        rows, prefix, plen = self._rows[sel], self._prefix[sel], self._prefix_len[sel]
        width = prefix.shape[1]
        match = (num_tokens[rows] - num_prompt[rows]) >= plen
        if width:
            cols = num_tokens[rows][:, None] - width + np.arange(width)
            toks = token_ids[rows[:, None], np.maximum(cols, 0)]
            needed = np.arange(width)[None, :] >= width - plen[:, None]
            match &= ((toks == prefix) | ~needed).all(axis=1)
        return pos[rows[match]], self._last[sel][match]


class InputBatch:
    def __init__(
        self,
        max_num_reqs: int,
        max_model_len: int,
        max_blocks_per_req: int,
        eos_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.max_num_reqs = max_num_reqs
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int32)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_prompt_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)
        # Sampling parameters, one column each; off values: top_k 0, top_p 1, min_p 0, no penalty.
        self.temperature = np.zeros(max_num_reqs, dtype=np.float32)
        self.top_k = np.zeros(max_num_reqs, dtype=np.int64)
        self.top_p = np.ones(max_num_reqs, dtype=np.float32)
        self.min_p = np.zeros(max_num_reqs, dtype=np.float32)
        self.presence_penalty = np.zeros(max_num_reqs, dtype=np.float32)
        self.frequency_penalty = np.zeros(max_num_reqs, dtype=np.float32)
        self.repetition_penalty = np.ones(max_num_reqs, dtype=np.float32)
        self.min_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_logprobs = np.full(max_num_reqs, -1, dtype=np.int64)  # -1: none asked
        self.num_prompt_logprobs = np.full(max_num_reqs, -1, dtype=np.int64)
        self.generators: dict[int, torch.Generator] = {}  # row → generator of a seeded request
        self.seeded = np.zeros(max_num_reqs, dtype=bool)
        self.has_seed = np.zeros(max_num_reqs, dtype=bool)  # the kernel path's seeded rows
        self.seed_keys = np.zeros(max_num_reqs, dtype=np.uint64)  # their mix64(seed)
        self.allowed_token_ids = RowTokenTable()
        self.logit_bias = RowTokenTable()
        self.min_tokens_stop_ids = RowTokenTable()
        self.bad_words = BadWordsTable()
        self.req_to_row: dict[str, int] = {}
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))
        # Bumped whenever a row gets a new request: a step's results go only to rows whose
        # generation is still the one it was launched with.
        self.generation = np.zeros(max_num_reqs, dtype=np.int64)
        # A row whose last token was sampled by a step still in flight: that step's id (else -1)
        # and the token's index among the step's sampled ids (on the device).
        self.pending_step = np.full(max_num_reqs, -1, dtype=np.int64)
        self.pending_index = np.zeros(max_num_reqs, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.req_to_row)

    def add_request(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        output_token_ids: list[int],
        block_ids: list[int],
        sampling_params: SamplingParams,
        generator: torch.Generator | None = None,
    ) -> int:
        assert req_id not in self.req_to_row, f"request {req_id} is already in the batch"
        row = self._free_rows.pop()
        self.req_to_row[req_id] = row
        num_prompt = len(prompt_token_ids)
        n = num_prompt + len(output_token_ids)
        self.token_ids[row, :num_prompt] = prompt_token_ids
        self.token_ids[row, num_prompt:n] = output_token_ids
        self.num_tokens[row] = n
        self.num_prompt_tokens[row] = num_prompt
        self.generation[row] += 1
        self.pending_step[row] = -1
        self.num_blocks[row] = 0
        self.append_block_ids(row, block_ids)
        self._set_sampling_params(row, sampling_params)
        self.seeded[row] = generator is not None
        if generator is not None:
            self.generators[row] = generator
        self.has_seed[row] = sampling_params.seed is not None
        if sampling_params.seed is not None:
            self.seed_keys[row] = mix64(np.array([sampling_params.seed & _MASK64], np.uint64))[0]
        return row

    def _set_sampling_params(self, row: int, sp: SamplingParams) -> None:
        self.temperature[row] = sp.temperature
        self.top_k[row] = sp.top_k
        self.top_p[row] = sp.top_p
        self.min_p[row] = sp.min_p
        self.presence_penalty[row] = sp.presence_penalty
        self.frequency_penalty[row] = sp.frequency_penalty
        self.repetition_penalty[row] = sp.repetition_penalty
        self.min_tokens[row] = sp.min_tokens
        self.num_logprobs[row] = -1 if sp.logprobs is None else sp.logprobs
        self.num_prompt_logprobs[row] = -1 if sp.prompt_logprobs is None else sp.prompt_logprobs
        if sp.allowed_token_ids:
            self.allowed_token_ids.set(row, sorted(set(sp.allowed_token_ids)))
        if sp.logit_bias:
            self.logit_bias.set(row, list(sp.logit_bias), list(sp.logit_bias.values()))
        if sp.min_tokens > 0:
            stop_ids = set(sp.all_stop_token_ids)
            if not sp.ignore_eos:
                stop_ids.update(self.eos_token_ids)
            self.min_tokens_stop_ids.set(row, sorted(stop_ids))
        if sp.bad_words_token_ids:
            self.bad_words.set(row, sp.bad_words_token_ids)

    def remove_request(self, req_id: str) -> None:
        row = self.req_to_row.pop(req_id, None)
        if row is None:
            return
        self.generators.pop(row, None)
        self.seeded[row] = False
        self.has_seed[row] = False
        for table in (self.allowed_token_ids, self.logit_bias, self.min_tokens_stop_ids):
            table.remove(row)
        self.bad_words.remove(row)
        self._free_rows.append(row)

    def append_block_ids(self, row: int, block_ids: list[int]) -> None:
        if not block_ids:
            return
        start = int(self.num_blocks[row])
        self.block_table[row, start : start + len(block_ids)] = block_ids
        self.num_blocks[row] = start + len(block_ids)

    def add_placeholders(self, rows: np.ndarray, step_id: int) -> np.ndarray:
        """Counts the token step `step_id` samples for each of `rows` (in sampling order) before
        its id is known; returns the positions the ids go to (`fill_tokens`)."""
        positions = self.num_tokens[rows].copy()
        self.num_tokens[rows] += 1
        self.pending_step[rows] = step_id
        self.pending_index[rows] = np.arange(len(rows))
        return positions

    def fill_tokens(
        self,
        rows: np.ndarray,
        positions: np.ndarray,
        token_ids: np.ndarray,
        generations: np.ndarray,
        step_id: int,
    ) -> None:
        """Writes the ids step `step_id` sampled, skipping rows that changed hands since."""
        keep = self.generation[rows] == generations
        rows = rows[keep]
        self.token_ids[rows, positions[keep]] = token_ids[keep]
        done = rows[self.pending_step[rows] == step_id]
        self.pending_step[done] = -1

    # ----- sampling metadata -----

    def make_sampling_metadata(
        self,
        rows: np.ndarray,
        stager: HostStager,
        generator: torch.Generator | None,
        step_key: int | None = None,
    ) -> SamplingMetadata:
        """The sampling parameters of `rows` (the rows that sample this step, in logits order),
        copied to the device through `stager`. `step_key`: this step's random key (the runner's
        host RNG), from which the unseeded rows' noise keys come; None when the sampler takes
        the torch path, which needs no keys."""
        dev = stager.to_device
        temperature = self.temperature[rows]
        all_greedy = bool((temperature == 0).all())
        md = SamplingMetadata(all_greedy=all_greedy, all_random=bool((temperature != 0).all()))
        num_logprobs = int(self.num_logprobs[rows].max(initial=-1))
        md.max_num_logprobs = None if num_logprobs < 0 else num_logprobs
        pos = np.full(self.max_num_reqs, -1, np.int64)
        pos[rows] = np.arange(len(rows))
        self._add_token_masks(md, rows, pos, dev)
        md.penalties = self._penalties(rows, dev)
        if all_greedy:
            return md
        md.temperature = dev(temperature)
        if step_key is not None:
            inv_temperature = np.zeros_like(temperature)
            np.divide(1, temperature, out=inv_temperature, where=temperature != 0)
            md.inv_temperature = dev(inv_temperature)
            md.sample_keys = dev(self.sample_keys(rows, step_key).view(np.int64))
        md.generator = generator
        if self.generators:
            seeded = np.flatnonzero(self.seeded[rows])
            md.generators = {int(i): self.generators[int(rows[i])] for i in seeded}
        top_k = self.top_k[rows]
        if top_k.any():
            md.top_k, md.max_top_k = dev(top_k), int(top_k.max())
            md.top_k_in_all_rows = bool(top_k.all()) and md.max_top_k <= MAX_TOP_K_CANDIDATES
        top_p = self.top_p[rows]
        if (top_p < 1).any():
            md.top_p = dev(top_p)
        min_p = self.min_p[rows]
        if min_p.any():
            md.min_p = dev(min_p)
        return md

    def sample_keys(self, rows: np.ndarray, step_key: int) -> np.ndarray:
        """The rows' 64-bit noise keys (uint64) for `sample_kernels`. A seeded row's depends only
        on its seed and the output position being sampled (`num_tokens` counts the ids of steps
        still in flight), so it is the same in any batch, after a preemption and with async
        scheduling; an unseeded row's mixes `step_key` with the row's index in the step."""
        has_seed = self.has_seed[rows]
        position = (self.num_tokens[rows] - self.num_prompt_tokens[rows]).astype(np.uint64)
        counter = np.where(has_seed, position, np.arange(len(rows), dtype=np.uint64))
        base = np.where(has_seed, self.seed_keys[rows], np.uint64(step_key & _MASK64))
        return mix64(base + counter * _GOLDEN)

    def _add_token_masks(
        self, md: SamplingMetadata, rows: np.ndarray, pos: np.ndarray, dev: ToDevice
    ) -> None:
        if self.allowed_token_ids:
            r, ids, _ = self.allowed_token_ids.select(pos)
            if r.size:
                md.allowed = TokenPairs(dev(r), dev(ids))
                md.allowed_rows = dev(np.unique(r))
        if self.logit_bias:
            r, ids, vals = self.logit_bias.select(pos)
            if r.size:
                md.logit_bias = TokenPairs(dev(r), dev(ids), dev(vals))
        banned_rows, banned_ids = [], []
        if self.min_tokens_stop_ids:
            num_output = self.num_tokens - self.num_prompt_tokens
            early = np.where(num_output < self.min_tokens, pos, -1)
            r, ids, _ = self.min_tokens_stop_ids.select(early)
            banned_rows.append(r)
            banned_ids.append(ids)
        if self.bad_words:
            r, ids = self.bad_words.banned(
                pos, self.token_ids, self.num_tokens, self.num_prompt_tokens
            )
            banned_rows.append(r)
            banned_ids.append(ids)
        if banned_rows and sum(r.size for r in banned_rows):
            md.banned = TokenPairs(
                dev(np.concatenate(banned_rows)), dev(np.concatenate(banned_ids))
            )

    def _penalties(self, rows: np.ndarray, dev: ToDevice) -> Penalties | None:
        presence = self.presence_penalty[rows]
        frequency = self.frequency_penalty[rows]
        repetition = self.repetition_penalty[rows]
        which = np.flatnonzero((presence != 0) | (frequency != 0) | (repetition != 1))
        if not which.size:
            return None
        prow = rows[which]
        num_tokens, num_prompt = self.num_tokens[prow], self.num_prompt_tokens[prow]
        cols = np.arange(int(num_tokens.max()))
        prompt_mask = cols[None, :] < num_prompt[:, None]
        output_mask = ~prompt_mask & (cols[None, :] < num_tokens[:, None])
        tokens = self.token_ids[prow, : cols.size].astype(np.int64)
        return Penalties(
            rows=dev(which),
            presence=dev(presence[which]),
            frequency=dev(frequency[which]),
            repetition=dev(repetition[which]),
            token_ids=dev(tokens),
            prompt_mask=dev(prompt_mask),
            output_mask=dev(output_mask),
        )
