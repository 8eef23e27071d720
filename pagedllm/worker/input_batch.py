"""Persistent per-request state of the worker, held in preallocated host arrays.

Each live request owns a row: its token ids, its block table, and its sampling parameters. A step
gathers its inputs from these rows with vectorized numpy indexing instead of per-token Python.
"""

from __future__ import annotations

import numpy as np

from pagedllm.sampling_params import SamplingParams


class InputBatch:
    def __init__(self, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int) -> None:
        self.max_num_reqs = max_num_reqs
        self.max_model_len = max_model_len
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int32)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)
        self.temperature = np.zeros(max_num_reqs, dtype=np.float32)
        self.sampling_params: list[SamplingParams | None] = [None] * max_num_reqs
        self.req_to_row: dict[str, int] = {}
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.req_to_row)

    def add_request(
        self,
        req_id: str,
        token_ids: list[int],
        block_ids: list[int],
        sampling_params: SamplingParams,
    ) -> int:
        assert req_id not in self.req_to_row, f"request {req_id} is already in the batch"
        row = self._free_rows.pop()
        self.req_to_row[req_id] = row
        n = len(token_ids)
        self.token_ids[row, :n] = token_ids
        self.num_tokens[row] = n
        self.num_blocks[row] = 0
        self.append_block_ids(row, block_ids)
        self.temperature[row] = sampling_params.temperature
        self.sampling_params[row] = sampling_params
        return row

    def remove_request(self, req_id: str) -> None:
        row = self.req_to_row.pop(req_id, None)
        if row is not None:
            self.sampling_params[row] = None
            self._free_rows.append(row)

    def append_block_ids(self, row: int, block_ids: list[int]) -> None:
        if not block_ids:
            return
        start = int(self.num_blocks[row])
        self.block_table[row, start : start + len(block_ids)] = block_ids
        self.num_blocks[row] = start + len(block_ids)

    def append_tokens(self, rows: np.ndarray, token_ids: np.ndarray) -> None:
        """Appends one token to each of `rows`."""
        self.token_ids[rows, self.num_tokens[rows]] = token_ids
        self.num_tokens[rows] += 1
