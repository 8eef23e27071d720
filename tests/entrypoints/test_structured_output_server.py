"""Structured output through the server, with the official openai client and the default model
(SmolLM2-135M-Instruct, real weights): `response_format` (json_schema, json_object) on chat and
completions, vLLM's `structured_outputs` extra body and its older `guided_*` names, streamed and
not, sampled at temperature >= 1; every finished output validates (`jsonschema`,
`re.fullmatch`, the choice list); bad specs are 400s naming the field; 32 concurrent requests
with different schemas all validate."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from pagedllm.models.default import DEFAULT_MODEL, DefaultModelNotInstalledError, default_model_path
from tests.entrypoints.conftest import DEFAULT_MODEL_ARGS, RemoteServer

openai = pytest.importorskip("openai")

try:
    default_model_path()
except DefaultModelNotInstalledError as e:  # pragma: no cover - CI installs it
    pytest.skip(f"default model not installed: {e}", allow_module_level=True)

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "enum": ["France", "Italy", "Spain", "Germany"]},
        "population": {"type": "integer", "minimum": 0},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "country", "population", "capital"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe the capital of France as JSON."}]


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    with RemoteServer([*DEFAULT_MODEL_ARGS, "--max-num-seqs", "32"], api_key=None) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def chat(client, **kw):
    kw.setdefault("messages", MESSAGES)
    kw.setdefault("max_tokens", 160)
    return client.chat.completions.create(model=DEFAULT_MODEL, **kw)


def finished_texts(choices) -> list[str]:
    texts = [c.message.content for c in choices if c.finish_reason == "stop"]
    assert texts, [c.finish_reason for c in choices]
    return texts


def test_chat_json_schema_validates(client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    out = chat(client, response_format=fmt, temperature=1.0, n=6, seed=1)
    for text in finished_texts(out.choices):
        jsonschema.validate(json.loads(text), CITY)


def test_chat_json_object_is_an_object(client) -> None:
    out = chat(client, response_format={"type": "json_object"}, temperature=1.0, n=4, seed=2)
    for text in finished_texts(out.choices):
        assert isinstance(json.loads(text), dict)


def test_chat_json_schema_streamed(client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    stream = chat(client, response_format=fmt, temperature=1.0, seed=3, stream=True)
    text, reason = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reason = choice.finish_reason or reason
    assert reason == "stop"
    jsonschema.validate(json.loads(text), CITY)


def test_completions_extra_body_and_guided_names(client) -> None:
    cases = [
        ({"structured_outputs": {"regex": r"[A-Z][a-z]{2,8} is (big|small)\."}}, "regex"),
        ({"guided_regex": r"\d{1,3}(,\d{3}){0,3}"}, "regex"),
        ({"structured_outputs": {"choice": ["Paris", "Rome", "Madrid"]}}, "choice"),
        ({"guided_choice": ["yes", "no"]}, "choice"),
        ({"guided_json": CITY}, "json"),
        (
            {"structured_outputs": {"grammar": 'root ::= "The answer is " [0-9]{1,4} "."'}},
            "grammar",
        ),
        ({"guided_grammar": 'root ::= ("ab" | "cd"){1,6}'}, "grammar"),
    ]
    for extra, kind in cases:
        out = client.completions.create(
            model=DEFAULT_MODEL,
            prompt="The capital of France is",
            max_tokens=120,
            temperature=1.2,
            seed=7,
            n=3,
            extra_body=extra,
        )
        spec = next(iter(extra.values()))
        for c in out.choices:
            if kind == "json":
                if c.finish_reason == "stop":
                    jsonschema.validate(json.loads(c.text), CITY)
                continue
            assert c.finish_reason == "stop", (extra, c)
            if kind == "regex":
                assert re.fullmatch(spec.get("regex") if isinstance(spec, dict) else spec, c.text)
            elif kind == "choice":
                assert c.text in (spec.get("choice") if isinstance(spec, dict) else spec)
            elif "answer" in json.dumps(spec):
                assert re.fullmatch(r"The answer is [0-9]{1,4}\.", c.text), c.text
            else:
                assert re.fullmatch(r"(ab|cd){1,6}", c.text), c.text


def test_completions_response_format(client) -> None:
    out = client.completions.create(
        model=DEFAULT_MODEL,
        prompt="A JSON description of Paris:",
        max_tokens=160,
        temperature=1.0,
        seed=4,
        n=3,
        extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}}
        },
    )
    for c in out.choices:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), CITY)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objekt"}},
                }
            },
            "response_format",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"extra_body": {"guided_regex": "(a"}}, "guided_regex"),
        ({"extra_body": {"guided_grammar": "root ::= "}}, "guided_grammar"),
        ({"extra_body": {"guided_choice": []}}, "guided_choice"),
        (
            {"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}},
            "structured_outputs",
        ),
        ({"extra_body": {"structured_outputs": {"regexp": "a"}}}, "structured_outputs"),
        ({"extra_body": {"structured_outputs": {"json": {"type": "foo"}}}}, "structured_outputs"),
        ({"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}}, "guided_choice"),
    ],
)
def test_bad_specs_are_400s_naming_the_field(client, kwargs, param) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, max_tokens=5, **kwargs)
    error = info.value.body
    assert error["param"] == param, error
    out = chat(client, max_tokens=3, temperature=0)
    assert out.choices[0].message.content is not None


def test_32_concurrent_requests_with_different_schemas(client) -> None:
    def schema(i: int) -> dict:
        props = {
            f"field_{i}_{j}": {"type": ["integer", "string", "boolean"][j % 3]}
            for j in range(1 + i % 4)
        }
        if i % 5 == 0:
            props["items"] = {"type": "array", "items": {"type": "integer"}, "maxItems": 3}
        return {
            "type": "object",
            "properties": props,
            "required": list(props),
            "additionalProperties": False,
        }

    def one(i: int):
        s = schema(i)
        out = chat(
            client,
            messages=[{"role": "user", "content": f"Give me JSON number {i}."}],
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": s}},
            temperature=1.0,
            seed=i,
            max_tokens=120,
        )
        return s, out.choices[0]

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    done = 0
    for s, choice in results:
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(choice.message.content), s)
            done += 1
    assert done >= 24, [c.finish_reason for _, c in results]
