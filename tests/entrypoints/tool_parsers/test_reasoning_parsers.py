"""The reasoning parsers: whole outputs, streaming in every chunking, `is_reasoning_end`."""

from __future__ import annotations

import itertools
import random

import pytest

from pagedllm.entrypoints.openai.reasoning_parsers import (
    REASONING_PARSERS,
    ReasoningParser,
    get_reasoning_parser,
)
from pagedllm.entrypoints.openai.tool_parsers.base import partial_marker_len

Split = tuple[str | None, str | None]

CASES: list[tuple[str, str, Split]] = [
    # ---- deepseek_r1 ----
    (
        "deepseek_r1",
        "<think>\nThe user asks for 2+2.\nThat is 4.\n</think>\n\n2 + 2 = **4**.",
        ("The user asks for 2+2.\nThat is 4.\n", "2 + 2 = **4**."),
    ),
    (  # `<think>` was in the prompt
        "deepseek_r1",
        "Okay, so the user wants a haiku about the sea. Let me count syllables.\n</think>\n\n"
        "Waves fold into foam\nsalt wind writes on the wet sand\nthe tide keeps its time",
        (
            "Okay, so the user wants a haiku about the sea. Let me count syllables.\n",
            "Waves fold into foam\nsalt wind writes on the wet sand\nthe tide keeps its time",
        ),
    ),
    (  # cut short while thinking
        "deepseek_r1",
        "Let me think about <this> and </thin",
        ("Let me think about <this> and </thin", None),
    ),
    ("deepseek_r1", "<think>\n\n</think>\n\nHi!", (None, "Hi!")),
    ("deepseek_r1", "</think>", (None, None)),
    (
        "deepseek_r1",
        "思考：用户说你好。</think>你好！我可以用 </think> 这个词。\r\n",
        ("思考：用户说你好。", "你好！我可以用 </think> 这个词。\r\n"),
    ),
    ("deepseek_r1", "\n<think>\nhmm", ("hmm", None)),
    # ---- qwen3 ----
    (
        "qwen3",
        "<think>\nOkay, the user greets me. I should answer kindly.\n</think>\n\nHello! How can I "
        "help you today?",
        ("Okay, the user greets me. I should answer kindly.\n", "Hello! How can I help you today?"),
    ),
    ("qwen3", "Hello! How can I help?", (None, "Hello! How can I help?")),
    ("qwen3", "\n\nHello </think> there", (None, "Hello </think> there")),
    ("qwen3", "<think>\nStill thinking <thi", ("Still thinking <thi", None)),
    ("qwen3", "<thinking>is not the tag</thinking>", (None, "<thinking>is not the tag</thinking>")),
    ("qwen3", "<think></think>Only content", (None, "Only content")),
    ("qwen3", "", (None, None)),
]


def chunkings(text: str, seed: int) -> list[list[str]]:
    out = [[text[i : i + size] for i in range(0, len(text), size)] for size in range(1, 8)]
    rng = random.Random(seed)
    for _ in range(12):
        cuts = (
            sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1))) if text else []
        )
        bounds = [0, *cuts, len(text)]
        out.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return out


def stream(parser: ReasoningParser, chunks: list[str]) -> Split:
    reasoning = content = ""
    text = ""
    deltas = []
    for chunk in chunks:
        previous, text = text, text + chunk
        deltas.append(parser.extract_reasoning_streaming(previous, text, chunk))
    deltas.append(parser.finish_streaming())
    for delta in deltas:
        if delta is None:
            continue
        assert delta.reasoning_content or delta.content, "an empty delta must be None"
        assert not delta.tool_calls
        if delta.reasoning_content:
            assert not content, "reasoning after the content began"
        reasoning += delta.reasoning_content or ""
        content += delta.content or ""
    return reasoning or None, content or None


@pytest.mark.parametrize(("name", "output", "split"), CASES)
def test_extract_reasoning(name: str, output: str, split: Split) -> None:
    assert get_reasoning_parser(name)().extract_reasoning(output) == split


@pytest.mark.parametrize(("name", "output", "split"), CASES)
def test_streaming_matches_whole(name: str, output: str, split: Split) -> None:
    for chunks in chunkings(output, seed=len(output)):
        assert stream(get_reasoning_parser(name)(), chunks) == split, chunks


def test_reasoning_streams_without_delay_but_a_partial_end_tag() -> None:
    text = "Thinking about < and </ and </thi and more"
    parser = get_reasoning_parser("deepseek_r1")()
    sent = ""
    for i in range(1, len(text) + 1):
        delta = parser.extract_reasoning_streaming(text[: i - 1], text[:i], text[i - 1])
        sent += delta.reasoning_content or "" if delta else ""
        assert sent == text[: i - partial_marker_len(text[:i], "</think>")]


def test_content_streams_once_the_reasoning_ends() -> None:
    parser = get_reasoning_parser("qwen3")()
    assert parser.extract_reasoning_streaming("", "<thi", "<thi") is None
    delta = parser.extract_reasoning_streaming("<thi", "<think>\nA", "nk>\nA")
    assert delta is not None and (delta.reasoning_content, delta.content) == ("A", None)
    text = "<think>\nA</think>\n\nB"
    delta = parser.extract_reasoning_streaming("<think>\nA", text, "</think>\n\nB")
    assert delta is not None and (delta.reasoning_content, delta.content) == (None, "B")
    assert parser.finish_streaming() is None


def test_extract_leaves_streaming_state_alone() -> None:
    parser = get_reasoning_parser("deepseek_r1")()
    parser.extract_reasoning_streaming("", "abc</th", "abc</th")
    assert parser.extract_reasoning("x</think>y") == ("x", "y")
    delta = parser.extract_reasoning_streaming("abc</th", "abc</think>z", "ink>z")
    assert delta is not None and (delta.reasoning_content, delta.content) == (None, "z")


@pytest.mark.parametrize(
    ("name", "text", "ended"),
    [
        ("deepseek_r1", "", False),
        ("deepseek_r1", "<think>\nhmm", False),
        ("deepseek_r1", "hmm </thin", False),
        ("deepseek_r1", "hmm </think>", True),
        ("qwen3", "", False),
        ("qwen3", "\n<thi", False),
        ("qwen3", "<think>\nhmm", False),
        ("qwen3", "<think>\nhmm</think>", True),
        ("qwen3", "Hello", True),  # thinking disabled: the answer began at once
    ],
)
def test_is_reasoning_end(name: str, text: str, ended: bool) -> None:
    assert get_reasoning_parser(name)().is_reasoning_end(text) is ended


def test_registry() -> None:
    assert set(REASONING_PARSERS) == {"deepseek_r1", "qwen3"}
    with pytest.raises(ValueError, match=r"unknown reasoning parser 'nope'.*deepseek_r1.*qwen3"):
        get_reasoning_parser("nope")
