"""The server's process lifecycle: SIGTERM drains the request in flight and exits 0; when the
engine-core process dies, requests fail with a clear 503 and /health reports it, while the HTTP
server itself keeps answering. Each test runs its own server (both end it)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import openai
import pytest

from tests.entrypoints.conftest import RemoteServer, httpx, tiny_server_args


@pytest.fixture
def server(tiny_model_dirs, tmp_path) -> RemoteServer:
    server = RemoteServer(tiny_server_args(tiny_model_dirs["llama"], tmp_path))
    yield server
    server.stop()


@pytest.mark.parametrize("to_group", [False, True], ids=["server", "process-group"])
def test_sigterm_drains_the_request_in_flight_then_exits_0(
    server: RemoteServer, to_group: bool
) -> None:
    """SIGTERM to the server alone, or to its whole process group (systemd, `timeout`, a
    container stop): the engine-core child must outlive it until the drain is done."""
    client = server.client()
    max_tokens = 300
    stream = client.completions.create(
        model=server_model(server),
        prompt="The quick brown fox",
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    first = next(chunks)  # the request is running
    assert first.choices[0].text is not None
    if to_group:
        os.killpg(server.proc.pid, signal.SIGTERM)
    else:
        server.proc.send_signal(signal.SIGTERM)
    # New connections are refused once the server stops accepting.
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(server.url("/health"), timeout=2)
        except httpx.TransportError:
            break
        assert time.monotonic() < deadline, "the server still accepts connections"
        time.sleep(0.05)
    rest = list(chunks)
    finish = [c.choices[0].finish_reason for c in rest if c.choices]
    usage = [c.usage for c in rest if c.usage is not None]
    assert finish[-1] == "length"
    assert usage and usage[0].completion_tokens == max_tokens  # it ran to the end
    assert server.proc.wait(60) == 0


def server_model(server: RemoteServer) -> str:
    return server.client().models.list().data[0].id


def _engine_core_pid(server_pid: int) -> int:
    """The engine-core process: the server's child started by multiprocessing's spawn."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    for pid in children:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmdline:
            return int(pid)
    raise AssertionError(f"no engine-core child among {children}")


def test_dead_engine_is_503_and_unhealthy(server: RemoteServer) -> None:
    client = server.client()
    model = server_model(server)
    assert client.completions.create(model=model, prompt="Hi", max_tokens=2).choices
    # A request in flight when the engine dies fails with an error event in its stream.
    stream = client.completions.create(
        model=model,
        prompt="Hi",
        max_tokens=900,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    next(chunks)
    errors: list[BaseException] = []

    def drain() -> None:
        try:
            list(chunks)
        except openai.APIError as e:
            errors.append(e)

    reader = threading.Thread(target=drain)
    reader.start()
    os.kill(_engine_core_pid(server.proc.pid), signal.SIGKILL)
    reader.join(60)
    assert not reader.is_alive()
    assert errors and "engine" in str(errors[0])

    deadline = time.monotonic() + 30
    while httpx.get(server.url("/health")).status_code != 503:
        assert time.monotonic() < deadline, "/health never reported the dead engine"
        time.sleep(0.1)
    body = httpx.get(server.url("/health")).json()
    assert body["error"]["code"] == "engine_dead"
    # Within the grace period it answers with a clear error, then exits with status 1, so that
    # a supervisor restarts it (vLLM's behaviour).
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=model, prompt="Hi", max_tokens=2)
    assert info.value.status_code == 503 and "engine" in info.value.message
    assert server.proc.wait(30) == 1
