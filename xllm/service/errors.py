"""OpenAI-style errors for the server: one exception class, its JSON body, and the FastAPI handlers.

Every error a client sees has OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``,
so the official clients raise their typed exceptions (``openai.BadRequestError`` ...). Handlers
installed here cover our own `OpenAIError`, FastAPI's request validation (reported as 400, never
422, because OpenAI clients expect 400 for a bad parameter), Starlette's routing errors (404/405)
and, last, anything unexpected: a generic 500 whose details stay in the server log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("xllm.service")

# OpenAI's `type` strings by status; the clients map on the status, the type is for humans.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class OpenAIError(Exception):
    """An error to return to the client as OpenAI error JSON with HTTP status `status_code`."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or ERROR_TYPES.get(status_code, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def internal_error() -> OpenAIError:
    # Deliberately says nothing about the cause: details are logged server-side only.
    return OpenAIError(500, "The server had an error while processing your request.", code="internal_error")


def from_value_error(exc: ValueError) -> OpenAIError:
    """Map an engine ValueError (SamplingParams validation, PromptTooLongError) to a 400.

    The engine names the offending field in its message or as an attribute; we pass it on as
    `param` when we can find it so that clients can point at the field.
    """
    param = getattr(exc, "param", None) or getattr(exc, "field", None)
    message = str(exc) or type(exc).__name__
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic's ValidationError (SamplingParams is a pydantic model)
        try:
            first = errors()[0]
            loc = [str(p) for p in first.get("loc", ())]
            param = param or (".".join(loc) or None)
            message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        except (IndexError, TypeError, AttributeError):
            pass
    if param is None and type(exc).__name__ == "PromptTooLongError":
        param = "prompt"
    return bad_request(message, param=param)


def _validation_param(loc: Sequence[Any]) -> str | None:
    # loc is e.g. ("body", "messages", 0, "content"); OpenAI's param is the dotted field path.
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


def validation_error_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    first = errors[0]
    param = _validation_param(first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    where = f"'{param}': " if param else ""
    extra = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return f"{where}{msg}{extra}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_error_message(exc)
        return bad_request(message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            phrase = HTTPStatus(exc.status_code).phrase
        except ValueError:
            phrase = "Error"
        message = exc.detail if isinstance(exc.detail, str) else phrase
        return OpenAIError(exc.status_code, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return internal_error().response()
