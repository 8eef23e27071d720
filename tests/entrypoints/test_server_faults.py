"""The server under faults and load (each test runs its own server on the tiny Llama): SIGTERM
with 16 streams in flight drains them all and leaves no process behind; half of 64 streams
hanging up mid-stream frees every KV block; `--request-timeout` aborts requests (408) and frees
their blocks; `--max-num-waiting` answers 503 with Retry-After past the queue's bound."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.entrypoints.conftest import RemoteServer, httpx, tiny_server_args
from tests.entrypoints.test_server_lifecycle import _engine_core_pid

MODEL = "tiny"


def start(tiny_model_dirs, tmp_path: Path, *extra: str) -> RemoteServer:
    args = tiny_server_args(
        tiny_model_dirs["llama"], tmp_path, "--served-model-name", MODEL, *extra
    )
    return RemoteServer(args, api_key=None)


def body(max_tokens: int, stream: bool, prompt: list[int] | None = None) -> dict:
    return {
        "model": MODEL,
        "prompt": prompt or [5, 6, 7, 8],
        "max_tokens": max_tokens,
        "stream": stream,
        "ignore_eos": True,
        "stream_options": {"include_usage": True} if stream else None,
    }


async def stream_events(client, url: str, payload: dict, stop_after: int | None = None) -> list:
    """The stream's JSON events (until [DONE]); with `stop_after`, hangs up after that many."""
    events: list = []
    async with client.stream("POST", url, json=payload) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            events.append(json.loads(data))
            if stop_after is not None and len(events) >= stop_after:
                break  # leaving the block closes the connection mid-stream
    return events


def wait_idle(server: RemoteServer, timeout: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        busy = m["pagedllm:num_requests_running"] + m["pagedllm:num_requests_waiting"]
        if busy == 0 and m["pagedllm:kv_cache_usage_perc"] == 0:
            return m
        assert time.monotonic() < deadline, f"not idle: {m}"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state


def test_sigterm_with_16_streams_drains_them_and_leaves_no_process(tiny_model_dirs, tmp_path):
    server = start(tiny_model_dirs, tmp_path)
    core = _engine_core_pid(server.proc.pid)
    max_tokens = 120

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            url = server.url("/v1/completions")
            tasks = [
                asyncio.ensure_future(stream_events(client, url, body(max_tokens, True)))
                for _ in range(16)
            ]
            await asyncio.sleep(1.0)  # every stream is running
            server.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    try:
        results = asyncio.run(main())
        for events in results:
            usage = [e["usage"] for e in events if e.get("usage")]
            assert usage and usage[0]["completion_tokens"] == max_tokens
        assert server.proc.wait(60) == 0
        deadline = time.monotonic() + 10
        while _alive(core):
            assert time.monotonic() < deadline, "the engine-core process outlived the server"
            time.sleep(0.1)
    finally:
        server.stop()


def test_half_of_64_streams_hanging_up_frees_every_block(tiny_model_dirs, tmp_path):
    server = start(tiny_model_dirs, tmp_path, "--max-num-seqs", "64")

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            url = server.url("/v1/completions")
            tasks = [
                stream_events(client, url, body(200, True), stop_after=3 if i % 2 else None)
                for i in range(64)
            ]
            return await asyncio.gather(*tasks)

    try:
        results = asyncio.run(main())
        finished = [e for e in results if e and e[-1].get("usage")]
        assert len(finished) == 32 and all(len(e) >= 3 for e in results)
        wait_idle(server)
        ok = httpx.post(server.url("/v1/completions"), json=body(4, False), timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        wait_idle(server)
    finally:
        assert server.stop() == 0


def test_request_timeout_aborts_and_frees_blocks(tiny_model_dirs, tmp_path):
    server = start(tiny_model_dirs, tmp_path, "--request-timeout", "1.5")
    try:
        started = time.monotonic()
        response = httpx.post(server.url("/v1/completions"), json=body(1000, False), timeout=60)
        assert response.status_code == 408
        assert response.json()["error"]["code"] == "request_timeout"
        assert time.monotonic() - started < 10

        async def stream():
            async with httpx.AsyncClient(timeout=60) as client:
                return await stream_events(client, server.url("/v1/completions"), body(1000, True))

        events = asyncio.run(stream())
        assert events[-1]["error"]["code"] == "request_timeout"
        assert any(e.get("choices") for e in events[:-1])  # it streamed until the deadline
        wait_idle(server)
        ok = httpx.post(server.url("/v1/completions"), json=body(4, False), timeout=60)
        assert ok.status_code == 200
    finally:
        assert server.stop() == 0


def test_past_max_num_waiting_requests_get_503_with_retry_after(tiny_model_dirs, tmp_path):
    server = start(tiny_model_dirs, tmp_path, "--max-num-seqs", "2", "--max-num-waiting", "2")

    def post(_: int):
        return httpx.post(server.url("/v1/completions"), json=body(60, False), timeout=120)

    try:
        with ThreadPoolExecutor(12) as pool:  # a burst: 12 connections at once
            responses = list(pool.map(post, range(12)))
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 503 in codes and set(codes) == {200, 503}, codes
        for r in responses:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "server_overloaded"
        wait_idle(server)
        ok = httpx.post(server.url("/v1/completions"), json=body(4, False), timeout=60)
        assert ok.status_code == 200
    finally:
        assert server.stop() == 0


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX only")
def test_engine_killed_mid_stream_errors_the_stream_then_the_server_exits_1(
    tiny_model_dirs, tmp_path
):
    server = start(tiny_model_dirs, tmp_path)
    core = _engine_core_pid(server.proc.pid)

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            task = asyncio.ensure_future(
                stream_events(client, server.url("/v1/completions"), body(900, True))
            )
            await asyncio.sleep(1.0)
            os.kill(core, signal.SIGKILL)
            return await task

    try:
        events = asyncio.run(main())
        assert events[-1]["error"]["code"] == "engine_dead"
        assert server.proc.wait(30) == 1
    finally:
        server.stop()


def test_good_requests_complete_while_a_huge_prompt_is_refused(tiny_model_dirs, tmp_path):
    """The watchdog: a 3 MB text prompt takes seconds to tokenize (in the tokenizer thread,
    without the GIL) before its 400; meanwhile the event loop keeps serving: /health and
    token-id requests answer at once."""
    server = start(tiny_model_dirs, tmp_path)
    huge = {"model": MODEL, "prompt": "The quick brown fox jumps over the lazy dog. " * 70000}
    try:
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            bad = pool.submit(httpx.post, server.url("/v1/completions"), json=huge, timeout=120)
            time.sleep(0.3)  # it is being tokenized
            latencies = []
            while not bad.done():
                t = time.monotonic()
                assert httpx.get(server.url("/health"), timeout=10).status_code == 200
                ok = httpx.post(server.url("/v1/completions"), json=body(2, False), timeout=10)
                assert ok.status_code == 200
                latencies.append(time.monotonic() - t)
            response = bad.result()
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "context_length_exceeded"
        assert time.monotonic() - started > 1.0, "too fast to show anything: grow the prompt"
        assert latencies and max(latencies) < 1.0, latencies
        wait_idle(server)
    finally:
        assert server.stop() == 0


def test_api_key_metrics_opt_in_and_cors_only_when_asked(tiny_model_dirs, tmp_path):
    args = tiny_server_args(
        tiny_model_dirs["llama"],
        tmp_path,
        "--served-model-name",
        MODEL,
        "--metrics-unauthenticated",
        "--allowed-origins",
        "https://app.example",
    )
    server = RemoteServer(args)  # with the test API key
    try:
        assert httpx.get(server.url("/metrics")).status_code == 200  # opted in
        assert httpx.get(server.url("/version")).status_code == 401
        assert httpx.get(server.url("/version"), headers=server.headers()).status_code == 200
        preflight = {
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        }
        response = httpx.options(server.url("/v1/completions"), headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(
            server.url("/v1/completions"), headers={**preflight, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers
        # A refused request still carries the CORS headers its browser needs to read the 401.
        denied = httpx.post(
            server.url("/v1/completions"),
            json=body(2, False),
            headers={"Origin": preflight["Origin"]},
        )
        assert denied.status_code == 401
        assert denied.headers["access-control-allow-origin"] == "https://app.example"
    finally:
        assert server.stop() == 0
