"""The server's errors and their one mapping to HTTP status + OpenAI error envelope."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fusion.loop import FusionError
from fusion.models import ChatTemplateError
from server.protocol import error_body

log = logging.getLogger(__name__)


class APIError(Exception):
    status = 500
    type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class BadRequest(APIError):
    status, type = 400, "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


class Unauthorized(APIError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class ModelNotFound(APIError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class NotFound(APIError):
    status, type, code = 404, "invalid_request_error", "not_found"


class PayloadTooLarge(APIError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class Overloaded(APIError):
    status, type, code = 429, "rate_limit_error", "queue_full"


class Unavailable(APIError):
    status, type, code = 503, "service_unavailable", "engine_unavailable"


def to_api_error(exc: BaseException) -> APIError:
    """The API error for any exception a request may raise (unknown ones are 500s)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ChatTemplateError):
        return BadRequest(str(exc), param="messages")
    if isinstance(exc, FusionError):
        return Unavailable(str(exc))
    log.exception("unexpected error", exc_info=exc)
    return APIError("internal error")


def error_response(exc: BaseException) -> JSONResponse:
    err = to_api_error(exc)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ".".join(loc)
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    return (f"{where}: {msg}" if where else msg), (loc[0] if loc else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(BadRequest(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = NotFound if exc.status_code == 404 else BadRequest
        err = kind(str(exc.detail))
        err.status = exc.status_code
        return error_response(err)

    @app.exception_handler(Exception)
    async def _any(_: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)
