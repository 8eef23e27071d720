"""The OpenAI-compatible HTTP server: a FastAPI app over one `AsyncLLM`, run by uvicorn.

Routes: POST /v1/completions, /v1/chat/completions, /tokenize, /detokenize; GET /v1/models,
/health, /version, /metrics. With an API key, every route but /health (and /metrics with
`--metrics-unauthenticated`) needs `Authorization: Bearer <key>`. CORS headers only with
`--allowed-origins`. Middlewares: middleware.py.

Lifecycle. A client that goes away aborts its request in the engine: a stream's generator is
always closed when its response ends, however it ends (`_ClosingStreamingResponse`), and a
non-streamed request races its handler against the client's disconnect (and against
`--request-timeout`: then a 408, or an error event in a stream). On SIGTERM uvicorn stops
accepting connections and waits for the open ones (so in-flight requests finish), then the
lifespan shuts the engine down and the process exits with status 0. When the engine-core
process dies, requests in flight get an error (an error event in a stream), /health answers
503, and after `ENGINE_DEAD_GRACE_S` the server exits with status 1, so that a supervisor
restarts it (vLLM's behaviour).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from pagedllm.engine.exceptions import EngineDeadError
from pagedllm.entrypoints.openai.errors import (
    ENGINE_DEAD_MESSAGE,
    OpenAIError,
    error_response,
    install_error_handlers,
)
from pagedllm.entrypoints.openai.middleware import (
    APIKeyMiddleware,
    BodyLimitMiddleware,
    CatchAllMiddleware,
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
from pagedllm.entrypoints.openai.serving_engine import SSE_DONE, ServingConfig, sse_error
from pagedllm.entrypoints.openai.serving_tokenization import OpenAIServingTokenization

logger = logging.getLogger(__name__)

# How long a server whose engine died keeps answering (503s) before it exits with status 1.
ENGINE_DEAD_GRACE_S = 3.0


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


def _sse_response(events: AsyncIterator[str], timeout: float | None) -> StreamingResponse:
    if timeout is not None:
        events = _with_deadline(events, asyncio.get_running_loop().time() + timeout, timeout)
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


def _timed_out(seconds: float) -> OpenAIError:
    return OpenAIError(
        f"the request took longer than the server's limit of {seconds:g} s; it was aborted",
        408,
        code="request_timeout",
    )


async def _with_deadline(
    events: AsyncIterator[str], deadline: float, seconds: float
) -> AsyncIterator[str]:
    """The stream's events until `deadline` (loop time); then an error event and [DONE]. The
    stream is closed either way (its requests are aborted)."""
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                item = await asyncio.wait_for(anext(events), max(deadline - loop.time(), 0.0))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                yield sse_error(_timed_out(seconds))
                yield SSE_DONE
                return
            yield item
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


async def _unless_disconnected(
    request: Request, work: Awaitable[Any], timeout: float | None
) -> Any:
    """Runs `work` (a handler) unless the client goes away first, or `timeout` seconds pass
    (then a 408); either way it is cancelled (which aborts its requests). None: the client
    left, there is nobody to answer."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        watcher.cancel()
        task.cancel()
        raise
    timed_out = timeout is not None and not task.done() and not watcher.done()
    watcher.cancel()
    if not task.done():
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        if timed_out:
            assert timeout is not None
            raise _timed_out(timeout)
        return None
    return task.result()


def build_app(
    engine: Any,
    config: ServingConfig,
    api_key: str | None = None,
    metrics_registry: Any | None = None,
    on_engine_dead: Callable[[], None] | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine` (an AsyncLLM). Its lifespan shuts the engine down.
    `on_engine_dead` is called once, `ENGINE_DEAD_GRACE_S` after the engine died (the server
    stops then)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watchdog = None
        if on_engine_dead is not None:
            watchdog = asyncio.ensure_future(_watch_engine(engine, on_engine_dead))
        try:
            yield
        finally:
            if watchdog is not None:
                watchdog.cancel()
            logger.info("shutting down the engine")
            engine.shutdown()

    app = FastAPI(title="pagedllm OpenAI-compatible server", lifespan=lifespan)
    install_error_handlers(app)
    # NOTE: the last added is the outermost: CatchAll, CORS, the API key, the body limit.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_body_bytes)
    if api_key:
        open_paths = {"/health"} | ({"/metrics"} if config.metrics_unauthenticated else set())
        app.add_middleware(APIKeyMiddleware, api_key=api_key, open_paths=frozenset(open_paths))
    if config.allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
        )
    app.add_middleware(CatchAllMiddleware)
    completion = OpenAIServingCompletion(engine, config)
    chat = OpenAIServingChat(engine, config)
    tokenization = OpenAIServingTokenization(engine, config)
    timeout = config.request_timeout

    def respond(result: Any) -> Response:
        if result is None:  # the client left
            return Response(status_code=499)
        if isinstance(result, AsyncIterator):
            return _sse_response(result, timeout)
        return _json(result)

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        _warn_extra(body)
        work = completion.create_completion(body)
        return respond(await _unless_disconnected(request, work, timeout))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        _warn_extra(body)
        work = chat.create_chat_completion(body)
        return respond(await _unless_disconnected(request, work, timeout))

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
        return _json(await tokenization.tokenize(body))

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> Response:
        return _json(await tokenization.detokenize(body))

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


async def _watch_engine(engine: Any, on_dead: Callable[[], None]) -> None:
    """Polls the engine; once it died, waits the grace period (requests in flight fail, /health
    answers 503 meanwhile), then calls `on_dead`."""
    while not engine.errored:
        await asyncio.sleep(0.1)
    logger.error("the engine core died: the server exits in %.0f s (status 1)", ENGINE_DEAD_GRACE_S)
    await asyncio.sleep(ENGINE_DEAD_GRACE_S)
    on_dead()


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
    """`pagedllm serve`: starts the engine, then serves until SIGINT or SIGTERM (status 0), or
    until the engine dies (status 1)."""
    import uvicorn

    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.entrypoints.openai.cli_args import engine_args_from_cli, serving_config_from_cli

    # NOTE: uvicorn re-raises the signal that stopped it once it has drained; exiting on it
    # with status 0 (also while the model loads) makes SIGTERM a clean stop.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    engine_args = engine_args_from_cli(ns)
    config = serving_config_from_cli(ns, engine_args)
    engine = AsyncLLM.from_engine_args(engine_args, model_name=config.served_model_names[0])
    server: Any = None
    engine_died = False

    def stop_serving() -> None:
        nonlocal engine_died
        engine_died = True
        server.should_exit = True

    try:
        config = serving_config_from_cli(ns, engine_args, engine.config)
        app = build_app(engine, config, api_key=ns.api_key, on_engine_dead=stop_serving)
        logger.info("serving %s on http://%s:%d", config.served_model_names[0], ns.host, ns.port)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=ns.host,
                port=ns.port,
                log_level=ns.uvicorn_log_level,
                access_log=not ns.disable_uvicorn_access_log,
                timeout_keep_alive=5,
            )
        )
        server.run()
    finally:
        engine.shutdown()
    if engine_died:
        raise SystemExit(1)
