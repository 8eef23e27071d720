"""Structured output after the reasoning (engine/structured_output/reasoning.py): the grammar
neither masks nor advances while the model reasons, and takes over after the end marker; the
prompt's last marker says how the output begins; a Qwen3-style output may open with `<think>`
(its first mask lets the start marker through, beside the grammar's tokens)."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np
import pytest

from pagedllm.engine.structured_output.reasoning import ReasoningMarkers
from pagedllm.engine.structured_output.request import StructuredOutputRequest

THINK, END = 100, 101  # one token each, as in Qwen3's and DeepSeek-R1's tokenizers


class Tokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return {"<think>": [THINK], "</think>": [END]}[text]


class MultiTokenTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return {"<think>": [7, 8, 9], "</think>": [7, 10, 8, 9]}[text]


class Grammar:
    """A stand-in matcher: accepts even ids, records them."""

    def __init__(self) -> None:
        self.accepted: list[int] = []

    def accept_token(self, token_id: int) -> bool:
        if token_id % 2:
            return False
        self.accepted.append(token_id)
        return True

    @property
    def is_terminated(self) -> bool:
        return False


def request(parser: str, prompt: list[int], tokenizer=None) -> StructuredOutputRequest:
    markers = ReasoningMarkers(parser, tokenizer or Tokenizer())
    future: Future = Future()
    future.set_result((Grammar(), markers, markers.initial_state(prompt)))
    so = StructuredOutputRequest(future)
    assert so.ready
    return so


@pytest.mark.parametrize(
    ("parser", "prompt", "phase"),
    [
        ("deepseek_r1", [1, 2, THINK], "reasoning"),  # R1's template opens the reasoning
        ("deepseek_r1", [1, 2], "reasoning"),  # R1 may omit <think>
        ("deepseek_r1", [1, THINK, 5, END, 2], "answer"),
        ("qwen3", [1, THINK, END, 2], "answer"),  # thinking off: an empty think block
        ("qwen3", [1, 2], "maybe"),  # the model decides with its first token
        ("qwen3", [1, THINK], "reasoning"),
    ],
)
def test_the_prompts_last_marker_decides(parser, prompt, phase) -> None:
    assert request(parser, prompt).phase == phase


def test_multi_token_markers() -> None:
    markers = ReasoningMarkers("qwen3", MultiTokenTokenizer())
    assert markers.initial_state([1, 2]) == "answer"  # no one-token start: the grammar at once
    assert markers.initial_state([1, 7, 8, 9, 4]) == "reasoning"
    assert markers.initial_state([7, 8, 9, 4, 7, 10, 8, 9]) == "answer"
    so = request("deepseek_r1", [1], MultiTokenTokenizer())
    out: list[int] = []
    for t in [3, 7, 10, 8, 9]:
        out.append(t)
        assert so.accept(t, out)
    assert so.phase == "answer"
    assert so.grammar.accepted == []


def test_reasoning_then_the_grammar() -> None:
    so = request("deepseek_r1", [1, THINK])
    out: list[int] = []
    for t in [3, 5, 7, 9]:  # odd ids: the grammar would refuse them, but it waits
        out.append(t)
        assert so.accept(t, out) and so.phase == "reasoning" and not so.masks
    out.append(END)
    assert so.accept(END, out) and so.phase == "answer" and so.masks
    out.append(4)
    assert so.accept(4, out)
    out.append(5)
    assert not so.accept(5, out), "after the reasoning the grammar refuses what it forbids"
    assert so.grammar.accepted == [4]


def test_qwen3_maybe_phase() -> None:
    so = request("qwen3", [1, 2])
    row = np.zeros(8, dtype=np.int32)  # a mask allowing nothing
    so.allow_reasoning_start(row)
    allowed = [t for t in range(256) if (int(row.view(np.uint32)[t // 32]) >> (t % 32)) & 1]
    assert allowed == [THINK]
    assert so.accept(THINK, [THINK]) and so.phase == "reasoning"
    so = request("qwen3", [1, 2])
    assert so.accept(6, [6]) and so.phase == "answer"
    assert so.grammar.accepted == [6], "no <think>: the first token is the grammar's"
    row = np.zeros(8, dtype=np.int32)
    so.allow_reasoning_start(row)
    assert not row.any(), "only in phase maybe"


def test_a_start_bit_in_the_sign_word() -> None:
    class High:
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return {"<think>": [63], "</think>": [62]}[text]

    so = request("qwen3", [1], High())
    row = np.zeros(2, dtype=np.int32)
    so.allow_reasoning_start(row)
    assert row.view(np.uint32)[1] == 1 << 31
