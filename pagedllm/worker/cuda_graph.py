"""CUDA graphs for decode steps: the model's forward pass replayed for padded batch sizes.

A decode step (every request contributes one query token) launches hundreds of small kernels;
replaying a captured graph removes their launch cost. One graph is captured per size in
`capture_sizes` (1, 2, 4, 8, then multiples of 16); a step of `B` requests replays the smallest
graph of `G >= B` rows, with rows `B..G` as padding. Larger or mixed (prompt) steps run eagerly.

The graphs read the token ids and positions from static device buffers owned here, and the
attention metadata from the static buffers of the attention backend's builder
(`AttentionMetadataBuilder.init_graph_buffers`); the runner copies a step's inputs into both
before `replay`. Padding rows are inert for attention (the builder's concern); their hidden rows
hold garbage, which nothing reads.

NOTE: only backends that launch without reading metadata tensors on the host can be captured
(`AttentionImpl.cuda_graph_safe`).
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from pagedllm.attention.backend import AttentionMetadataBuilder
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
        attn_builder: AttentionMetadataBuilder,
        max_blocks_per_req: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.sizes = sorted(sizes)
        self.attn_builder = attn_builder
        n = self.sizes[-1]
        attn_builder.init_graph_buffers(n, max_blocks_per_req)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def padded_size(self, num_reqs: int) -> int | None:
        """The graph size a decode step of `num_reqs` requests replays, or None (run eagerly)."""
        i = bisect.bisect_left(self.sizes, num_reqs)
        return self.sizes[i] if i < len(self.sizes) else None

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every size, largest first, sharing one memory pool."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            md = self.attn_builder.graph_metadata(size)
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
