"""Sampling defaults from the model's generation config (`generation_config=`, vLLM's): what
`LLM.generate` / `LLM.chat` use without SamplingParams, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.transformers_utils.generation_config import sampling_defaults


def write_config(folder: Path, **fields: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps(fields))
    return folder


def test_sampling_fields_are_read_and_renamed(tmp_path: Path) -> None:
    folder = write_config(
        tmp_path / "m",
        temperature=0.6,
        top_p=0.9,
        top_k=20,
        min_p=0.05,
        repetition_penalty=1.1,
        max_new_tokens=300,
        do_sample=True,
        eos_token_id=[1, 2],
        bos_token_id=1,
    )
    want = {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "max_tokens": 300,
    }
    assert sampling_defaults("auto", str(folder)) == want
    assert sampling_defaults(str(folder), None) == want  # a folder given by path
    assert sampling_defaults("vllm", str(folder)) == {}
    # The builtin defaults sit below the file's; the override above both.
    builtin = {"temperature": 0.2, "max_new_tokens": 50, "min_p": 0.1}
    got = sampling_defaults("auto", str(folder), builtin, '{"top_k": 5}')
    assert got == {**want, "top_k": 5}
    assert sampling_defaults("auto", str(tmp_path / "empty"), builtin)["max_tokens"] == 50
    assert sampling_defaults("vllm", None, builtin, {"max_new_tokens": 7}) == {"max_tokens": 7}


@pytest.mark.parametrize(
    ("source", "override", "match"),
    [
        ("/no/such/folder", None, "generation_config"),
        ("auto", '{"temperature": ', "override_generation_config"),
        ("auto", {"beam_width": 4}, "override_generation_config"),
        ("auto", [1, 2], "override_generation_config"),
        ("auto", {"temperature": -1.0}, "temperature"),
        ("auto", {"max_new_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_configs_are_value_errors(tmp_path: Path, source, override, match) -> None:
    with pytest.raises(ValueError, match=match):
        sampling_defaults(source, str(tmp_path), None, override)


def test_llm_uses_the_generation_config_without_sampling_params(tiny_model_dirs, tmp_path) -> None:
    folder = write_config(tmp_path / "gen", temperature=0.0, max_new_tokens=5)
    common = dict(dtype="float32", max_model_len=256, kv_cache_memory="8MiB")
    llm = LLM(tiny_model_dirs["llama"], generation_config=str(folder), **common)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.max_tokens) == (0.0, 5)
    prompt = [5, 6, 7, 8]
    got = llm.generate(prompt, use_tqdm=False)[0].outputs[0].token_ids
    want = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert got == want[0].outputs[0].token_ids and 1 <= len(got) <= 5
    # vllm: SamplingParams' own defaults; an override wins over the file.
    plain = LLM(tiny_model_dirs["llama"], generation_config="vllm", **common)
    assert plain.get_default_sampling_params() == SamplingParams()
    tuned = LLM(
        tiny_model_dirs["llama"],
        generation_config=str(folder),
        override_generation_config={"temperature": 0.5},
        **common,
    )
    params = tuned.get_default_sampling_params()
    assert (params.temperature, params.max_tokens) == (0.5, 5)
    with pytest.raises(ValueError, match="override_generation_config"):
        LLM(tiny_model_dirs["llama"], override_generation_config={"nope": 1}, **common)
