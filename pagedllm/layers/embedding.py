"""Token embedding and the LM head, both split over tensor-parallel ranks by vocabulary rows.

Rank r holds rows `[r * n, (r + 1) * n)` with `n = ceil(vocab_size / tp)`; rows past the vocab
(on the last rank) are zero. The embedding sums the ranks' partial lookups; the LM head gathers
the ranks' logit columns and trims them to the vocab.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.distributed import (
    get_tp_rank,
    get_tp_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from pagedllm.layers.linear import apply_linear


class VocabParallelEmbedding(nn.Module):
    """`ids [...] → [..., embedding_dim]`, the vocabulary split across ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tp_size = get_tp_size()
        self.tp_rank = get_tp_rank()
        self.num_embeddings_per_partition = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_per_partition, embedding_dim), requires_grad=False
        )
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None
    ) -> None:
        """Copies this rank's vocabulary rows of the full `[vocab, dim]` checkpoint tensor."""
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} is not fused; got shard_id={shard_id!r}")
        if tuple(loaded_weight.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"checkpoint tensor {tuple(loaded_weight.shape)} does not match vocab "
                f"{self.num_embeddings} x dim {self.embedding_dim}"
            )
        rows = self.vocab_end - self.vocab_start
        param.data[:rows].copy_(loaded_weight[self.vocab_start : self.vocab_end])
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_range, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(~in_range.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(out)

    def extra_repr(self) -> str:
        return f"vocab={self.num_embeddings}, dim={self.embedding_dim}, tp={self.tp_size}"


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states → logits over the vocabulary (`hidden [N, dim] → logits [N, vocab]`).

    For tied embeddings the model assigns the embedding's parameter to `weight`. The matmul goes
    through `apply_linear`, so decode steps' few rows take the GEMV (the LM head is the largest
    weight read of a step).
    """

    def __init__(
        self, num_embeddings: int, embedding_dim: int, use_gemv: bool | None = None
    ) -> None:
        """`use_gemv`: the GEMV for few rows on CUDA (None: the environment's default)."""
        super().__init__(num_embeddings, embedding_dim)
        self.use_gemv = use_gemv

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = apply_linear(hidden_states, self.weight, use_gemv=self.use_gemv)
        if self.tp_size == 1:
            return logits
        return tensor_model_parallel_all_gather(logits, dim=-1)[..., : self.num_embeddings]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.compute_logits(hidden_states)
