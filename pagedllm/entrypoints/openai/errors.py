"""Errors as OpenAI shapes them: `{"error": {"message", "type", "param", "code"}}`.

Every failure the server can meet ends here: its own checks (`OpenAIError`), the engine's
`ValueError`s (bad input: 400), pydantic validation and malformed JSON (FastAPI says 422; OpenAI
and its clients expect 400), unknown routes, a dead engine (503) and anything unexpected (500).
A handler answers the one request; the server goes on serving.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedllm.engine.exceptions import EngineDeadError, RequestFailedError
from pagedllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

# OpenAI's error types by status code.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    500: "internal_server_error",
    503: "service_unavailable",
}

ENGINE_DEAD_MESSAGE = (
    "the inference engine has stopped (its process died): this server cannot serve requests "
    "until it is restarted"
)


class OpenAIError(Exception):
    """A request the server refuses: an HTTP status and the words the client sees."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> ErrorResponse:
    return ErrorResponse(
        error=ErrorInfo(
            message=message,
            type=_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
            param=param,
            code=code,
        )
    )


def error_response(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code).model_dump(), status_code=status)


def to_openai_error(exc: BaseException, fields: tuple[str, ...] = ()) -> OpenAIError:
    """The OpenAIError for an exception from request handling. `fields` are the request's field
    names: a ValueError whose message starts with one (SamplingParams' do) names it as `param`."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return OpenAIError(ENGINE_DEAD_MESSAGE, 503, code="engine_dead")
    if isinstance(exc, RequestFailedError):
        return OpenAIError(str(exc), 500, code="request_failed")
    if isinstance(exc, ValueError):
        message = str(exc)
        first = message.split(" ", 1)[0].strip(":,")
        return OpenAIError(message, 400, param=first if first in fields else None)
    logger.error("unexpected error while serving a request", exc_info=exc)
    # NOTE: no exception text in the body (it may hold paths or internals); the log has it all.
    return OpenAIError(
        f"internal server error ({type(exc).__name__}); the server log has more", 500
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = list(exc.errors())
    if not errors:
        return "invalid request", None
    # NOTE: a union-typed field reports one error per member type; our own checks' (a
    # value_error) say the most.
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"malformed JSON body: {ctx.get('error', first.get('msg'))}", None
    # For a union-typed field pydantic appends the tried member types to the location.
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "body"
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid value')}{more}", param


def _is_type_tag(part: object) -> bool:
    """A location part naming a union member's type (`list[int]`, `function-after[...]`)."""
    return isinstance(part, str) and ("[" in part or "(" in part)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(message, 400, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if status == 404 and detail == HTTPStatus.NOT_FOUND.phrase:
            detail = f"no route {request.method} {request.url.path}"
        response = error_response(detail, status)
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    @app.exception_handler(OpenAIError)
    async def _openai(request: Request, exc: OpenAIError) -> JSONResponse:
        response = error_response(exc.message, exc.status, exc.param, exc.code)
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(ENGINE_DEAD_MESSAGE, 503, code="engine_dead")

    @app.exception_handler(RequestFailedError)
    async def _failed(request: Request, exc: RequestFailedError) -> JSONResponse:
        err = to_openai_error(exc)
        return error_response(err.message, err.status, err.param, err.code)
