"""Persistent per-request state of the worker, held in preallocated host arrays.

Each live request owns a row: its token ids (prompt then output), its block table, and its
sampling parameters as columns of per-row arrays. A step gathers its model inputs from these
rows with vectorized numpy indexing instead of per-request Python, and its `SamplingMetadata`
(`sample.metadata.build_sampling_metadata` reads the columns). Per-row token lists (allowed ids,
logit bias, stop ids for min_tokens, bad words) are kept in `sample.tables`' flat tables.
"""

from __future__ import annotations

import numpy as np

from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.sample.metadata import SamplingMetadata, build_sampling_metadata
from pagedllm.worker.sample.rng import SamplingRNG
from pagedllm.worker.sample.tables import BadWordsTable, RowTokenTable
from pagedllm.worker.staging import HostStager


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
        # NOTE: one flag, whatever the path: `SamplingRNG.use_kernel` says what a seeded row
        # draws from (its key, or its request's generator).
        self.seeded = np.zeros(max_num_reqs, dtype=bool)  # the request has a seed
        self.seed_keys = np.zeros(max_num_reqs, dtype=np.uint64)  # SamplingRNG.seed_key(seed)
        self.allowed_token_ids = RowTokenTable()
        self.logit_bias = RowTokenTable()
        self.min_tokens_stop_ids = RowTokenTable()
        self.bad_words = BadWordsTable()
        self.req_to_row: dict[str, int] = {}
        self.row_req_ids: list[str | None] = [None] * max_num_reqs
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
    ) -> int:
        assert req_id not in self.req_to_row, f"request {req_id} is already in the batch"
        row = self._free_rows.pop()
        self.req_to_row[req_id] = row
        self.row_req_ids[row] = req_id
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
        self.seeded[row] = sp.seed is not None
        if sp.seed is not None:
            self.seed_keys[row] = SamplingRNG.seed_key(sp.seed)
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
        self.row_req_ids[row] = None
        self.seeded[row] = False
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
        self, rows: np.ndarray, stager: HostStager, rng: SamplingRNG
    ) -> SamplingMetadata:
        """The sampling metadata of `rows` (the rows that sample this step, in logits order):
        `sample.metadata.build_sampling_metadata` over this batch's columns (the runner's one
        call, which `benchmarks/profile_step.py` times by this name)."""
        return build_sampling_metadata(self, rows, stager, rng)
