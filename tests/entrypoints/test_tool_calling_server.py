"""Tool calling through the server with the official openai client and the default model
(SmolLM2-135M-Instruct), started with `--enable-auto-tool-choice --tool-call-parser hermes`:

- tool_choice "required" and a named function: the grammar built from the tools' parameter
  schemas makes every call valid JSON for its tool (checked with `jsonschema`), at temperature
  1, streamed (the name first, then argument fragments) and not; finish_reason "tool_calls";
- "none": text, no calls; "auto": the hermes parser reads `<tool_call>` blocks (the model is
  steered into one with a regex, since a 135M model rarely calls tools by itself);
- a round trip: the assistant's tool_calls and the tool's answer go back through the chat
  template, and the model answers;
- bad tools and choices are 400s naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import pytest

from pagedllm.entrypoints.openai.chat_tools import resolve_tools
from pagedllm.entrypoints.openai.errors import OpenAIError
from pagedllm.models.default import DEFAULT_MODEL, DefaultModelNotInstalledError, default_model_path
from tests.entrypoints.conftest import DEFAULT_MODEL_ARGS, RemoteServer

openai = pytest.importorskip("openai")

try:
    default_model_path()
except DefaultModelNotInstalledError as e:  # pragma: no cover - CI installs it
    pytest.skip(f"default model not installed: {e}", allow_module_level=True)

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 30}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    args = [*DEFAULT_MODEL_ARGS, "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    with RemoteServer(args, api_key=None) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def chat(client, **kw):
    kw.setdefault("messages", MESSAGES)
    kw.setdefault("max_tokens", 200)
    kw.setdefault("tools", TOOLS)
    return client.chat.completions.create(model=DEFAULT_MODEL, **kw)


def check_call(name: str, arguments: str) -> None:
    assert name in SCHEMAS, name
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def streamed_calls(stream) -> tuple[dict[int, dict], str | None, str]:
    """Per tool-call index: id, name, the argument fragments; the finish reason; the content."""
    calls: dict[int, dict] = {}
    reason, content = None, ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reason = choice.finish_reason or reason
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": None, "fragments": []})
                if call.id:
                    assert entry["id"] is None and not entry["fragments"], "the id comes first"
                    entry["id"] = call.id
                if call.function and call.function.name:
                    assert not entry["fragments"], "the name comes before the arguments"
                    entry["name"] = call.function.name
                if call.function and call.function.arguments:
                    entry["fragments"].append(call.function.arguments)
    return calls, reason, content


def test_required_makes_valid_calls(client) -> None:
    out = chat(client, tool_choice="required", temperature=1.0, n=4, seed=3)
    called = 0
    for choice in out.choices:
        if choice.finish_reason == "length":
            continue
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            check_call(call.function.name, call.function.arguments)
        called += 1
    assert called >= 3


def test_required_without_parallel_calls_makes_one(client) -> None:
    out = chat(client, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=5)
    (choice,) = out.choices
    if choice.finish_reason != "length":
        assert len(choice.message.tool_calls) == 1


def test_named_function_streamed_and_not(client) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = chat(client, tool_choice=named, temperature=1.0, seed=1)
    (choice,) = out.choices
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    check_call("get_weather", call.function.arguments)
    calls, reason, content = streamed_calls(
        chat(client, tool_choice=named, temperature=1.0, seed=2, stream=True)
    )
    assert reason == "tool_calls" and content == ""
    (entry,) = calls.values()
    assert entry["name"] == "get_weather" and entry["id"].startswith("call_")
    assert len(entry["fragments"]) > 1, "the arguments stream as they are generated"
    check_call("get_weather", "".join(entry["fragments"]))


def test_required_streamed(client) -> None:
    calls, reason, _ = streamed_calls(
        chat(client, tool_choice="required", temperature=1.0, seed=4, stream=True)
    )
    if reason != "length":
        assert reason == "tool_calls" and calls
        for entry in calls.values():
            check_call(entry["name"], "".join(entry["fragments"]))


def test_none_answers_in_text(client) -> None:
    out = chat(client, tool_choice="none", temperature=0, max_tokens=20)
    (choice,) = out.choices
    assert choice.message.content and not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")


def test_auto_parses_the_models_hermes_calls(client) -> None:
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    steer = {"guided_choice": ["Let me check.\n" + call]}
    out = chat(client, tool_choice="auto", temperature=0, extra_body=steer)
    (choice,) = out.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check.\n"
    (got,) = choice.message.tool_calls
    assert got.function.name == "get_weather"
    assert json.loads(got.function.arguments) == {"city": "Paris", "unit": "celsius"}
    calls, reason, content = streamed_calls(
        chat(client, tool_choice="auto", temperature=0, extra_body=steer, stream=True)
    )
    assert reason == "tool_calls" and content == "Let me check.\n"
    (entry,) = calls.values()
    assert entry["name"] == "get_weather"
    assert json.loads("".join(entry["fragments"])) == {"city": "Paris", "unit": "celsius"}
    # Without a call, auto is plain text.
    out = chat(client, tool_choice="auto", temperature=0, max_tokens=20)
    assert out.choices[0].message.content and not out.choices[0].message.tool_calls


def test_round_trip(client) -> None:
    first = chat(
        client, tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0
    )
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    final = chat(client, messages=messages, temperature=0, max_tokens=30)
    (choice,) = final.choices
    assert choice.message.content and not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": 3}}]}, "tools"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "objekt"}},
                    }
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
        (
            {
                "messages": [
                    *MESSAGES,
                    {"role": "assistant", "tool_calls": [{"id": "x", "function": 5}]},
                ],
                "tool_choice": "none",
            },
            "messages",
        ),
    ],
)
def test_bad_tools_are_400s(client, kwargs, param) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, max_tokens=5, **kwargs)
    assert info.value.body["param"] == param, info.value.body


def test_auto_needs_the_server_flags() -> None:
    with pytest.raises(OpenAIError) as info:
        resolve_tools(TOOLS, "auto", True, None)
    assert info.value.param == "tool_choice"
    assert resolve_tools(TOOLS, None, True, None).mode == "none"  # implicit: text
