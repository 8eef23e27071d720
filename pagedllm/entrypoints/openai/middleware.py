"""The server's plain-ASGI middlewares (not BaseHTTPMiddleware, so streaming and disconnects
pass through untouched), outermost first as `build_app` installs them:

- `CatchAllMiddleware`: any exception that escapes a route becomes a 500 in OpenAI's shape
  without internals in its body, on a connection that stays open;
- `BodyLimitMiddleware`: request bodies past `--max-request-body-bytes` are a 400, by their
  Content-Length before a byte is read, or as soon as a chunked body passes the limit;
- `APIKeyMiddleware`: `Authorization: Bearer <key>` on every route but /health (and /metrics
  with `--metrics-unauthenticated`), compared in constant time.
"""

from __future__ import annotations

import secrets

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedllm.entrypoints.openai.errors import error_response, to_openai_error


class CatchAllMiddleware:
    """Answers any exception that escapes a route with a 500 in OpenAI's shape, and keeps the
    connection open: to be the app's outermost middleware. An exception after the response
    started can only end that response.

    NOTE: not an exception handler for Exception: starlette runs that one in its outermost
    middleware, which re-raises after answering, and uvicorn then drops the keep-alive
    connection. This one answers and swallows.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            if started:
                raise
            err = to_openai_error(exc)
            response = error_response(err.message, err.status, err.param, err.code)
            await response(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses request bodies larger than `max_bytes` with a 400."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"the request body is larger than the server's limit of {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            message = self._message() if length.isdigit() else "invalid Content-Length"
            await error_response(message, 400, code="request_too_large")(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # NOTE: FastAPI re-raises an HTTPException met while reading the body (any
                    # other error becomes "There was an error parsing the body").
                    raise HTTPException(400, self._message())
            return message

        await self.app(scope, limited_receive, send)


class APIKeyMiddleware:
    """Refuses requests without `Authorization: Bearer <key>` (401, OpenAI's body), except on
    `open_paths` and CORS preflights (OPTIONS)."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str]) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in self.open_paths
            or scope["method"] == "OPTIONS"
        ):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not secrets.compare_digest(given, self.expected):
            response = error_response(
                "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                401,
                code="invalid_api_key",
            )
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
