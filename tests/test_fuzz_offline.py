"""Fuzzing the offline API with hypothesis: SamplingParams of any field values, valid or not,
through `LLM.generate` on the tiny Llama. Each either fails with a ValueError naming one of
the fields given, or runs to the end with what it asked for; the engine never breaks, never
keeps a request or a KV block, and a good request after each one gives HF's greedy tokens.

Small in the default run (`PAGEDLLM_FUZZ_EXAMPLES`, 40); `pytest -m fuzz` runs it with 200.
"""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedllm import LLM, SamplingParams
from tests.tiny_models import VOCAB_SIZE, hf_greedy, load_hf

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("PAGEDLLM_FUZZ_EXAMPLES", "40"))
GOOD_PROMPT = [5, 6, 7, 8, 9]

# Values a careless or hostile caller might pass: edge and out-of-range numbers, wrong types.
ANY_NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**63, 2**64, -(2**63) - 1, 1e-9, 1e300]),
)
JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.lists(st.integers(), max_size=3))
TOKEN_IDS = st.lists(st.integers(min_value=-3, max_value=VOCAB_SIZE + 3), max_size=6)
TEXTS = st.lists(st.text(max_size=6), max_size=4)  # lone surrogates included


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(valid, valid, ANY_NUMBER, JUNK)  # mostly valid


FIELDS = {
    "n": field(st.integers(1, 3)),
    "temperature": field(st.floats(0, 2)),
    "top_p": field(st.floats(0.01, 1)),
    "top_k": field(st.integers(-1, VOCAB_SIZE + 2)),
    "min_p": field(st.floats(0, 1)),
    "presence_penalty": field(st.floats(-2, 2)),
    "frequency_penalty": field(st.floats(-2, 2)),
    "repetition_penalty": field(st.floats(0.5, 2)),
    "seed": field(st.integers(-(2**63), 2**64 - 1)),
    "max_tokens": field(st.integers(1, 6)),
    "min_tokens": field(st.integers(0, 3)),
    "logprobs": field(st.integers(0, 21)),
    "prompt_logprobs": field(st.integers(0, 21)),
    "stop": st.one_of(TEXTS, JUNK),
    "stop_token_ids": st.one_of(TOKEN_IDS, JUNK),
    "bad_words": st.one_of(TEXTS, JUNK),
    "allowed_token_ids": st.one_of(TOKEN_IDS, JUNK),
    "logit_bias": st.one_of(
        st.dictionaries(st.integers(-2, VOCAB_SIZE + 2), ANY_NUMBER, max_size=3), JUNK
    ),
    "ignore_eos": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
}


@pytest.fixture(scope="module")
def llm(tiny_model_dirs) -> LLM:
    return LLM(
        tiny_model_dirs["llama"],
        dtype="float32",
        max_model_len=64,
        kv_cache_memory="8MiB",
        max_num_batched_tokens=32,
        max_num_seqs=8,
    )


@pytest.fixture(scope="module")
def good_tokens(tiny_model_dirs) -> list[int]:
    return hf_greedy(load_hf(tiny_model_dirs["llama"]), [GOOD_PROMPT], [4])[0]


def assert_idle(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests() and not engine.output_processor.states
    pool = engine.engine_core.scheduler.kv_cache_manager.pool
    assert pool.num_free_blocks == pool.num_blocks


def assert_names_a_field(error: ValueError, given: dict) -> None:
    message = str(error)
    named = [name for name in given if name in message]
    assert named, f"{message!r} names none of {sorted(given)}"


@given(kwargs=st.fixed_dictionaries({}, optional=FIELDS), prompt=st.sampled_from([0, 1, 2]))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_sampling_params_fail_cleanly_or_run(llm: LLM, good_tokens, kwargs, prompt) -> None:
    prompts = [GOOD_PROMPT, "Hello there", {"prompt_token_ids": list(range(3, 40))}]
    try:
        params = SamplingParams(**kwargs)
    except ValueError as e:
        assert_names_a_field(e, kwargs)
    except TypeError as e:  # a keyword of a wrong *kind* (None for a container's items)
        pytest.fail(f"TypeError instead of ValueError for {kwargs}: {e}")
    else:
        try:
            outputs = llm.generate(prompts[prompt], params, use_tqdm=False)
        except ValueError as e:
            assert_names_a_field(e, kwargs)
        else:
            (out,) = outputs
            assert len(out.outputs) == params.n
            for sample in out.outputs:
                assert sample.finish_reason in ("stop", "length")
                assert params.max_tokens is None or len(sample.token_ids) <= params.max_tokens
                if params.logprobs is not None:
                    assert sample.logprobs is not None
                    assert len(sample.logprobs) == len(sample.token_ids)
                    for entry in sample.logprobs:
                        assert all(not math.isnan(lp.logprob) for lp in entry.values())
    assert_idle(llm)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert llm.generate(GOOD_PROMPT, greedy, use_tqdm=False)[0].outputs[0].token_ids == good_tokens
    assert_idle(llm)
