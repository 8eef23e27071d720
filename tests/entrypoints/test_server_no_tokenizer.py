"""A server without a tokenizer (`--skip-tokenizer-init`: token-id prompts, as the benchmark
shapes with random weights have): every generated token still reaches a streaming client as a
chunk (with empty text), so `pagedllm bench serve` can time the first token and the gaps."""

from __future__ import annotations

import pytest

from tests.entrypoints.conftest import RemoteServer, tiny_server_args
from tests.entrypoints.test_openai_server import _bench


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory) -> RemoteServer:
    args = tiny_server_args(
        tiny_model_dirs["llama"],
        tmp_path_factory.mktemp("server"),
        "--skip-tokenizer-init",
        "--served-model-name",
        "tiny",
    )
    server = RemoteServer(args)
    yield server
    server.stop()


def test_each_token_is_a_chunk(server: RemoteServer) -> None:
    stream = server.client().completions.create(
        model="tiny",
        prompt=[5, 6, 7, 8],
        max_tokens=9,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = [c for c in stream if c.choices]
    assert all(c.choices[0].text == "" for c in chunks)
    assert len(chunks) == 9 and chunks[-1].choices[0].finish_reason == "length"


def test_bench_serve_times_tokens_without_text(server: RemoteServer) -> None:
    summary = _bench(server, "--num-prompts", "4", "--request-rate", "inf", "--seed", "5")
    assert summary["completed"] == 4 and summary["failed"] == 0, summary["errors"]
    assert 0 < summary["p50_ttft_ms"] <= summary["duration_s"] * 1000
    assert summary["p50_itl_ms"] > 0
