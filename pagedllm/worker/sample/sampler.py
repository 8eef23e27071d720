"""The sampler: logits of the rows that sample → token ids, and their logprobs.

`Sampler.sample(logits, metadata)` is the one entry point. All rows of a step are sampled
together, each with its own parameters, as whole-batch tensor ops (`ops`). The order is vLLM's:

  the grammar's token bitmask (structured output, when the metadata has one)
  → raw logprobs (log_softmax of those logits, kept for the logprobs output)
  → allowed_token_ids → banned tokens (bad words, stop tokens before min_tokens) → logit_bias
  → repetition / frequency / presence penalties → greedy argmax
  → temperature → min_p → top-k → top-p → random sample.

The draw takes one of two paths, chosen once by the sampler's `SamplingRNG` (`use_kernel`):
on CUDA one Triton pass over the logits (`kernels.sample_rows`: the argmax, or Gumbel-max with
noise hashed from per-row keys), which reads the model's bf16 logits when no row needs them
processed or their logprobs (no fp32 copy), rows with min_p, top-k or top-p masked by the torch
ops first; elsewhere the torch ops and torch generators (the exponential race). The kernel runs
on the CPU only under Triton's interpreter, for tests.

Speculative decoding: `rejection.py` verifies a step's drafts (the n-gram proposer's) on the
target's logits at the draft positions, after temperature and the filters; the requests it
serves have no processors (the scheduler gives drafts to none that needs them), and its
randomness comes from the same `SamplingRNG` (a seeded request's keyed by (seed, output position)).

NOTE: everything stays on the device; the caller brings back only the ids and their logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.worker.sample.logprobs import LogprobsTensors, compute_logprobs
from pagedllm.worker.sample.metadata import SamplingMetadata
from pagedllm.worker.sample.ops import (
    apply_filters,
    apply_logits_processors,
    apply_token_bitmask,
    argmax_rows,
    random_sample,
)
from pagedllm.worker.sample.rng import SamplingRNG


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [R]
    logprobs: LogprobsTensors | None  # None when no row asked for logprobs


def _has_processors(md: SamplingMetadata) -> bool:
    """Whether any row's logits change before the draw, the grammar's bitmask aside."""
    processors = (md.allowed, md.banned, md.logit_bias, md.penalties)
    return any(p is not None for p in processors)


def _has_filters(md: SamplingMetadata) -> bool:
    return not md.all_greedy and any(p is not None for p in (md.min_p, md.top_k, md.top_p))


class Sampler:
    """Samples a step's rows; owns the step's randomness through `rng` (the one RNG owner)."""

    def __init__(
        self,
        use_kernel: bool | None = None,
        *,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        """`use_kernel`: draw with `kernels.sample_rows` (None: when `device` is CUDA; True on
        the CPU needs Triton's interpreter, for tests). `seed`: the engine seed."""
        self.rng = SamplingRNG(seed, torch.device(device), use_kernel)

    @property
    def use_kernel(self) -> bool:
        return self.rng.use_kernel

    def sample(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        """One token id per row of `logits [R, V]` (and their logprobs if any row asked).

        NOTE: fp32 `logits` may be changed in place (the processors work on them)."""
        logits, raw_logprobs = self.process_logits(logits, md)
        token_ids = self.draw(logits, md)
        logprobs = None
        if raw_logprobs is not None:
            assert md.max_num_logprobs is not None
            logprobs = compute_logprobs(raw_logprobs, token_ids, md.max_num_logprobs)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    __call__ = sample  # NOTE: `sampler(logits, md)` is the same call

    def process_logits(
        self, logits: torch.Tensor, md: SamplingMetadata
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logits every draw reads (fp32 unless the kernel can read them as they are), and
        the raw logprobs if a row asked for logprobs."""
        # NOTE: the kernel reads any float dtype: it needs fp32 logits only when they change.
        if not self._kernel_reads_as_is(md):
            logits = logits.float()
            # ----- structured output: the grammar's token bitmask -----
            # NOTE: first, before the raw logprobs (vLLM applies it to the logits it samples
            # from): a token the grammar forbids is never drawn, on either path, greedy or not,
            # and its logprob is -inf. Else the kernel reads the bitmask in its pass (`draw`).
            if md.token_bitmask is not None:
                apply_token_bitmask(logits, md.token_bitmask, md.token_bitmask_rows)
        raw_logprobs = None
        if md.max_num_logprobs is not None:
            raw_logprobs = logits.log_softmax(dim=-1)
        apply_logits_processors(logits, md)
        return logits, raw_logprobs

    def _kernel_reads_as_is(self, md: SamplingMetadata) -> bool:
        """Whether the kernel draws from the model's logits as they are (the grammar's bitmask,
        if any, read in its pass): nothing changes them, filters them or takes their logprobs."""
        return (
            self.use_kernel
            and not _has_processors(md)
            and not _has_filters(md)
            and md.max_num_logprobs is None
        )

    def draw(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """The ids from processed logits (`process_logits`), by the path of `rng`."""
        return self._sample_kernel(logits, md) if self.use_kernel else self._sample(logits, md)

    @staticmethod
    def _sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        if md.all_greedy:
            return argmax_rows(logits)
        assert md.temperature is not None
        greedy_rows = md.temperature == 0
        greedy = None if md.all_random else argmax_rows(logits)
        logits.div_(torch.where(greedy_rows, 1.0, md.temperature).unsqueeze(1))
        logits = apply_filters(logits, md)
        sampled = random_sample(logits.softmax(dim=-1), md.generator, md.generators)
        return sampled if greedy is None else torch.where(greedy_rows, greedy, sampled)

    def _sample_kernel(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """The ids from one pass of `kernels.sample_rows`. Rows with min_p / top-k / top-p get
        the torch masks (on `logits` scaled by 1 / T, as `_sample`), and the kernel then draws
        from `logits` with the masked entries at -inf: a row without those parameters reads
        exactly the values it would read in a batch without them, so a seeded row's draw does
        not depend on its neighbours' parameters. Greedy rows read the unmasked logits."""
        from pagedllm.worker.sample import kernels

        bitmask = index = None
        if md.token_bitmask is not None and self._kernel_reads_as_is(md):
            bitmask, index = md.token_bitmask, _bitmask_index(logits, md)
        if md.all_greedy:
            return kernels.sample_rows(logits, bitmask=bitmask, bitmask_index=index)
        assert md.temperature is not None
        assert md.sample_keys is not None, "the kernel path needs SamplingRNG's sample keys"
        inv_temp = md.inv_temperature
        if inv_temp is None:
            t = md.temperature
            inv_temp = torch.where(t == 0, 0.0, 1.0 / t.clamp_min(1e-30))
        if _has_filters(md):
            greedy_rows = inv_temp == 0
            scaled = logits * torch.where(greedy_rows, 1.0, inv_temp).unsqueeze(1)
            dropped = apply_filters(scaled, md).isneginf()
            if not md.all_random:
                dropped &= ~greedy_rows.unsqueeze(1)
            logits = logits.masked_fill(dropped, float("-inf"))
        return kernels.sample_rows(
            logits, inv_temp, md.sample_keys, bitmask=bitmask, bitmask_index=index
        )


def _bitmask_index(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """int32 [R]: the bitmask row each logits row reads (-1: none)."""
    rows = md.token_bitmask_rows
    n = logits.shape[0]
    if rows is None:
        return torch.arange(n, dtype=torch.int32, device=logits.device)
    index = torch.full((n,), -1, dtype=torch.int32, device=logits.device)
    index[rows] = torch.arange(rows.shape[0], dtype=torch.int32, device=logits.device)
    return index
