"""`pagedllm serve` with no MODEL serves the default model, SmolLM2-135M-Instruct, whose answers
are real text: greedy chat and completion know the capital of France."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pagedllm.models.default import (
    DEFAULT_MODEL,
    DefaultModelNotInstalledError,
    default_model_path,
)
from tests.entrypoints.conftest import RemoteServer

try:
    default_model_path()
except DefaultModelNotInstalledError as e:  # pragma: no cover - CI installs it
    pytest.skip(f"default model not installed: {e}", allow_module_level=True)


@pytest.fixture(scope="module")
def server() -> Iterator[RemoteServer]:
    server = RemoteServer(["--max-model-len", "1024", "--kv-cache-memory", "256MiB"], api_key=None)
    try:
        yield server
    finally:
        server.stop()


def test_chat_knows_the_capital_of_france(server: RemoteServer) -> None:
    client = server.client()
    assert [m.id for m in client.models.list().data] == [DEFAULT_MODEL]
    out = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=32,
    )
    assert "Paris" in out.choices[0].message.content
    assert out.choices[0].finish_reason in ("stop", "length")
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=32,
            stream=True,
        )
        if c.choices
    )
    assert streamed == out.choices[0].message.content


def test_completion_knows_the_capital_of_france(server: RemoteServer) -> None:
    out = server.client().completions.create(
        model=DEFAULT_MODEL, prompt="The capital of France is", temperature=0, max_tokens=8
    )
    assert "Paris" in out.choices[0].text
