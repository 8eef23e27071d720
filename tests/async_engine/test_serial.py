"""The engine-core wire format: every field of a request and of an output survives the trip."""

from __future__ import annotations

import dataclasses

from pagedllm.engine import serial
from pagedllm.engine.request import FinishReason, Request
from pagedllm.engine.scheduler import EngineCoreOutput
from pagedllm.engine.scheduler_output import Logprobs
from pagedllm.engine.stats import PrefixCacheStats, SchedulerStats
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


def roundtrip(kind, payload):
    got_kind, got = serial.unpack(serial.pack(kind, payload))
    assert got_kind == kind
    return got


def test_request_roundtrip_keeps_every_sampling_field() -> None:
    params = SamplingParams(
        n=1,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        repetition_penalty=1.2,
        temperature=0.7,
        top_p=0.9,
        top_k=7,
        min_p=0.05,
        seed=123,
        stop=["a", "bc"],
        stop_token_ids=[4, 9],
        bad_words=["zz"],
        include_stop_str_in_output=True,
        ignore_eos=True,
        max_tokens=33,
        min_tokens=2,
        logprobs=3,
        prompt_logprobs=1,
        skip_special_tokens=False,
        spaces_between_special_tokens=False,
        logit_bias={5: 1.5, 11: -100.0},
        allowed_token_ids=[5, 6, 11],
        output_kind=RequestOutputKind.DELTA,
    )
    params.bad_words_token_ids = [[7, 8], [9]]
    params.all_stop_token_ids |= {2}
    request = Request("r-1", [1, 2, 3], params, (2, 7), 256, cache_salt="salt")
    payload = roundtrip(serial.InputKind.ADD, serial.encode_request(request))
    got = serial.decode_request(payload)
    assert dataclasses.asdict(got.sampling_params) == dataclasses.asdict(params)
    assert got.sampling_params.output_kind is RequestOutputKind.DELTA
    assert got.sampling_params.logit_bias == {5: 1.5, 11: -100.0}
    assert got.sampling_params.all_stop_token_ids == {2, 4, 9}
    for name in ("request_id", "prompt_token_ids", "eos_token_ids", "max_model_len", "cache_salt"):
        assert getattr(got, name) == getattr(request, name), name
    assert got.all_token_ids == [1, 2, 3] and got.num_computed_tokens == 0


def test_outputs_roundtrip() -> None:
    lp = Logprobs([[5, 5, 9]], [[-0.5, -0.5, -1.25]], [1], start=0)
    plp = Logprobs([[3], [4]], [[-2.0], [-3.0]], [4, 7], start=1)
    outs = [
        EngineCoreOutput("a", [5], None, None, lp, 16, plp),
        EngineCoreOutput("b", [7, 8], FinishReason.STOP, "stop here"),
        EngineCoreOutput("c", [2], FinishReason.LENGTH, 2),
    ]
    stats = SchedulerStats(3, 1, 0.25, 2, 100, 40, 9, PrefixCacheStats(4, 80, 32))
    batch = serial.EngineCoreOutputs(outs, stats, {"a": 0.5})
    kind, payload = serial.unpack(serial.encode_outputs(batch))
    assert kind == serial.OutputKind.OUTPUTS
    got = serial.decode_outputs(payload)
    assert got.stats == stats and got.queue_times == {"a": 0.5}
    for want, have in zip(outs, got.outputs, strict=True):
        for name in EngineCoreOutput.__slots__:
            assert getattr(have, name) == getattr(want, name), name
    assert got.outputs[1].finish_reason is FinishReason.STOP
