"""Structured output end to end on the CPU (tiny random-weight models, fp32): every output a
constraint allows is valid by construction, whatever the model.

- greedy constrained decoding equals a reference loop (HF transformers' logits, xgrammar's own
  matcher masking them, argmax), token for token, sync and async scheduling alike;
- sampled at temperature >= 1 with many seeds, each kind (JSON schema, any JSON object, regex,
  choice, EBNF grammar) gives outputs that `jsonschema` / `re.fullmatch` / the choice accept,
  finished with "stop";
- with preemption, prefix caching, n > 1, stop strings and ignore_eos the constraints hold;
- a grammar compiles off the step loop: an unconstrained request runs while it compiles;
- invalid specs are a ValueError naming the field, and leave the engine serving.
"""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch

from pagedllm import LLM, SamplingParams, StructuredOutputsParams
from tests.tiny_models import load_hf

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bc", "def"]}},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
REGEX = r"(\d{3}-\d{4}|[a-z]{2,5}@[a-z]{2,4}\.(com|org))"
CHOICES = ["positive", "negative", "neutral ☺"]
# Arithmetic expressions (GBNF).
GRAMMAR = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= num | "(" expr ")"
num ::= [1-9] [0-9]{0,2}
"""
GRAMMAR_RE = r"[0-9+\-()]+"


@pytest.fixture(scope="module")
def llm(tiny_model_dirs) -> LLM:
    return LLM(
        tiny_model_dirs["llama"],
        dtype="float32",
        kv_cache_memory="64MiB",
        max_model_len=512,
        seed=0,
    )


def so(**kw) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)


def sampled(llm: LLM, spec: StructuredOutputsParams, n: int, max_tokens: int = 160, **kw):
    params = [
        SamplingParams(
            temperature=1.0, seed=s, max_tokens=max_tokens, structured_outputs=spec, **kw
        )
        for s in range(n)
    ]
    outs = llm.generate(["The quick brown fox"] * n, params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


def check_grammar_expr(text: str) -> None:
    assert re.fullmatch(GRAMMAR_RE, text), text
    assert text.count("(") == text.count(")")
    eval(text, {"__builtins__": {}})  # a well-formed expression (digits, + - and parentheses)


# ----- validity by construction, sampled -----


def test_json_schema_outputs_validate(llm) -> None:
    outs = sampled(llm, so(json=SCHEMA), 12, max_tokens=300)
    done = [c for c in outs if c.finish_reason == "stop"]
    assert len(done) >= 9, [c.finish_reason for c in outs]
    for c in done:
        jsonschema.validate(json.loads(c.text), SCHEMA)  # NOTE: strict json: no raw controls


def test_json_schema_given_as_text_and_compact(llm) -> None:
    outs = sampled(llm, so(json=json.dumps(SCHEMA), disable_any_whitespace=True), 6, 300)
    for c in outs:
        if c.finish_reason == "stop":
            value = json.loads(c.text)
            jsonschema.validate(value, SCHEMA)
            # Outside strings, whitespace only in json.dumps' separators ", " and ": ".
            bare = re.sub(r'"(\\.|[^"\\])*"', '""', c.text)
            assert not re.search(r"\s", bare.replace(", ", ",").replace(": ", ":")), c.text


def test_json_object_outputs_are_objects(llm) -> None:
    outs = sampled(llm, so(json_object=True), 8, max_tokens=200)
    done = [c for c in outs if c.finish_reason == "stop"]
    assert done
    for c in done:
        assert isinstance(json.loads(c.text), dict)
    for c in outs:  # cut by max_tokens: still a prefix of an object
        assert c.text.lstrip().startswith("{")


def test_regex_outputs_fullmatch(llm) -> None:
    for c in sampled(llm, so(regex=REGEX), 12, max_tokens=40):
        assert c.finish_reason == "stop"
        assert re.fullmatch(REGEX, c.text), c.text


def test_choice_outputs_are_choices(llm) -> None:
    outs = sampled(llm, so(choice=CHOICES), 16, max_tokens=20)
    assert {c.text for c in outs} <= set(CHOICES)
    assert all(c.finish_reason == "stop" for c in outs)


def test_ebnf_grammar_outputs_parse(llm) -> None:
    for c in sampled(llm, so(grammar=GRAMMAR), 10, max_tokens=60):
        if c.finish_reason == "stop":
            check_grammar_expr(c.text)


def test_ignore_eos_still_ends_when_the_grammar_is_complete(llm) -> None:
    for c in sampled(llm, so(choice=CHOICES), 6, max_tokens=30, ignore_eos=True):
        assert c.text in CHOICES and c.finish_reason == "stop"


def test_n_and_stop_strings_with_a_constraint(llm) -> None:
    params = SamplingParams(
        n=6, temperature=1.0, seed=3, max_tokens=40, structured_outputs=so(regex=REGEX)
    )
    (out,) = llm.generate(["hi"], params, use_tqdm=False)
    assert len(out.outputs) == 6
    for c in out.outputs:
        assert re.fullmatch(REGEX, c.text)
    # A stop string ends the output early: what is left is a prefix the regex allows.
    params = SamplingParams(
        temperature=1.0,
        seed=1,
        max_tokens=40,
        stop=["-"],
        structured_outputs=so(regex=r"\d{3}-\d{4}"),
    )
    (out,) = llm.generate(["hi"], params, use_tqdm=False)
    assert re.fullmatch(r"\d{3}", out.outputs[0].text), out.outputs[0].text


def test_constrained_beside_unconstrained_rows(llm) -> None:
    """A batch mixing rows with and without grammars: the free rows equal their output in a
    batch without constrained rows (the mask touches only its rows)."""
    free = [
        SamplingParams(temperature=1.0, seed=s, max_tokens=12, ignore_eos=True) for s in range(4)
    ]
    alone = [o.outputs[0].token_ids for o in llm.generate(["a b"] * 4, free, use_tqdm=False)]
    mixed = []
    for s in range(4):
        mixed.append(free[s])
        mixed.append(
            SamplingParams(
                temperature=1.0, seed=s, max_tokens=40, structured_outputs=so(regex=REGEX)
            )
        )
    outs = llm.generate(["a b"] * 8, mixed, use_tqdm=False)
    assert [outs[2 * s].outputs[0].token_ids for s in range(4)] == alone
    for s in range(4):
        assert re.fullmatch(REGEX, outs[2 * s + 1].outputs[0].text)


# ----- exact: against a reference loop -----


def reference_greedy(path: str, llm: LLM, prompt: list[int], spec, max_tokens: int) -> list[int]:
    """HF's logits, masked by xgrammar's own matcher (compiled from the same spec), argmax."""
    import xgrammar as xgr

    from pagedllm.engine.structured_output.backends.xgrammar import XgrammarBackend

    model = load_hf(path)
    mc = llm.llm_engine.config.model_config
    backend = XgrammarBackend(llm.get_tokenizer(), mc.vocab_size, list(mc.eos_token_ids))
    matcher = xgr.GrammarMatcher(backend.compile(spec))
    bitmask = xgr.allocate_token_bitmask(1, mc.vocab_size)
    ids, out = list(prompt), []
    with torch.no_grad():
        while len(out) < max_tokens and not matcher.is_terminated():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            matcher.fill_next_token_bitmask(bitmask)
            xgr.apply_token_bitmask_inplace(logits, bitmask[0])
            token = int(logits.argmax())
            assert matcher.accept_token(token)
            ids.append(token)
            out.append(token)
            if token in mc.eos_token_ids:
                break
    return out


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_equals_reference_loop(tiny_model_dirs, async_scheduling) -> None:
    path = tiny_model_dirs["llama"]
    llm = LLM(
        path, dtype="float32", kv_cache_memory="64MiB", max_model_len=512, async_scheduling=async_scheduling,
        max_num_batched_tokens=32, max_num_seqs=8,  # chunked prompts
    )  # fmt: skip
    specs = [so(json=SCHEMA), so(regex=REGEX), so(grammar=GRAMMAR), so(json_object=True)]
    prompts = [[5 + 7 * i + j for j in range(20 + 9 * i)] for i in range(len(specs))]
    params = [SamplingParams(temperature=0, max_tokens=48, structured_outputs=s) for s in specs]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for out, prompt, spec in zip(outs, prompts, specs):
        want = reference_greedy(path, llm, prompt, spec, 48)
        assert out.outputs[0].token_ids == want, spec.kind


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption_and_prefix_caching_keep_constraints(tiny_model_dirs, async_scheduling) -> None:
    """A KV cache too small for the batch preempts requests mid-output; a shared prefix hits
    the cache on the second pass; the seeded outputs equal those of a roomy engine (sync and
    async scheduling alike)."""
    path = tiny_model_dirs["llama"]
    prefix = list(range(10, 90))
    prompts = [{"prompt_token_ids": prefix + [100 + i]} for i in range(8)]
    specs = [so(json=SCHEMA), so(regex=REGEX), so(grammar=GRAMMAR), so(choice=CHOICES)] * 2
    params = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=60, structured_outputs=s)
        for i, s in enumerate(specs)
    ]
    roomy = LLM(path, dtype="float32", kv_cache_memory="64MiB", max_model_len=160)
    want = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    tight = LLM(
        path,
        dtype="float32",
        kv_cache_memory="64MiB",
        max_model_len=160,
        num_gpu_blocks_override=12,
        max_num_seqs=8,
        async_scheduling=async_scheduling,
    )
    for _ in range(2):
        outs = tight.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == want
    stats = tight.llm_engine.get_stats()
    assert stats.num_preemptions > 0
    assert stats.prefix_cache_stats.hits > 0
    assert tight.llm_engine.engine_core.scheduler.kv_cache_manager.usage == 0.0


# ----- compile off the loop -----


def test_a_compiling_grammar_does_not_stall_other_requests(tiny_model_dirs, monkeypatch) -> None:
    llm = LLM(tiny_model_dirs["llama"], dtype="float32", kv_cache_memory="64MiB", max_model_len=256)
    engine = llm.llm_engine
    manager = engine.engine_core.structured_output
    release = threading.Event()
    real = manager._compile

    def slow_compile(spec):
        assert release.wait(60)
        return real(spec)

    monkeypatch.setattr(manager, "_compile", slow_compile)
    engine.add_request("g", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(
        temperature=0, max_tokens=30, structured_outputs=so(regex=REGEX)))  # fmt: skip
    engine.add_request("free", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True))  # fmt: skip
    finished = {}
    for _ in range(50):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if "free" in finished:
            break
    assert "free" in finished and "g" not in finished
    release.set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert re.fullmatch(REGEX, finished["g"].outputs[0].text)


def test_a_grammar_that_fails_to_compile_fails_its_request_alone(tiny_model_dirs, monkeypatch):
    llm = LLM(tiny_model_dirs["llama"], dtype="float32", kv_cache_memory="64MiB", max_model_len=256)
    manager = llm.llm_engine.engine_core.structured_output

    def broken(spec):
        raise ValueError("structured_outputs.regex: no")

    monkeypatch.setattr(manager, "_compile", broken)
    params = [
        SamplingParams(temperature=0, max_tokens=5, structured_outputs=so(regex="a+")),
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
    ]
    bad, good = llm.generate(["x", "y"], params, use_tqdm=False)
    assert bad.outputs[0].finish_reason == "error"
    assert "structured output failed" in str(bad.outputs[0].stop_reason)
    assert len(good.outputs[0].token_ids) == 5
    monkeypatch.undo()
    (out,) = llm.generate(["y"], params[0], use_tqdm=False)
    assert re.fullmatch("a+", out.outputs[0].text)
    assert llm.llm_engine.engine_core.scheduler.kv_cache_manager.usage == 0.0


# ----- bad specs -----


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"json": {"type": "objekt"}}, "structured_outputs.json"),
        ({"json": "{not json"}, "structured_outputs.json"),
        ({"json": [1, 2]}, "structured_outputs.json"),
        ({"regex": "(ab"}, "structured_outputs.regex"),
        ({"grammar": "root ::= "}, "structured_outputs.grammar"),
        ({"grammar": 'start ::= "a"'}, "structured_outputs.grammar"),
        ({"choice": []}, "structured_outputs.choice"),
        ({"choice": ["a", 3]}, "structured_outputs.choice"),
        ({"regex": "a", "choice": ["a"]}, "structured_outputs"),
        ({}, "structured_outputs"),
        ({"regex": "\ud800"}, "structured_outputs.regex"),
    ],
)
def test_bad_specs_are_value_errors_naming_the_field(llm, kwargs, field) -> None:
    with pytest.raises(ValueError, match=re.escape(field)):
        llm.generate(["x"], SamplingParams(structured_outputs=so(**kwargs)), use_tqdm=False)
    (out,) = llm.generate(["x"], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 3


def test_structured_outputs_as_a_dict_and_unknown_keys() -> None:
    params = SamplingParams(structured_outputs={"regex": "a+"})
    assert params.structured_outputs == StructuredOutputsParams(regex="a+")
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"regexp": "a+"})
