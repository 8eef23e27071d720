"""The schemas of `tool_choice="required"` and of a named function, checked with jsonschema;
`validate_tools`; `parse_required_output`."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest

from pagedllm.entrypoints.openai.tool_parsers import FunctionCall
from pagedllm.entrypoints.openai.tool_parsers.schema import (
    parse_required_output,
    tool_choice_schema,
    validate_tools,
)

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"],
    "additionalProperties": False,
}
# As pydantic writes a model with a nested one: local `$defs` and `$ref`s.
BOOKING = {
    "type": "object",
    "$defs": {
        "Guest": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "friend": {"$ref": "#/$defs/Guest"}},
            "required": ["name"],
        }
    },
    "properties": {"guest": {"$ref": "#/$defs/Guest"}},
    "required": ["guest"],
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather.", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time"}},
    {"type": "function", "function": {"name": "book", "parameters": BOOKING, "strict": True}},
]


def is_valid(schema: dict[str, Any], instance: Any) -> bool:
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema).is_valid(instance)


REQUIRED_GOOD = [
    [{"name": "get_weather", "parameters": {"city": "Paris"}}],
    [
        {"name": "get_weather", "parameters": {"city": "Zürich", "days": 3}},
        {"name": "get_time", "parameters": {}},
    ],
    [{"name": "get_time", "parameters": {"anything": [1, 2]}}],
    [{"name": "book", "parameters": {"guest": {"name": "Ann", "friend": {"name": "Bo"}}}}],
]
REQUIRED_BAD = [
    [],
    {"name": "get_weather", "parameters": {"city": "Paris"}},
    [{"name": "get_wether", "parameters": {"city": "Paris"}}],
    [{"name": "get_weather"}],
    [{"parameters": {"city": "Paris"}}],
    [{"name": "get_weather", "parameters": {"city": "Paris"}, "extra": 1}],
    [{"name": "get_weather", "parameters": {"city": 7}}],
    [{"name": "get_weather", "parameters": {"city": "Paris", "days": 0}}],
    [{"name": "get_weather", "parameters": {"town": "Paris"}}],
    [{"name": "get_time", "parameters": "now"}],
    [{"name": "book", "parameters": {"guest": {"friend": {"name": "Bo"}}}}],
    [{"name": "book", "parameters": {"guest": {"name": "Ann", "friend": {"name": 1}}}}],
]


@pytest.mark.parametrize("instance", REQUIRED_GOOD)
def test_required_schema_accepts(instance: Any) -> None:
    schema = tool_choice_schema(TOOLS, "required")
    assert schema is not None and is_valid(schema, instance)


@pytest.mark.parametrize("instance", REQUIRED_BAD)
def test_required_schema_rejects(instance: Any) -> None:
    schema = tool_choice_schema(TOOLS, "required")
    assert schema is not None and not is_valid(schema, instance)


def test_required_schema_shape() -> None:
    schema = tool_choice_schema(TOOLS, "required")
    assert schema is not None
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    options = schema["items"]["anyOf"]
    assert [o["properties"]["name"] for o in options] == [
        {"const": "get_weather"},
        {"const": "get_time"},
        {"const": "book"},
    ]
    for option in options:
        assert option["required"] == ["name", "parameters"]
        assert option["additionalProperties"] is False
    assert options[0]["properties"]["parameters"] == WEATHER
    assert options[1]["properties"]["parameters"] == {"type": "object"}


def test_required_schema_without_parallel_calls() -> None:
    schema = tool_choice_schema(TOOLS, "required", parallel_tool_calls=False)
    assert schema is not None
    assert is_valid(schema, REQUIRED_GOOD[0]) and not is_valid(schema, REQUIRED_GOOD[1])


def test_named_schema_is_the_tools_parameters() -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    schema = tool_choice_schema(TOOLS, choice)
    assert schema == WEATHER
    assert is_valid(schema, {"city": "Paris", "days": 2})
    assert not is_valid(schema, {"city": "Paris", "days": "2"})
    assert not is_valid(schema, [{"name": "get_weather", "parameters": {"city": "Paris"}}])
    booking = tool_choice_schema(TOOLS, {"type": "function", "function": {"name": "book"}})
    assert booking is not None and is_valid(booking, {"guest": {"name": "Ann"}})
    assert not is_valid(booking, {"guest": {"name": 3}})
    time = tool_choice_schema(TOOLS, {"type": "function", "function": {"name": "get_time"}})
    assert time == {"type": "object"}


@pytest.mark.parametrize("choice", [None, "none", "auto"])
def test_no_schema_without_a_forced_call(choice: Any) -> None:
    assert tool_choice_schema(TOOLS, choice) is None


def test_schemas_do_not_alias_the_tools() -> None:
    tools = copy.deepcopy(TOOLS)
    for choice in ["required", {"type": "function", "function": {"name": "get_weather"}}]:
        schema = tool_choice_schema(tools, choice)
        assert schema is not None
        json.dumps(schema)  # plain JSON
        schema.clear()
    assert tools == TOOLS


def test_validate_tools_accepts() -> None:
    for choice in [
        None,
        "none",
        "auto",
        "required",
        {"type": "function", "function": {"name": "book"}},
    ]:
        validate_tools(TOOLS, choice)
    validate_tools(None, None)
    validate_tools(None, "auto")
    validate_tools([], "none")
    validate_tools([{"type": "function", "function": {"name": "f", "description": None}}], "auto")


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        ({"type": "function"}, None, r"^tools: must be an array"),
        (["get_weather"], None, r"^tools\[0\]: must be"),
        ([{"type": "code", "function": {"name": "f"}}], None, r"^tools\[0\]: must be"),
        ([{"type": "function"}], None, r"^tools\[0\]\.function: must be an object"),
        ([{"type": "function", "function": {"name": ""}}], None, r"^tools\[0\]\.function\.name"),
        ([{"type": "function", "function": {"name": 3}}], None, r"^tools\[0\]\.function\.name"),
        (
            [TOOLS[0], {"type": "function", "function": {"name": "f", "description": 1}}],
            None,
            r"^tools\[1\]\.function\.description",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": "x"}}],
            None,
            r"^tools\[0\]\.function\.parameters",
        ),
        ([TOOLS[1], TOOLS[1]], None, r"^tools\[1\]\.function\.name: 'get_time' is defined twice"),
        (TOOLS, "always", r"^tool_choice: unknown value 'always'"),
        (TOOLS, 3, r"^tool_choice: must be"),
        (TOOLS, {"type": "function"}, r"^tool_choice: must be"),
        (TOOLS, {"type": "function", "function": {"name": 1}}, r"^tool_choice: must be"),
        (TOOLS, {"function": {"name": "get_time"}}, r"^tool_choice: must be"),
        (
            TOOLS,
            {"type": "function", "function": {"name": "nope"}},
            r"^tool_choice: .*'nope' is not among tools",
        ),
        (None, "required", r"^tool_choice: \"required\" needs at least one tool"),
        ([], "required", r"^tool_choice: \"required\" needs at least one tool"),
        (None, {"type": "function", "function": {"name": "f"}}, r"^tool_choice: .*no tools"),
    ],
)
def test_validate_tools_rejects(tools: Any, choice: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_tools(tools, choice)


def test_parse_required_output() -> None:
    text = '[{"name": "get_weather", "parameters": {"city":"Zürich","days":3}}, {"name": "get_time", "parameters": {}}]'
    assert parse_required_output(text) == [
        FunctionCall("get_weather", '{"city": "Zürich", "days": 3}'),
        FunctionCall("get_time", "{}"),
    ]
    assert parse_required_output('{"city": "\\u6771\\u4eac"}', name="get_weather") == [
        FunctionCall("get_weather", '{"city": "東京"}')
    ]


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ('[{"name": "f", "parameters": {"a": 1}}', None),  # cut short
        ("[]", None),
        ('{"name": "f", "parameters": {}}', None),
        ('[{"name": "f"}]', None),
        ('[{"name": "f", "parameters": [1]}]', None),
        ('[{"name": 1, "parameters": {}}]', None),
        ("[1]", None),
        ("[1]", "f"),
        ('{"a": ', "f"),
    ],
)
def test_parse_required_output_rejects(text: str, name: str | None) -> None:
    with pytest.raises(ValueError):
        parse_required_output(text, name)


def test_required_output_round_trip() -> None:
    """What the schema admits, parse_required_output reads back."""
    schema = tool_choice_schema(TOOLS, "required")
    assert schema is not None
    for instance in REQUIRED_GOOD:
        assert is_valid(schema, instance)
        calls = parse_required_output(json.dumps(instance))
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [
            (item["name"], item["parameters"]) for item in instance
        ]
