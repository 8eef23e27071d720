"""The OpenAI-compatible HTTP server: a FastAPI app over one `AsyncLLM`, run by uvicorn.

Routes: POST /v1/completions, /v1/chat/completions, /tokenize, /detokenize; GET /v1/models,
/health, /version, /metrics. With an API key, every route but /health, /version and /metrics
needs `Authorization: Bearer <key>`.

Lifecycle. A client that goes away aborts its request in the engine: a stream's generator is
always closed when its response ends, however it ends (`_ClosingStreamingResponse`), and a
non-streamed request races its handler against the client's disconnect. On SIGTERM uvicorn stops
accepting connections and waits for the open ones (so in-flight requests finish), then the
lifespan shuts the engine down and the process exits with status 0.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from pagedllm.engine.exceptions import EngineDeadError
from pagedllm.entrypoints.openai.errors import (
    ENGINE_DEAD_MESSAGE,
    CatchAllMiddleware,
    error_response,
    install_error_handlers,
)
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from pagedllm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagedllm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagedllm.entrypoints.openai.serving_engine import ServingConfig
from pagedllm.entrypoints.openai.serving_tokenization import OpenAIServingTokenization

logger = logging.getLogger(__name__)

# Routes open without the API key: probes and scrapers.
OPEN_PATHS = frozenset({"/health", "/version", "/metrics"})


class APIKeyMiddleware:
    """Refuses requests without `Authorization: Bearer <key>` (401, OpenAI's body), except on
    OPEN_PATHS. Plain ASGI (not BaseHTTPMiddleware), so streaming and disconnects pass through."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
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


class _ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body generator when it ends, however it ends.

    NOTE: starlette cancels the send loop on a client disconnect; a generator suspended at a
    `yield` is then left to the garbage collector, which would abort its request late (or never).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return _ClosingStreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _json(model: Any) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Runs `work` (a handler) unless the client goes away first; then it is cancelled (which
    aborts its requests) and None is returned: there is nobody to answer."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        watcher.cancel()
        task.cancel()
        raise
    watcher.cancel()
    if not task.done():
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


def _respond(result: Any) -> Response:
    if result is None:  # the client left
        return Response(status_code=499)
    if isinstance(result, AsyncIterator):
        return _sse_response(result)
    return _json(result)


def build_app(
    engine: Any,
    config: ServingConfig,
    api_key: str | None = None,
    metrics_registry: Any | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine` (an AsyncLLM). Its lifespan shuts the engine down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            logger.info("shutting down the engine")
            engine.shutdown()

    app = FastAPI(title="pagedllm OpenAI-compatible server", lifespan=lifespan)
    install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(CatchAllMiddleware)  # NOTE: added last, so it is the outermost
    completion = OpenAIServingCompletion(engine, config)
    chat = OpenAIServingChat(engine, config)
    tokenization = OpenAIServingTokenization(engine, config)

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        _warn_extra(body)
        return _respond(await _unless_disconnected(request, completion.create_completion(body)))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        _warn_extra(body)
        return _respond(await _unless_disconnected(request, chat.create_chat_completion(body)))

    @app.get("/v1/models")
    async def list_models() -> Response:
        return _json(
            ModelList(data=[_card(name, engine, config) for name in config.served_model_names])
        )

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        completion.check_model(model_id)
        return _json(_card(model_id, engine, config))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Response:
        return _json(tokenization.tokenize(body))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        return _json(tokenization.detokenize(body))

    @app.get("/health")
    async def health() -> Response:
        try:
            await engine.check_health()
        except EngineDeadError:
            return error_response(ENGINE_DEAD_MESSAGE, 503, code="engine_dead")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        from pagedllm import __version__

        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        registry = REGISTRY if metrics_registry is None else metrics_registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _card(name: str, engine: Any, config: ServingConfig) -> ModelCard:
    return ModelCard(
        id=name, root=config.model_path, max_model_len=engine.model_config.max_model_len
    )


def _warn_extra(body: Any) -> None:
    if body.model_extra:
        logger.warning("ignoring unknown request fields: %s", ", ".join(sorted(body.model_extra)))


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def run_server(ns: Any) -> None:
    """`pagedllm serve`: starts the engine, then serves until SIGINT or SIGTERM."""
    import uvicorn

    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.entrypoints.openai.cli_args import engine_args_from_cli, serving_config_from_cli

    # NOTE: uvicorn re-raises the signal that stopped it once it has drained; exiting on it
    # with status 0 (also while the model loads) makes SIGTERM a clean stop.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    engine_args = engine_args_from_cli(ns)
    config = serving_config_from_cli(ns, engine_args)
    engine = AsyncLLM.from_engine_args(engine_args, model_name=config.served_model_names[0])
    try:
        config = serving_config_from_cli(ns, engine_args, engine.model_config.model)
        app = build_app(engine, config, api_key=ns.api_key)
        logger.info("serving %s on http://%s:%d", config.served_model_names[0], ns.host, ns.port)
        uvicorn.run(
            app,
            host=ns.host,
            port=ns.port,
            log_level=ns.uvicorn_log_level,
            access_log=not ns.disable_uvicorn_access_log,
            timeout_keep_alive=5,
        )
    finally:
        engine.shutdown()
