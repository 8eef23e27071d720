"""The server's last line of defence: an exception no handler knows becomes a 500 in OpenAI's
shape without internals in its body, and the keep-alive connection survives it (starlette's
own Exception handler re-raises, and uvicorn then closes the connection)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, Request

from pagedllm.entrypoints.openai.errors import install_error_handlers
from pagedllm.entrypoints.openai.middleware import CatchAllMiddleware
from tests.entrypoints.conftest import free_port, httpx


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(CatchAllMiddleware)

    @app.get("/port")
    async def port(request: Request) -> dict[str, int]:
        assert request.client is not None
        return {"port": request.client.port}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret detail at /home/user/site-packages/x.py")

    port_number = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port_number, log_level="critical")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port_number}"
    server.should_exit = True
    thread.join(10)


def test_unexpected_exception_is_a_500_on_a_connection_that_stays_open(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=10) as client:
        first = client.get("/port").json()["port"]
        response = client.get("/boom")
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "internal_server_error"
        assert "RuntimeError" in error["message"]
        assert "secret" not in error["message"] and "/home/" not in error["message"]
        assert response.headers.get("connection", "").lower() != "close"
        # The same client port: the connection was kept.
        assert client.get("/port").json()["port"] == first
