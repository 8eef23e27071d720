"""Sampling: a step's logits → token ids and logprobs, with one owner of the randomness.

- `sampler.py`: `Sampler.sample(logits, metadata)`, the one entry point (kernel or torch path).
- `ops.py`: the torch ops (bitmask, processors, penalties, filters, argmax, random draw).
- `kernels.py`: the one-pass Triton sampling kernel (imported only when used: CUDA, tests).
- `metadata.py`: `SamplingMetadata` and its builder from the input batch's columns.
- `tables.py`: the per-row token lists (allowed ids, logit bias, stop ids, bad words).
- `rng.py`: `SamplingRNG`, the one RNG owner (engine seed, step keys, seeded generators).
- `logprobs.py`: logprobs of sampled and prompt tokens, on the device and on the host.
- `rejection.py`: the rejection sampler of speculative decoding (exact verification of drafts).

The model runner holds one `Sampler` (its `rng` lives as long as the runner) and calls
`sampler.rng.add_request` / `finish_request` as requests come and go,
`InputBatch.make_sampling_metadata(rows, stager, sampler.rng)` and `sampler.sample` each step.
"""

from pagedllm.worker.sample.logprobs import (
    HostLogprobs,
    LogprobsTensors,
    compute_logprobs,
    compute_prompt_logprobs,
)
from pagedllm.worker.sample.metadata import SamplingMetadata, build_sampling_metadata
from pagedllm.worker.sample.rng import SamplingRNG
from pagedllm.worker.sample.sampler import Sampler, SamplerOutput

__all__ = [
    "HostLogprobs",
    "LogprobsTensors",
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "SamplingRNG",
    "build_sampling_metadata",
    "compute_logprobs",
    "compute_prompt_logprobs",
]
