"""`PipelineStage`: what one pipeline-parallel stage adds to a step (`distributed` PP group).

Every stage runs the same step: each keeps the whole input batch and prepares the same inputs
from the same `SchedulerOutput`, so the token counts agree and nothing but activations and
sampled ids cross. A stage after the first receives the previous stage's hidden states and
residual (`IntermediateTensors`, point to point, same TP rank); a stage before the last sends
its own on and computes no logits; the last stage samples and broadcasts the sampled ids over
the PP group, so every stage's batch holds the same tokens for the next step (the first stage
embeds them). With one stage every call is the plain forward.

NOTE: the stages run one after the other within a step (one step in flight): with N stages
each idles (N - 1) / N of the time; keeping N micro-batches in flight is the next step.
"""

from __future__ import annotations

from typing import Any

import torch

from pagedllm.distributed import get_pp_group
from pagedllm.models.utils import IntermediateTensors


class PipelineStage:
    def __init__(self, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.group = get_pp_group()
        self.enabled = self.group.world_size > 1
        self.is_first, self.is_last = self.group.is_first_rank, self.group.is_last_rank
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device

    def forward(self, model: Any, input_ids: torch.Tensor, positions: torch.Tensor) -> Any:
        """The stage's part of the forward: the hidden states on the last stage, else None
        (its activations went to the next stage)."""
        if not self.enabled:
            return model(input_ids, positions)
        intermediate = None
        if not self.is_first:
            like = torch.empty(
                input_ids.shape[0], self.hidden_size, dtype=self.dtype, device=self.device
            )
            src = self.group.rank_in_group - 1
            intermediate = IntermediateTensors(
                self.group.recv(like, src), self.group.recv(like, src)
            )
        out = model(input_ids, positions, intermediate)
        if self.is_last:
            return out
        dst = self.group.rank_in_group + 1
        self.group.send(out.hidden_states.to(self.dtype), dst)
        self.group.send(out.residual.to(self.dtype), dst)
        return None

    def forward_alone(self, model: Any, input_ids: torch.Tensor, positions: torch.Tensor) -> Any:
        """The stage's forward on zero activations, nothing sent (the memory profile)."""
        if not self.enabled or self.is_first:
            out = model(input_ids, positions)
        else:
            zeros = torch.zeros(
                input_ids.shape[0], self.hidden_size, dtype=self.dtype, device=self.device
            )
            out = model(input_ids, positions, IntermediateTensors(zeros, zeros.clone()))
        return out if self.is_last else None

    def share_sampled(self, token_ids: torch.Tensor | None, num_rows: int) -> torch.Tensor:
        """The step's sampled ids on every stage: the last stage's, broadcast to the others."""
        if not self.enabled:
            assert token_ids is not None
            return token_ids
        if token_ids is None:
            token_ids = torch.empty(num_rows, dtype=torch.int64, device=self.device)
        self.group.broadcast(token_ids, src=self.group.world_size - 1)
        return token_ids
