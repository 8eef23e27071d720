"""`pagedllm serve --tensor-parallel-size 2` (CPU, gloo): the engine-core process drives two
worker processes; greedy completions equal HF's, and a worker killed mid-run fails the
request with a 5xx (and the server's health with it) instead of hanging."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.entrypoints.conftest import RemoteServer, httpx, tiny_server_args
from tests.tiny_models import hf_greedy, load_hf

pytestmark = pytest.mark.slow
MODEL = "tiny-tp"


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _spawned(pid: int) -> list[int]:
    """Children started by multiprocessing's spawn (the engine core; its workers)."""
    out = []
    for child in _children(pid):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        if b"spawn_main" in cmdline:
            out.append(child)
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_tp2_server_greedy_equals_hf_and_a_dead_worker_is_a_5xx(tiny_model_dirs, tmp_path):
    path = tiny_model_dirs["llama"]
    args = tiny_server_args(path, tmp_path, "--served-model-name", MODEL)
    args += ["--tensor-parallel-size", "2"]
    server = RemoteServer(args, api_key=None)
    try:
        rng = random.Random(11)
        prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (4, 19, 33)]
        expected = hf_greedy(load_hf(Path(path)), prompts, [12, 12, 12])
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        for prompt, want in zip(prompts, expected, strict=True):
            r = httpx.post(
                server.url("/v1/completions"),
                json={"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                      "ignore_eos": True},
                timeout=120,
            )  # fmt: skip
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == tokenizer.decode(
                want, skip_special_tokens=True
            )
        [core] = _spawned(server.proc.pid)
        workers = _spawned(core)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        start = time.monotonic()
        r = httpx.post(
            server.url("/v1/completions"),
            json={"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 64, "ignore_eos": True},
            timeout=120,
        )
        assert r.status_code >= 500, r.text
        assert "error" in r.json()
        assert time.monotonic() - start < 60
        assert httpx.get(server.url("/health"), timeout=10).status_code != 200
    finally:
        server.stop()


def test_dp2_server_greedy_equals_hf_and_merges_metrics(tiny_model_dirs, tmp_path):
    """Two engine-core processes behind one server: concurrent greedy requests equal HF's,
    both cores run some, and /metrics counts all of them."""
    import asyncio

    path = tiny_model_dirs["llama"]
    args = tiny_server_args(path, tmp_path, "--served-model-name", MODEL)
    server = RemoteServer([*args, "--data-parallel-size", "2"], api_key=None)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        rng = random.Random(5)
        prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(2, 40))] for _ in range(8)]
        expected = hf_greedy(load_hf(Path(path)), prompts, [10] * len(prompts))

        async def run() -> list[str]:
            async with httpx.AsyncClient(timeout=120) as client:
                body = {"model": MODEL, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
                url = server.url("/v1/completions")
                replies = await asyncio.gather(
                    *(client.post(url, json={**body, "prompt": p}) for p in prompts)
                )
            assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
            return [r.json()["choices"][0]["text"] for r in replies]

        texts = asyncio.run(run())
        assert texts == [tokenizer.decode(w, skip_special_tokens=True) for w in expected]
        assert len(_spawned(server.proc.pid)) == 2  # one engine-core process per rank
        deadline = time.monotonic() + 30
        while True:  # the last core's stats arrive with its next message
            m = server.metrics()
            if m["pagedllm:generation_tokens_total"] >= 10 * len(prompts):
                break
            assert time.monotonic() < deadline, m
            time.sleep(0.2)
        assert m["pagedllm:generation_tokens_total"] == 10 * len(prompts)
    finally:
        server.stop()
