"""The tool-call parsers on outputs written as the models print them: whole and streamed."""

from __future__ import annotations

import itertools
import json
import random
import re
import time
from typing import Any

import pytest

from pagedllm.entrypoints.openai.tool_parsers import (
    TOOL_PARSERS,
    DeltaMessage,
    ToolParser,
    get_tool_parser,
    make_tool_call_id,
)
from pagedllm.entrypoints.openai.tool_parsers.base import find_closing, partial_marker_len

WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "ratio": {"type": "number"},
                    "hourly": {"type": "boolean"},
                    "options": {"type": "object"},
                    "tags": {"type": ["array", "null"]},
                    "zip": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                },
            },
        },
    },
    {"type": "function", "function": {"name": "write_file"}},
]

Calls = list[tuple[str, dict[str, Any]]]

# (parser, output, expected content, expected calls)
CASES: list[tuple[str, str, str | None, Calls]] = [
    # ---- hermes ----
    (
        "hermes",
        '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Boston, MA", '
        '"unit": "fahrenheit"}}\n</tool_call>',
        None,
        [("get_current_weather", {"location": "Boston, MA", "unit": "fahrenheit"})],
    ),
    (
        "hermes",
        "Je vais vérifier la météo à Zürich et à Tōkyō.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "options": '
        '{"units": ["metric", "°C"], "days": 3, "hourly": false, "nested": {"a": [1, [2, {}]]}}}}'
        "\n</tool_call>\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "\\u6771\\u4eac", '
        '"note": "say \\"hi\\" ☃ <tool_call> {braces} [x]"}}\n</tool_call>',
        "Je vais vérifier la météo à Zürich et à Tōkyō.\n",
        [
            (
                "get_weather",
                {
                    "city": "Zürich",
                    "options": {
                        "units": ["metric", "°C"],
                        "days": 3,
                        "hourly": False,
                        "nested": {"a": [1, [2, {}]]},
                    },
                },
            ),
            ("get_weather", {"city": "東京", "note": 'say "hi" ☃ <tool_call> {braces} [x]'}),
        ],
    ),
    (
        "hermes",
        "First the file.\n"
        '<tool_call>\n{"name": "write_file", "arguments": "{\\"path\\": \\"a.txt\\"}"}\n</tool_call>'
        '\n\n<tool_call>{"name": "ping"}</tool_call>\nThat is all; tell me when <b>done</b>.\n',
        "First the file.\nThat is all; tell me when <b>done</b>.\n",
        [("write_file", {"path": "a.txt"}), ("ping", {})],
    ),
    (
        "hermes",  # stopped right before `</tool_call>` (a stop string)
        '<tool_call>\n{"name": "f", "arguments": {"a": 1.5e3, "b": null}}\n',
        None,
        [("f", {"a": 1500.0, "b": None})],
    ),
    (
        "hermes",
        "No tool needed: use a < b, or <tool without the call, or </tool_call> alone. <tool_",
        "No tool needed: use a < b, or <tool without the call, or </tool_call> alone. <tool_",
        [],
    ),
    (
        "hermes",  # a valid call then a malformed one: the malformed one is content
        '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {"x": 1}\n</tool_call>',
        '<tool_call>\n{"name": "b", "arguments": {"x": 1}\n</tool_call>',
        [("a", {})],
    ),
    # ---- llama3_json ----
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"location": "San Francisco, CA", '
        '"unit": "celsius"}}',
        None,
        [("get_weather", {"location": "San Francisco, CA", "unit": "celsius"})],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "search", "parameters": {"query": "café près de moi", '
        '"filters": {"open_now": true, "price": [1, 2], "note": "a } or ; inside"}}}',
        None,
        [
            (
                "search",
                {
                    "query": "café près de moi",
                    "filters": {"open_now": True, "price": [1, 2], "note": "a } or ; inside"},
                },
            )
        ],
    ),
    (
        "llama3_json",
        '\n\n{"type": "function", "name": "a", "parameters": {"x": 1}}; '
        '{"name": "b", "arguments": {"y": [1.5, null, "\\u00e9"]}}',
        None,
        [("a", {"x": 1}), ("b", {"y": [1.5, None, "é"]})],
    ),
    (
        "llama3_json",
        '{"name": "a", "parameters": {}}; and then some words',
        "and then some words",
        [("a", {})],
    ),
    ("llama3_json", "The weather in Paris is sunny.", "The weather in Paris is sunny.", []),
    ("llama3_json", '{"name": "Alice", "age": 30}', '{"name": "Alice", "age": 30}', []),
    # ---- mistral ----
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, France", '
        '"format": "celsius"}}]',
        None,
        [("get_current_weather", {"location": "Paris, France", "format": "celsius"})],
    ),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "a", "arguments": {"x": {"y": [1, 2, {"z": "ü ] }"}]}}}, '
        '{"name": "b", "arguments": {}}]',
        None,
        [("a", {"x": {"y": [1, 2, {"z": "ü ] }"}]}}), ("b", {})],
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Marseille", "units": "°C"}'
        '[TOOL_CALLS]get_time[ARGS]{"tz": "Europe/Paris"}',
        None,
        [
            ("get_weather", {"city": "Marseille", "units": "°C"}),
            ("get_time", {"tz": "Europe/Paris"}),
        ],
    ),
    (
        "mistral",
        'Let me check that for you.[TOOL_CALLS]search[ARGS]{"q": "brackets ] } [TOOL_CALLS]"}',
        "Let me check that for you.",
        [("search", {"q": "brackets ] } [TOOL_CALLS]"})],
    ),
    (
        "mistral",
        "No tools needed: [1, 2, 3] is a list, [TOOL is no marker, nor [ARGS].",
        "No tools needed: [1, 2, 3] is a list, [TOOL is no marker, nor [ARGS].",
        [],
    ),
    # ---- qwen3_xml ----
    (
        "qwen3_xml",
        "I'll check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n"
        "</parameter>\n<parameter=days>\n5\n</parameter>\n<parameter=ratio>\n0.25\n</parameter>\n"
        "<parameter=hourly>\nTrue\n</parameter>\n<parameter=options>\n"
        '{"units": ["°F"], "alerts": {"wind": true}}\n</parameter>\n<parameter=tags>\nnull\n'
        "</parameter>\n<parameter=zip>\n02134\n</parameter>\n</function>\n</tool_call>",
        "I'll check.\n",
        [
            (
                "get_weather",
                {
                    "city": "San Francisco",
                    "days": 5,
                    "ratio": 0.25,
                    "hourly": True,
                    "options": {"units": ["°F"], "alerts": {"wind": True}},
                    "tags": None,
                    "zip": "02134",
                },
            )
        ],
    ),
    (
        "qwen3_xml",
        "<tool_call>\n<function=write_file>\n<parameter=path>\nsrc/main.py\n</parameter>\n"
        '<parameter=content>\ndef main():\n    print("héllo <world>")\n\n\nif __name__ == '
        '"__main__":\n    main()\n\n</parameter>\n</function>\n</tool_call>\n'
        "<tool_call>\n<function=get_weather>\n<parameter=city>\n42\n</parameter>\n"
        "<parameter=days>\nthree\n<parameter=unknown>\n7\n</function>\n</tool_call>",
        None,
        [
            (
                "write_file",
                {
                    "path": "src/main.py",
                    "content": 'def main():\n    print("héllo <world>")\n\n\nif __name__ == '
                    '"__main__":\n    main()\n',
                },
            ),
            ("get_weather", {"city": "42", "days": "three", "unknown": "7"}),
        ],
    ),
    (
        "qwen3_xml",
        "Nothing to call here; <function=x> is just text.",
        "Nothing to call here; <function=x> is just text.",
        [],
    ),
    # ---- pythonic ----
    (
        "pythonic",
        "[get_weather(city=\"San Francisco\", metric=True), get_time(timezone='America/New_York')]",
        None,
        [
            ("get_weather", {"city": "San Francisco", "metric": True}),
            ("get_time", {"timezone": "America/New_York"}),
        ],
    ),
    (
        "pythonic",
        '<|python_start|>[search(query="naïve café", filters={"open": True, "tags": ("a", "b")}, '
        "limit=10, offset=-5, ratio=+0.5, extra=None, flag=false)]<|python_end|>",
        None,
        [
            (
                "search",
                {
                    "query": "naïve café",
                    "filters": {"open": True, "tags": ["a", "b"]},
                    "limit": 10,
                    "offset": -5,
                    "ratio": 0.5,
                    "extra": None,
                    "flag": False,
                },
            )
        ],
    ),
    (
        "pythonic",
        ' [files.read(path="it\'s ] tricky ("), ping()]\n\nDone, see above.',
        "Done, see above.",
        [("files.read", {"path": "it's ] tricky ("}), ("ping", {})],
    ),
    (
        "pythonic",
        'Here you go: [get_weather(city="Paris")]',
        'Here you go: [get_weather(city="Paris")]',
        [],
    ),
    ("pythonic", "[1] A footnote, and [Note](link).", "[1] A footnote, and [Note](link).", []),
]

# Outputs that look like calls but are not: all content, as written; never an exception.
MALFORMED: list[tuple[str, str]] = [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1'),
    ("hermes", '<tool_call>\n["not", "an", "object"]\n</tool_call>'),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": [1]}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>'),
    ("hermes", "<tool_call>"),
    ("llama3_json", '{"name": "f", "parameters": {"x": 1}'),
    ("llama3_json", '{"name": "f", "parameters": "not an object"}'),
    ("llama3_json", '{"name": "f"}'),
    ("llama3_json", 'Sure! {"name": "f", "parameters": {}}'),
    ("llama3_json", "<|python_tag|>brave_search.call(query='weather')"),
    ("llama3_json", '<|python_tag|>{"query": "weather"}'),
    ("llama3_json", "{not json at all}"),
    ("mistral", "[TOOL_CALLS] not json at all"),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}'),
    ("mistral", "[TOOL_CALLS]f[ARGS]not-json"),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 1'),
    ("mistral", '[TOOL_CALLS]f[ARGS]["a"]'),
    ("mistral", '[TOOL_CALLS] [{"arguments": {}}]'),
    ("mistral", "[TOOL_CALLS] []"),
    ("mistral", "[TOOL_CALLS]f"),
    ("mistral", "[TOOL_CALLS]"),
    ("qwen3_xml", "<tool_call>\nno function here\n</tool_call>"),
    ("qwen3_xml", "<tool_call>\n<function=f>\n<parameter=a>\n1\n"),
    ("qwen3_xml", "<tool_call>\n<function=>\n</function>\n</tool_call>"),
    ("pythonic", "[get_weather(city=unknown_var)]"),
    ("pythonic", '[get_weather("Paris")]'),
    ("pythonic", "[print(1) + 2]"),
    ("pythonic", '[get_weather(city="Paris")'),
    ("pythonic", "[1, 2, 3]"),
    ("pythonic", "[f(x=1), 42]"),
    ("pythonic", "[f(**kw)]"),
    ("pythonic", "[f(x={1, 2})]"),
    ("pythonic", "[f(x=1e999)]"),
    ("pythonic", "[f(x=b'bytes')]"),
    ("pythonic", "[f(x=1 + 2j)]"),
    ("pythonic", "[f(x={1: 2})]"),
    ("pythonic", "[f(x=-True)]"),
    ("pythonic", "[(lambda: 0)()]"),
    ("pythonic", "[f(x=1)(y=2)]"),
    ("pythonic", "[f(x=1)] [g(y=2"),  # the first list stands: only the rest is content
]


def parser_for(name: str) -> ToolParser:
    return get_tool_parser(name)(None, tools=WEATHER_TOOLS)


def chunkings(text: str, seed: int) -> list[list[str]]:
    """The text cut in pieces of every size from 1 to 7, at random places, and not at all."""
    out = [[text[i : i + size] for i in range(0, len(text), size)] for size in range(1, 8)]
    rng = random.Random(seed)
    for _ in range(12):
        k = rng.randint(1, max(1, len(text) // 3))
        cuts = (
            sorted(rng.sample(range(1, len(text)), min(k, len(text) - 1))) if len(text) > 1 else []
        )
        bounds = [0, *cuts, len(text)]
        out.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    out.append([text])
    return out


def stream(parser: ToolParser, chunks: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Feed the chunks as the server would; check each delta's shape as OpenAI's stream has it;
    return the streamed content and the (name, arguments) of each call, by index."""
    deltas: list[DeltaMessage | None] = []
    text = ""
    for chunk in chunks:
        previous, text = text, text + chunk
        deltas.append(parser.extract_tool_calls_streaming(previous, text, chunk))
    deltas.append(parser.finish_streaming())
    content = ""
    calls: list[list[str]] = []
    ids: list[str] = []
    for delta in deltas:
        if delta is None:
            continue
        assert delta.content or delta.tool_calls, "an empty delta must be None"
        assert delta.reasoning_content is None
        content += delta.content or ""
        for tool in delta.tool_calls:
            assert tool.function is not None
            if tool.index == len(calls):  # a new call: its header first
                assert tool.id and tool.type == "function" and tool.function.name
                assert tool.function.arguments in ("", None)
                calls.append([tool.function.name, ""])
                ids.append(tool.id)
            else:  # then only arguments, for the latest call
                assert tool.index == len(calls) - 1
                assert tool.id is None and tool.type is None and tool.function.name is None
                assert tool.function.arguments
                calls[tool.index][1] += tool.function.arguments
    assert len(set(ids)) == len(ids)
    return content or None, [(name, arguments) for name, arguments in calls]


def whole(parser: ToolParser, text: str) -> tuple[str | None, list[tuple[str, str]]]:
    result = parser.extract_tool_calls(text)
    assert result.tools_called == bool(result.tool_calls)
    assert all(call.type == "function" for call in result.tool_calls)
    return result.content, [(c.function.name, c.function.arguments) for c in result.tool_calls]


@pytest.mark.parametrize(("name", "output", "content", "calls"), CASES)
def test_extract_tool_calls(name: str, output: str, content: str | None, calls: Calls) -> None:
    got_content, got_calls = whole(parser_for(name), output)
    assert got_content == content
    assert [n for n, _ in got_calls] == [n for n, _ in calls]
    for (_, arguments), (_, expected) in zip(got_calls, calls):
        assert json.loads(arguments) == expected
        # re-serialized: json.dumps' spacing, unicode as is
        assert arguments == json.dumps(expected, ensure_ascii=False)


@pytest.mark.parametrize(
    ("name", "output"), [(c[0], c[1]) for c in CASES] + MALFORMED, ids=lambda v: str(v)[:40]
)
def test_streaming_matches_whole(name: str, output: str) -> None:
    expected = whole(parser_for(name), output)
    for i, chunks in enumerate(chunkings(output, seed=len(output))):
        assert stream(parser_for(name), chunks) == expected, (i, chunks)


@pytest.mark.parametrize(("name", "output"), MALFORMED, ids=lambda v: str(v)[:40])
def test_malformed_calls_are_content(name: str, output: str) -> None:
    content, calls = whole(parser_for(name), output)
    if output.startswith("[f(x=1)] "):  # a valid list, then a broken one after it
        assert calls == [("f", '{"x": 1}')] and content == "[g(y=2"
        return
    assert calls == []
    assert content == output


@pytest.mark.parametrize(
    ("name", "marker"),
    [("hermes", "<tool_call>"), ("qwen3_xml", "<tool_call>"), ("mistral", "[TOOL_CALLS]")],
)
def test_plain_text_is_held_back_only_for_a_partial_marker(name: str, marker: str) -> None:
    text = (
        f"Plain text with {marker[:3]} and {marker[:-1]}x, a {marker[:5]}y... ending {marker[:4]}"
    )
    parser = parser_for(name)
    sent = ""
    for i in range(1, len(text) + 1):
        delta = parser.extract_tool_calls_streaming(text[: i - 1], text[:i], text[i - 1])
        sent += delta.content or "" if delta else ""
        assert sent == text[: i - partial_marker_len(text[:i], marker)]
    assert sent.endswith(" ending ")
    final = parser.finish_streaming()
    assert final is not None and sent + (final.content or "") == text


@pytest.mark.parametrize("name", ["llama3_json", "pythonic"])
def test_plain_text_passes_at_once_for_whole_output_formats(name: str) -> None:
    text = "Paris is the capital of France. {json} [list] <|python_tag|>"
    parser = parser_for(name)
    first = parser.extract_tool_calls_streaming("", "P", "P")
    assert first is not None and first.content == "P"
    delta = parser.extract_tool_calls_streaming("P", text, text[1:])
    assert delta is not None and delta.content == text[1:]
    assert parser.finish_streaming() is None


def test_streaming_sends_a_call_as_soon_as_it_closes() -> None:
    parser = parser_for("hermes")
    head = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call'
    assert parser.extract_tool_calls_streaming("", head, head) is None
    delta = parser.extract_tool_calls_streaming(head, head + ">", ">")
    assert delta is not None and delta.content is None
    assert [(t.index, t.function.name if t.function else None) for t in delta.tool_calls] == [
        (0, "f"),
        (0, None),
    ]
    assert delta.tool_calls[1].function is not None
    assert delta.tool_calls[1].function.arguments == '{"a": 1}'


def test_extract_leaves_streaming_state_alone() -> None:
    parser = parser_for("hermes")
    parser.extract_tool_calls_streaming("", "Hi <tool", "Hi <tool")
    assert parser.extract_tool_calls("Other text").content == "Other text"
    delta = parser.extract_tool_calls_streaming("Hi <tool", "Hi <tools", "s")
    assert delta is not None and delta.content == "<tools"


def test_whitespace_only_content_is_none() -> None:
    call = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    for text in ["\n" + call + "\n\n", f"  {call} \n {call}\n"]:
        content, calls = whole(parser_for("hermes"), text)
        assert content is None and len(calls) == text.count("<tool_call>")
        assert stream(parser_for("hermes"), list(text)) == (content, calls)
    assert whole(parser_for("hermes"), "  \n") == (None, [])


def test_qwen3_xml_without_tools_keeps_strings() -> None:
    text = (
        "<tool_call>\n<function=get_weather>\n<parameter=days>\n5\n</parameter>\n"
        "<parameter=hourly>\ntrue\n</parameter>\n</function>\n</tool_call>"
    )
    assert whole(get_tool_parser("qwen3_coder")(), text)[1] == [
        ("get_weather", '{"days": "5", "hourly": "true"}')
    ]
    with_tools = whole(get_tool_parser("qwen3_coder")(tools=WEATHER_TOOLS), text)
    assert with_tools[1] == [("get_weather", '{"days": 5, "hourly": true}')]


def test_fuzzed_outputs_never_raise_and_stream_alike() -> None:
    pieces = [
        "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>",
        "<|python_start|>", "<|python_end|>", "<function=f>", "</function>", "<parameter=a>",
        "</parameter>", '{"name": "f", "arguments": {"a": 1}}', '{"name": "g", "parameters": {}}',
        "[f(x=1)]", "[g(", ")]", "{", "}", "[", "]", '"', "'", "\\", ";", " ", "\n", "text",
        "é", "null", "NaN",
    ]  # fmt: skip
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        for name in TOOL_PARSERS:
            expected = whole(parser_for(name), text)
            chunks = chunkings(text, seed=rng.randint(0, 10**6))
            for chunk in rng.sample(chunks, 3):
                assert stream(parser_for(name), chunk) == expected, (name, text, chunk)


@pytest.mark.parametrize(
    ("name", "template"),
    [
        ("hermes", '<tool_call>{"name": "write", "arguments": {"text": %s}}</tool_call>'),
        ("llama3_json", '{"name": "write", "parameters": {"text": %s}}'),
        ("mistral", '[TOOL_CALLS]write[ARGS]{"text": %s}'),
        ("pythonic", "[write(text=%s)]"),
    ],
)
def test_a_long_call_is_read_once_not_once_per_chunk(name: str, template: str) -> None:
    body = "def f(x):\n    return {'a': [x, (1, 2)]}  # \"quoted\" \\ é\n" * 1500
    text = template % json.dumps(body, ensure_ascii=False)  # ~70 KB, in 3-character chunks
    start = time.perf_counter()
    got = stream(parser_for(name), [text[i : i + 3] for i in range(0, len(text), 3)])
    assert time.perf_counter() - start < 10  # rescanning the call per chunk takes minutes
    assert got == (None, [("write", json.dumps({"text": body}, ensure_ascii=False))])


def test_tool_call_ids() -> None:
    ids = {make_tool_call_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)
    result = parser_for("mistral").extract_tool_calls("[TOOL_CALLS]f[ARGS]{}[TOOL_CALLS]g[ARGS]{}")
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c.id) for c in result.tool_calls)
    hermes = parser_for("hermes").extract_tool_calls('<tool_call>{"name": "f"}</tool_call>')
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", hermes.tool_calls[0].id)


def test_registry() -> None:
    assert set(TOOL_PARSERS) == {
        "hermes", "llama3_json", "mistral", "qwen3_xml", "qwen3_coder", "pythonic"
    }  # fmt: skip
    assert get_tool_parser("qwen3_coder") is get_tool_parser("qwen3_xml")
    for cls in TOOL_PARSERS.values():
        assert isinstance(cls(None, tools=None), ToolParser)
    with pytest.raises(ValueError, match=r"unknown tool call parser 'nope'.*hermes.*pythonic"):
        get_tool_parser("nope")


def test_find_closing() -> None:
    assert find_closing('{"a": "}", "b": [1, {"c": 2}]} tail', 0) == 30
    assert find_closing('{"a": "\\"}"', 0) is None
    assert find_closing("[f(x=')'), g()]", 0, quotes="\"'") == 15
