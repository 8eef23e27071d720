"""CUDA graphs for decode steps: the model's forward pass replayed for padded batch sizes.

A decode step (every request contributes one query token) launches hundreds of small kernels;
replaying a captured graph removes their launch cost. One graph is captured per size in
`capture_sizes` (1, 2, 4, 8, then multiples of 16); a step of `B` requests replays the smallest
graph of `G >= B` rows, with rows `B..G` as padding. Larger or mixed (prompt) steps run eagerly.

The graphs read their inputs from static device buffers owned here; the runner copies a step's
inputs into them before `replay`. Padding rows are inert: slot -1 (the K/V write skips it), an
empty query range (`query_start_loc` stays at `B`), context length 0 and the last places of the
decode order, so the attention kernel reads nothing for them. Their hidden rows hold garbage,
which nothing reads.

NOTE: the attention metadata's host ints are frozen at capture: `max_seq_len` is the model's
`max_model_len`, so the Triton backend's KV-split count is the one for the longest context (the
kernel sizes each split from the request's true length). Only backends that launch without reading
metadata tensors on the host can be captured (`AttentionImpl.cuda_graph_safe`).
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.forward_context import set_forward_context
from pagedllm.models.interface import CausalLM
from pagedllm.worker.buckets import row_buckets

logger = logging.getLogger(__name__)

MAX_CAPTURE_SIZE = 512


def capture_sizes(max_num_reqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, ... (steps of 16) up to `max_num_reqs` (capped at 512), which is
    always included: the row buckets up to there, so a decode step's LM head rows (padded the
    same way) are rows of its graph's output."""
    return row_buckets(min(max_num_reqs, MAX_CAPTURE_SIZE))


class CudaGraphRunner:
    def __init__(
        self,
        model: CausalLM,
        sizes: list[int],
        max_blocks_per_req: int,
        max_model_len: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.sizes = sorted(sizes)
        self.max_model_len = max_model_len
        n = self.sizes[-1]
        i64, i32 = torch.int64, torch.int32
        self.input_ids = torch.zeros(n, dtype=i64, device=device)
        self.positions = torch.zeros(n, dtype=i64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=i64, device=device)
        self.seq_lens = torch.zeros(n, dtype=i32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=i32, device=device)
        self.decode_order = torch.arange(n, dtype=i32, device=device)
        self.block_table = torch.zeros(n, max_blocks_per_req, dtype=i32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._metadata: dict[int, AttentionMetadata] = {}
        self.num_replays = 0

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def padded_size(self, num_reqs: int) -> int | None:
        """The graph size a decode step of `num_reqs` requests replays, or None (run eagerly)."""
        i = bisect.bisect_left(self.sizes, num_reqs)
        return self.sizes[i] if i < len(self.sizes) else None

    def metadata(self, size: int) -> AttentionMetadata:
        """The attention metadata the graph of `size` rows was captured with (static buffers)."""
        if size not in self._metadata:
            self._metadata[size] = self._make_metadata(size)
        return self._metadata[size]

    def _make_metadata(self, size: int) -> AttentionMetadata:
        qsl = self.query_start_loc[: size + 1]
        seq_lens = self.seq_lens[:size]
        return AttentionMetadata(
            num_reqs=size,
            num_actual_tokens=size,
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_start_loc=qsl,
            seq_lens=seq_lens,
            block_table=self.block_table[:size],
            slot_mapping=self.slot_mapping[:size],
            # NOTE: graph-safe backends never read the host copies; these only fill the fields.
            query_start_loc_cpu=torch.arange(size + 1, dtype=torch.int32),
            seq_lens_cpu=torch.zeros(size, dtype=torch.int32),
            decode_order=self.decode_order[:size],
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every size, largest first, sharing one memory pool."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            md = self.metadata(size)
            ids, pos = self.input_ids[:size], self.positions[:size]
            with set_forward_context(md):
                self.model(ids, pos)  # warm-up: Triton compiles, cuBLAS picks its kernels
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._outputs[size] = self.model(ids, pos)
            self._graphs[size] = graph
        torch.cuda.synchronize()
        logger.info(
            "captured CUDA graphs for %d decode batch sizes (1..%d) in %.1f s",
            len(self.sizes),
            self.max_size,
            time.perf_counter() - start,
        )

    def replay(self, size: int) -> torch.Tensor:
        """Runs the graph of `size` rows on the current static inputs; its hidden states."""
        self._graphs[size].replay()
        self.num_replays += 1
        return self._outputs[size]
