"""SamplingParams validation: each invalid value raises ValueError naming its field."""

from __future__ import annotations

import pytest

from pagedllm import SamplingParams
from pagedllm.sampling_params import RequestOutputKind

INVALID = [
    ("n", 0),
    ("n", 1.5),
    ("temperature", -0.1),
    ("temperature", "hot"),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_k", -2),
    ("top_k", 2.5),
    ("min_p", -0.1),
    ("min_p", 1.1),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -3.0),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", 2.5),
    ("max_tokens", 0),
    ("min_tokens", -1),
    ("logprobs", -1),
    ("prompt_logprobs", -2),
    ("seed", "x"),
    ("stop", [""]),
    ("stop_token_ids", [-1]),
    ("bad_words", [" "]),
    ("allowed_token_ids", []),
    ("allowed_token_ids", [-3]),
    ("logit_bias", {1: 200.0}),
    ("logit_bias", {"a": 1.0}),
    ("output_kind", "delta"),
    # What the engine cannot represent: non-finite floats, seeds past 64 bits, counts past
    # int64, strings that are not valid Unicode (a lone surrogate).
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("top_p", float("nan")),
    ("min_p", float("nan")),
    ("presence_penalty", float("-inf")),
    ("frequency_penalty", float("nan")),
    ("repetition_penalty", float("inf")),
    ("temperature", 10**400),
    ("seed", 2**64),
    ("seed", -(2**63) - 1),
    ("n", 2**63),
    ("max_tokens", 2**63),
    ("min_tokens", 2**64),
    ("logprobs", 2**63),
    ("stop", ["ok", "\ud800"]),
    ("stop", "\udfff"),
    ("bad_words", ["\udc00"]),
    ("logit_bias", {1: float("nan")}),
    ("logit_bias", {1: 10**400}),
]


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_invalid_field_raises_naming_it(name, value) -> None:
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


def test_min_tokens_above_max_tokens() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_engine_checks(llm) -> None:
    engine = llm.llm_engine
    cases = [
        ("logprobs", SamplingParams(logprobs=21)),
        ("prompt_logprobs", SamplingParams(prompt_logprobs=100)),
        ("stop_token_ids", SamplingParams(stop_token_ids=[10_000])),
        ("allowed_token_ids", SamplingParams(allowed_token_ids=[512])),
        ("logit_bias", SamplingParams(logit_bias={999: 1.0})),
        ("top_k", SamplingParams(top_k=513)),  # the vocabulary is 512
        ("top_k", SamplingParams(top_k=2**63)),
    ]
    for name, params in cases:
        with pytest.raises(ValueError, match=name):
            engine.add_request("bad", [1, 2, 3], params)
    assert not engine.has_unfinished_requests()


def test_the_64_bit_seed_range_is_accepted() -> None:
    from pagedllm.sampling_params import SEED_MAX, SEED_MIN, child_seed

    assert SamplingParams(seed=SEED_MAX).seed == 2**64 - 1
    assert SamplingParams(seed=SEED_MIN).seed == -(2**63)
    # n > 1 samples get seed + i, wrapped into the range: valid and distinct.
    seeds = [child_seed(SEED_MAX - 1, i) for i in range(4)]
    assert seeds == [2**64 - 2, 2**64 - 1, 0, 1]
    assert child_seed(-5, 2) == -3


def test_defaults_and_normalization() -> None:
    greedy = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, stop="x")
    assert (greedy.top_k, greedy.top_p, greedy.stop) == (0, 1.0, ["x"])
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams().output_kind == RequestOutputKind.CUMULATIVE
