"""The engine-core wire format: every field of a request and of an output survives the trip."""

from __future__ import annotations

import dataclasses
import enum

import pytest

from pagedllm.engine import serial
from pagedllm.engine.outputs import EngineCoreOutput, EngineCoreOutputs, Logprobs
from pagedllm.engine.request import FinishReason, Request
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
    batch = EngineCoreOutputs(outs, stats, {"a": 0.5})
    kind, payload = serial.unpack(serial.encode_outputs(batch))
    assert kind == serial.OutputKind.OUTPUTS
    got = serial.decode_outputs(payload)
    assert got.stats == stats and got.queue_times == {"a": 0.5}
    for want, have in zip(outs, got.outputs, strict=True):
        for name in EngineCoreOutput.__slots__:
            assert getattr(have, name) == getattr(want, name), name
    assert got.outputs[1].finish_reason is FinishReason.STOP


# ----- the codec follows the dataclasses: new fields need no change in serial.py -----


class Color(enum.Enum):
    RED = "red"
    BLUE = 2


@dataclasses.dataclass
class Leaf:
    ids: tuple[int, ...]
    tags: set[str]
    color: Color | None = None


@dataclasses.dataclass
class Tree:
    """Every shape the codec walks: nested and optional dataclasses, lists and dicts of them,
    enums, sets, tuples, and itself."""

    name: str
    leaves: list[Leaf]
    best: Leaf | None
    by_name: dict[str, Leaf]
    colors: frozenset[Color]
    weights: dict[int, float]
    pairs: list[tuple[int, ...]]
    stop: int | str | None = None
    child: Tree | None = None
    kept_here: list[int] = dataclasses.field(default_factory=list, metadata={"wire": False})


@dataclasses.dataclass(slots=True)
class OutputWithNewFields(EngineCoreOutput):
    """EngineCoreOutput as it would be with two more fields (say, speculative tokens)."""

    spec_token_ids: list[int] | None = None
    draft_color: Color = Color.RED


@dataclasses.dataclass
class ParamsWithNewField(SamplingParams):
    grammar: str | None = None
    allowed_colors: set[Color] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(eq=False)
class RequestWithNewField(Request):
    priority: int = 0
    lora_name: str | None = None


def test_dataclasses_with_new_fields_round_trip() -> None:
    leaf = Leaf((1, 2), {"x", "y"}, Color.BLUE)
    tree = Tree(
        name="root",
        leaves=[leaf, Leaf((), set())],
        best=leaf,
        by_name={"a": leaf},
        colors=frozenset({Color.RED, Color.BLUE}),
        weights={3: 0.5, -1: 2.0},
        pairs=[(1, 2), (3,)],
        stop=7,
        child=Tree("kid", [], None, {}, frozenset(), {}, [], "end"),
        kept_here=[9],
    )
    got = serial.decode(Tree, roundtrip(serial.InputKind.ADD, serial.encode(tree)))
    assert got.kept_here == []  # stays on the sender's side: the constructor's default
    tree.kept_here = []
    assert got == tree
    assert isinstance(got.leaves[0].ids, tuple) and isinstance(got.leaves[0].tags, set)
    assert isinstance(got.colors, frozenset) and got.best.color is Color.BLUE
    assert isinstance(got.child, Tree) and got.child.stop == "end"

    out = OutputWithNewFields("r", [4], FinishReason.STOP, None, None, 3, None, [5, 6], Color.BLUE)
    got_out = serial.decode(OutputWithNewFields, roundtrip(0, serial.encode(out)))
    assert got_out == out and got_out.draft_color is Color.BLUE

    params = ParamsWithNewField(temperature=0.5, grammar="root ::= x", allowed_colors={Color.RED})
    params.bad_words_token_ids = [[1]]
    got_params = serial.decode(ParamsWithNewField, roundtrip(0, serial.encode(params)))
    assert dataclasses.asdict(got_params) == dataclasses.asdict(params)

    request = RequestWithNewField("r-2", [1, 2], SamplingParams(), priority=5, lora_name="x")
    request.num_computed_tokens = 2  # the sender's state: not sent
    got_request = serial.decode(RequestWithNewField, roundtrip(0, serial.encode(request)))
    assert (got_request.priority, got_request.lora_name) == (5, "x")
    assert got_request.num_computed_tokens == 0 and got_request.all_token_ids == [1, 2]
    assert got_request.arrival_order > request.arrival_order  # the receiver's own


def test_a_malformed_message_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        serial.decode_request(["ghost", "junk"])
    with pytest.raises(ValueError):
        serial.decode(Leaf, [[1], ["x"], None, "one too many"])


@dataclasses.dataclass
class Unsendable:
    value: complex


def test_a_type_the_wire_cannot_carry_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(TypeError, match="complex"):
        serial.encode(Unsendable(1j))
    with pytest.raises(TypeError, match="not a dataclass"):
        serial.encode(object())
