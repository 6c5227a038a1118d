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


def engine_dead() -> OpenAIError:
    """What a request gets when the engine died under it (a device fault, or too many failed
    steps in a row): 503, because the server exits and its supervisor starts a healthy one."""
    # The cause (a device error text) stays in the server log, as for internal_error().
    return OpenAIError(
        503,
        "The engine stopped after an unrecoverable error and the server is restarting; retry shortly.",
        code="engine_dead",
    )


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


def _validation_param(loc: Sequence[Any], body: Any = None) -> str | None:
    """OpenAI's `param`, the dotted path of the field, from a pydantic error location.

    loc is e.g. ("body", "messages", 0, "content"). Under a union, pydantic adds the member it
    tried, ("body", "prompt", "list[constrained-int]", 0); walking the request body tells those
    tags (not keys of the body) from field names, so the client sees "prompt.0".
    """
    parts: list[str] = []
    node = body
    steps = list(loc[1:] if loc and loc[0] == "body" else loc)
    for i, p in enumerate(steps):
        last = i == len(steps) - 1
        if body is None:  # nothing to walk (e.g. a parameter, not a body): keep the location as is
            parts.append(str(p))
        elif isinstance(node, dict) and isinstance(p, str) and p in node:
            parts.append(p)
            node = node[p]
        elif isinstance(node, list) and isinstance(p, int) and not isinstance(p, bool) and 0 <= p < len(node):
            parts.append(str(p))
            node = node[p]
        elif last and isinstance(node, dict) and isinstance(p, str):  # a missing field
            parts.append(p)
    return ".".join(parts) or None


def _main_error(errors: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The error to report: of the first field's errors, the one from deepest in the value.

    A union reports one error per member; the deepest is the member that matched furthest (for
    `stop: ["ok", ""]`, "stop.1 is too short" rather than "stop is not a string").
    """
    first = errors[0]
    field = tuple(first.get("loc", ()))[:2]
    same = [e for e in errors if tuple(e.get("loc", ()))[:2] == field]
    return max(same, key=lambda e: len(e.get("loc", ())))


def validation_error_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request.", None
    if errors[0].get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    main = _main_error(errors)
    param = _validation_param(main.get("loc", ()), getattr(exc, "body", None))
    msg = main.get("msg", "invalid value")
    where = f"'{param}': " if param else ""
    # Counted by field: a union's one error per member is still one bad field.
    others = len({tuple(e.get("loc", ()))[:2] for e in errors}) - 1
    extra = f" (and {others} more invalid fields)" if others else ""
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
