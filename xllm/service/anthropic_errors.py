"""Anthropic-shaped errors for ``/v1/messages``, which the rest of the server answers OpenAI-style.

The server raises one exception class, `OpenAIError`, everywhere; this module re-dresses it as
``{"type": "error", "error": {"type", "message"}}`` with the same status and headers, so that
the `anthropic` client raises its matching typed exception (``anthropic.NotFoundError`` ...).
`AnthropicRoute` does so for everything its endpoint raises (request validation included, as
400 rather than FastAPI's 422); the middleware in app.py uses `anthropic_error_response` for the
401/503 it answers before any route runs. Other routes keep the app-wide OpenAI handlers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from xllm.service.anthropic_protocol import AnthropicErrorResponse, ErrorDetail, ErrorType
from xllm.service.errors import OpenAIError, bad_request, internal_error, validation_error_message

logger = logging.getLogger("xllm.service")

MESSAGES_PATH = "/v1/messages"

# Anthropic's error types by status; like OpenAI's clients, the `anthropic` client maps on the status.
ERROR_TYPES: dict[int, ErrorType] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


def error_type(status_code: int) -> ErrorType:
    if status_code in ERROR_TYPES:
        return ERROR_TYPES[status_code]
    return "api_error" if status_code >= 500 else "invalid_request_error"


def anthropic_error_body(exc: OpenAIError) -> dict[str, Any]:
    detail = ErrorDetail(type=error_type(exc.status_code), message=exc.message)
    return AnthropicErrorResponse(error=detail).model_dump(mode="json")


def anthropic_error_response(exc: OpenAIError) -> JSONResponse:
    return JSONResponse(anthropic_error_body(exc), status_code=exc.status_code, headers=exc.headers)


def anthropic_error_event(exc: OpenAIError) -> str:
    """A failure after the 200 stream has started: Anthropic's ``error`` server-sent event."""
    return f"event: error\ndata: {json.dumps(anthropic_error_body(exc), separators=(',', ':'))}\n\n"


class AnthropicRoute(APIRoute):
    """An APIRoute whose errors leave in Anthropic's shape instead of the app-wide OpenAI one.

    Wrapping the route handler (FastAPI's documented way to customise one route's errors) sees
    the body's parsing and validation as well as the endpoint itself.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def anthropic_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as exc:
                return anthropic_error_response(exc)
            except RequestValidationError as exc:
                message, _ = validation_error_message(exc)
                return anthropic_error_response(bad_request(message))
            except StarletteHTTPException as exc:
                message = exc.detail if isinstance(exc.detail, str) else "Invalid request."
                return anthropic_error_response(OpenAIError(exc.status_code, message, headers=exc.headers))
            except Exception:
                # Details stay in the server log, as for the OpenAI routes.
                logger.exception("unhandled error on %s %s", request.method, request.url.path)
                return anthropic_error_response(internal_error())

        return anthropic_handler
