"""The sampler: logits of the rows that sample → token ids (greedy and temperature here).

NOTE: everything stays on the device; the caller brings back only the ids and their logprobs.
The returned logprob is that of the model's raw distribution (before temperature), as vLLM's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor  # float32 [num_rows], 0 for greedy rows
    all_greedy: bool
    all_random: bool
    generator: torch.Generator | None = None


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [num_rows]
    logprobs: torch.Tensor  # float32 [num_rows], raw-distribution logprob of each sampled id


def random_sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Samples one id per row from `probs` without a host sync (the exponential-race trick:
    argmax(p / E) with E ~ Exp(1) is distributed as p)."""
    q = torch.empty_like(probs).exponential_(generator=generator)
    return probs.div_(q).argmax(dim=-1)


class Sampler:
    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()
        greedy = logits.argmax(dim=-1) if not md.all_random else None
        if md.all_greedy:
            assert greedy is not None
            token_ids = greedy
        else:
            temperature = md.temperature.clamp_min(_MIN_TEMPERATURE).unsqueeze(1)
            probs = torch.softmax(logits / temperature, dim=-1)
            sampled = random_sample(probs, md.generator)
            token_ids = (
                sampled if greedy is None else torch.where(md.temperature == 0, greedy, sampled)
            )
        logprobs = logits.gather(1, token_ids.unsqueeze(1)).squeeze(1) - logits.logsumexp(dim=-1)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)
