"""The input processor (torch-free, over a byte tokenizer): each check runs once per request, a
`CheckedInput` is not checked again, and the caller's SamplingParams are never written to."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from pagedllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pagedllm.engine.input_processor import (
    CheckedInput,
    InputProcessor,
    PromptTooLongError,
    prepare_request,
)
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

VOCAB = 300
MAX_MODEL_LEN = 32


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0..255)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def make_config() -> EngineConfig:
    model = ModelConfig(
        model="fake",
        tokenizer=None,
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        seed=0,
        load_format="dummy",
        architecture="LlamaForCausalLM",
        vocab_size=VOCAB,
        hidden_size=8,
        num_layers=1,
        num_attention_heads=1,
        num_kv_heads=1,
        head_dim=8,
        hf_config=None,
        eos_token_ids=(2,),
    )
    return EngineConfig(
        model_config=model,
        cache_config=CacheConfig(block_size=4),
        scheduler_config=SchedulerConfig(8, 64, MAX_MODEL_LEN),
        parallel_config=None,  # type: ignore[arg-type]
        device_config=None,  # type: ignore[arg-type]
    )


@pytest.fixture
def processor() -> InputProcessor:
    return InputProcessor(make_config(), ByteTokenizer())


def user_params(**kw) -> SamplingParams:
    defaults = dict(temperature=0.8, max_tokens=5, stop=["zz"], bad_words=["no"], seed=7)
    return SamplingParams(**{**defaults, **kw})


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("output_kind", [None, RequestOutputKind.FINAL_ONLY])
def test_the_callers_params_are_never_written_to(processor, n, output_kind) -> None:
    params = user_params(n=n, prompt_logprobs=1)
    before = copy.deepcopy(params)
    requests = prepare_request(
        processor, OutputProcessor(None), "r", "hello", params, output_kind=output_kind
    )
    assert dataclasses.asdict(params) == dataclasses.asdict(before)
    assert params.bad_words_token_ids == []  # derived data went to the engine's copies
    assert len(requests) == n
    for i, request in enumerate(requests):
        own = request.sampling_params
        assert own is not params and own.n == 1
        assert own.bad_words_token_ids == [list(b"no")]
        assert own.output_kind == (output_kind or params.output_kind)
        if n > 1:
            assert own.seed == 7 + i and own.prompt_logprobs == (1 if i == 0 else None)
    assert len({id(r.sampling_params) for r in requests}) == n


def test_each_check_runs_once_and_a_checked_input_is_not_checked_again(
    processor, monkeypatch
) -> None:
    calls: list[str] = []
    for name in ("check_params", "check_prompt_ids", "check_prompt_len"):
        original = getattr(processor, name)

        def counted(*args, _name=name, _original=original, **kw):
            calls.append(_name)
            return _original(*args, **kw)

        monkeypatch.setattr(processor, name, counted)
    prepare_request(processor, OutputProcessor(None), "a", [5, 6, 7], user_params(n=4))
    assert sorted(calls) == ["check_params", "check_prompt_ids", "check_prompt_len"]

    # The server's path: it runs each check itself, then hands over a CheckedInput.
    calls.clear()
    ids = processor.check_prompt_ids([5, 6, 7], "prompt")
    processor.check_prompt_len(len(ids))
    checked = CheckedInput(None, ids, processor.check_params(user_params(n=2)))
    calls.clear()
    requests = prepare_request(processor, OutputProcessor(None), "b", checked, None)
    assert calls == [] and [r.request_id for r in requests] == ["0_b", "1_b"]
    assert checked.sampling_params.n == 2  # the CheckedInput itself is left as it was

    with pytest.raises(ValueError, match="carries its own sampling_params"):
        prepare_request(processor, OutputProcessor(None), "c", checked, user_params())


def test_the_checks_name_what_is_wrong(processor) -> None:
    with pytest.raises(ValueError, match=r"^prompt is empty"):
        processor.check_prompt_ids([], "prompt")
    with pytest.raises(ValueError, match=r"^messages holds token ids outside .* 300\): \[300\]"):
        processor.check_prompt_ids([1, 300], "messages")
    with pytest.raises(ValueError, match=r"^prompt_token_ids must be a list of integers"):
        processor.check_prompt_ids([1, True])
    assert processor.check_prompt_len(MAX_MODEL_LEN - 1) == 1
    with pytest.raises(PromptTooLongError, match="max_model_len is 32") as info:
        processor.check_prompt_len(MAX_MODEL_LEN)
    assert (info.value.num_tokens, info.value.max_model_len) == (MAX_MODEL_LEN, MAX_MODEL_LEN)
    with pytest.raises(ValueError, match=r"^top_k"):
        processor.check_params(SamplingParams(top_k=VOCAB + 1))
    with pytest.raises(ValueError, match="sampling_params must be SamplingParams"):
        prepare_request(processor, OutputProcessor(None), "d", [5], None)
    no_tokenizer = InputProcessor(make_config(), None)
    with pytest.raises(ValueError, match="need a tokenizer"):
        no_tokenizer.check_params(SamplingParams(stop=["x"]))
