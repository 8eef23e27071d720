"""A real `pagedllm serve` process on loopback, for the server's tests (one per test module)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedllm.benchmarks.serve import _http_module

httpx = _http_module()

CLI = [sys.executable, "-m", "pagedllm.entrypoints.cli"]
API_KEY = "sk-pagedllm-test"
# A server of the default model (SmolLM2-135M) on the CPU, for the tests that need real text.
DEFAULT_MODEL_ARGS = ["--max-model-len", "1024", "--kv-cache-memory", "256MiB"]
# ChatML, for the tiny test models (their tokenizers come without a chat template).
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RemoteServer:
    """`pagedllm serve ARGS` in a subprocess; ready once GET /health answers 200."""

    def __init__(
        self, args: list[str], api_key: str | None = API_KEY, startup_timeout: float = 300
    ) -> None:
        self.port = free_port()
        self.api_key = api_key
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="pagedllm-serve-", suffix=".log")  # noqa: SIM115 (closed in stop)
        cmd = [*CLI, "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--disable-uvicorn-access-log"]
        if api_key:
            cmd += ["--api-key", api_key]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # NOTE: its own session, so tests may signal the server's whole process group.
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.output()}")
            try:
                if httpx.get(self.url("/health"), timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the server did not start in {timeout} s:\n{self.output()}")

    def url(self, path: str) -> str:
        return self.base_url + path

    def output(self) -> str:
        return Path(self.log.name).read_text()[-5000:]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs: object):
        import openai

        kwargs.setdefault("api_key", self.api_key or "none")
        return openai.OpenAI(base_url=self.url("/v1"), max_retries=0, **kwargs)

    def async_client(self, **kwargs: object):
        import openai

        kwargs.setdefault("api_key", self.api_key or "none")
        return openai.AsyncOpenAI(base_url=self.url("/v1"), max_retries=0, **kwargs)

    def post(self, path: str, **kwargs: object):
        headers = {**self.headers(), **dict(kwargs.pop("headers", {}))}  # type: ignore[call-overload]
        return httpx.post(self.url(path), headers=headers, timeout=120, **kwargs)

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus samples by name (labels dropped; one model, so unique)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url("/metrics"), headers=self.headers(), timeout=10).text
        return {
            s.name: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if "le" not in s.labels and "finished_reason" not in s.labels
        }

    def __enter__(self) -> RemoteServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return int(self.proc.returncode)


def tiny_server_args(model_dir: str, template_dir: Path, *extra: str) -> list[str]:
    template = template_dir / "chatml.jinja"
    template.write_text(CHATML)
    return [
        model_dir,
        "--dtype",
        "float32",
        "--kv-cache-memory",
        "16MiB",
        "--chat-template",
        str(template),
        *extra,
    ]


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dirs, tmp_path_factory) -> Iterator[RemoteServer]:
    args = tiny_server_args(
        tiny_model_dirs["llama"],
        tmp_path_factory.mktemp("server"),
        "--served-model-name",
        "tiny",
        "tiny-alias",
    )
    server = RemoteServer(args)
    try:
        yield server
    finally:
        server.stop()
