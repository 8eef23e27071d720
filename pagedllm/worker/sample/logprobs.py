"""Logprobs: of the sampled tokens and of the prompt tokens, on the device and back on the host.

A row's logprobs are the chosen token's, its rank, and the top-N of the row, all from the raw
distribution: `log_softmax` of the fp32 logits before the sampling parameters' processors (after
a grammar's bitmask, as in vLLM). `LogprobsTensors` stay on the device until the step's one copy
to the host; `HostLogprobs` turns the copied arrays into the engine's per-request `Logprobs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.engine.outputs import Logprobs


@dataclass
class LogprobsTensors:
    """Per row: the chosen token then the top-N, their raw logprobs, and the chosen one's rank."""

    token_ids: torch.Tensor  # int64 [R, 1 + N]
    logprobs: torch.Tensor  # float32 [R, 1 + N]
    ranks: torch.Tensor  # int64 [R]


def compute_logprobs(
    raw_logprobs: torch.Tensor, chosen: torch.Tensor, num_logprobs: int
) -> LogprobsTensors:
    """The chosen ids' logprobs and ranks, and the top-`num_logprobs` of each row."""
    chosen_lp = raw_logprobs.gather(1, chosen.unsqueeze(1))
    ranks = (raw_logprobs >= chosen_lp).sum(dim=-1)
    if num_logprobs > 0:
        top_lp, top_ids = raw_logprobs.topk(num_logprobs, dim=-1)
        ids = torch.cat([chosen.unsqueeze(1), top_ids], dim=1)
        lps = torch.cat([chosen_lp, top_lp], dim=1)
    else:
        ids, lps = chosen.unsqueeze(1), chosen_lp
    return LogprobsTensors(token_ids=ids, logprobs=lps, ranks=ranks)


def compute_prompt_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, num_logprobs: int
) -> LogprobsTensors:
    """Prompt logprobs: row j of `logits` (any float dtype) predicts prompt token `targets[j]`."""
    return compute_logprobs(logits.float().log_softmax(dim=-1), targets, num_logprobs)


@dataclass
class HostLogprobs:
    """`LogprobsTensors` brought to the host."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    ranks: np.ndarray

    def rows(self, begin: int, end: int, num_logprobs: int, start: int = 0) -> Logprobs:
        """Rows [begin, end) with the chosen token and the top-`num_logprobs`."""
        width = 1 + num_logprobs
        return Logprobs(
            token_ids=self.token_ids[begin:end, :width].tolist(),
            logprobs=self.logprobs[begin:end, :width].tolist(),
            ranks=self.ranks[begin:end].tolist(),
            start=start,
        )
