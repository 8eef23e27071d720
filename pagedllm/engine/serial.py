"""The wire format between `AsyncLLM` and the engine-core process: msgpack of plain lists.

Every message is `[kind, payload]`. The dataclasses that cross the socket (`Request` with its
`SamplingParams`, `EngineCoreOutput` with its `Logprobs`, `SchedulerStats`) are written as
lists of their fields in a fixed order, so nothing arbitrary is unpickled and the hot path
(one message of outputs per step) stays a single msgpack call.

NOTE: both ends run the same code version (the client spawns the core), so field order is the
only schema; there is no versioning.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import msgpack

from pagedllm.engine.request import FinishReason, Request
from pagedllm.engine.scheduler import EngineCoreOutput
from pagedllm.engine.scheduler_output import Logprobs
from pagedllm.engine.stats import PrefixCacheStats, SchedulerStats
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


class InputKind(enum.IntEnum):
    """Client → core."""

    ADD = 0  # payload: an encoded Request
    ABORT = 1  # payload: request ids
    FINISH = 2  # payload: request ids a stop string ended (finished, not aborted)


class OutputKind(enum.IntEnum):
    """Core → client."""

    OUTPUTS = 0  # payload: [outputs, stats, queue times]
    FAILED = 1  # payload: the error text; the core exits after sending it
    DEAD = 2  # payload: why; sent by the client's own process monitor, never by the core


def pack(kind: int, payload: Any) -> bytes:
    return msgpack.packb([int(kind), payload], use_bin_type=True)


def unpack(data: bytes | memoryview) -> tuple[int, Any]:
    kind, payload = msgpack.unpackb(data, raw=False, strict_map_key=False)
    return kind, payload


# ----- SamplingParams and Request -----

_PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def encode_params(params: SamplingParams) -> list[Any]:
    values: list[Any] = []
    for name in _PARAM_FIELDS:
        value = getattr(params, name)
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, set):
            value = sorted(value)
        values.append(value)
    return values


def decode_params(values: list[Any]) -> SamplingParams:
    """The params as the client validated them (no second validation: `__init__` is skipped)."""
    params = object.__new__(SamplingParams)
    for name, value in zip(_PARAM_FIELDS, values, strict=True):
        setattr(params, name, value)
    params.output_kind = RequestOutputKind(params.output_kind)
    params.all_stop_token_ids = set(params.all_stop_token_ids)
    return params


def encode_request(request: Request) -> list[Any]:
    return [
        request.request_id,
        request.prompt_token_ids,
        encode_params(request.sampling_params),
        list(request.eos_token_ids),
        request.max_model_len,
        request.cache_salt,
    ]


def decode_request(values: list[Any]) -> Request:
    """A fresh `Request` (its arrival order is the core's: the order requests reach it)."""
    request_id, prompt_token_ids, params, eos_token_ids, max_model_len, cache_salt = values
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt_token_ids,
        sampling_params=decode_params(params),
        eos_token_ids=tuple(eos_token_ids),
        max_model_len=max_model_len,
        cache_salt=cache_salt,
    )


# ----- outputs -----


def _encode_logprobs(lp: Logprobs | None) -> list[Any] | None:
    return None if lp is None else [lp.token_ids, lp.logprobs, lp.ranks, lp.start]


def _decode_logprobs(values: list[Any] | None) -> Logprobs | None:
    return None if values is None else Logprobs(*values)


def encode_output(out: EngineCoreOutput) -> list[Any]:
    return [
        out.request_id,
        out.new_token_ids,
        None if out.finish_reason is None else out.finish_reason.value,
        out.stop_reason,
        _encode_logprobs(out.new_logprobs),
        out.num_cached_tokens,
        _encode_logprobs(out.new_prompt_logprobs),
    ]


def decode_output(values: list[Any]) -> EngineCoreOutput:
    req_id, token_ids, finish, stop_reason, logprobs, num_cached, prompt_logprobs = values
    return EngineCoreOutput(
        req_id,
        token_ids,
        None if finish is None else FinishReason(finish),
        stop_reason,
        _decode_logprobs(logprobs),
        num_cached,
        _decode_logprobs(prompt_logprobs),
    )


_STATS_FIELDS = tuple(
    f.name for f in dataclasses.fields(SchedulerStats) if f.name != "prefix_cache_stats"
)


def encode_stats(stats: SchedulerStats) -> list[Any]:
    cache = stats.prefix_cache_stats
    return [getattr(stats, name) for name in _STATS_FIELDS] + [
        cache.requests,
        cache.queries,
        cache.hits,
    ]


def decode_stats(values: list[Any]) -> SchedulerStats:
    n = len(_STATS_FIELDS)
    stats = SchedulerStats(**dict(zip(_STATS_FIELDS, values[:n], strict=True)))
    stats.prefix_cache_stats = PrefixCacheStats(*values[n:])
    return stats


@dataclasses.dataclass
class EngineCoreOutputs:
    """One message from the core: a step's outputs (maybe none), the scheduler's stats after it,
    and the queue time (seconds from reaching the core to first scheduled) of each request
    scheduled for the first time."""

    outputs: list[EngineCoreOutput]
    stats: SchedulerStats
    queue_times: dict[str, float]


def encode_outputs(batch: EngineCoreOutputs) -> bytes:
    payload = [
        [encode_output(o) for o in batch.outputs],
        encode_stats(batch.stats),
        batch.queue_times,
    ]
    return pack(OutputKind.OUTPUTS, payload)


def decode_outputs(payload: list[Any]) -> EngineCoreOutputs:
    outputs, stats, queue_times = payload
    return EngineCoreOutputs([decode_output(o) for o in outputs], decode_stats(stats), queue_times)
