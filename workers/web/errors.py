"""The contract's JSON error shape, shared by every route of the `web` process.

`{"error": {"code": ..., "message": ..., "field": ...}}`, `field` only on 422. Messages are fixed
texts written by us: never a token, a secret or an exception's text. The handlers below make the
router's own 404/405 and any unexpected exception (500) take the same shape.
"""

from __future__ import annotations

from typing import Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from config.logging import get_logger

log = get_logger("callflow.web.errors")

CODES = ("unauthorized", "forbidden", "not_found", "invalid_request", "payload_too_large", "rate_limited",
         "unavailable", "room_in_use", "already_invited", "anonymous", "conflict", "method_not_allowed", "internal")

# The router raises HTTPException with a bare status: name it.
_BY_STATUS = {
    400: ("invalid_request", "the request is malformed"),
    401: ("unauthorized", "authentication is required"),
    403: ("forbidden", "not allowed"),
    404: ("not_found", "no such route"),
    405: ("method_not_allowed", "this method is not allowed on this route"),
    413: ("payload_too_large", "the body is too large"),
    429: ("rate_limited", "too many requests"),
    503: ("unavailable", "unavailable; try again"),
}


class ApiError(Exception):
    """Raised by a route to answer with the contract's error (caught by `api_error_handler`)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.field, self.headers)


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    assert code in CODES, code
    body: dict = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status, headers=dict(headers or {}))


async def http_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code, message = _BY_STATUS.get(exc.status_code, ("invalid_request" if exc.status_code < 500 else "internal",
                                                      "the request cannot be served"))
    headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() == "allow"}
    return error_response(exc.status_code, code, message, headers=headers)


async def api_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log (ours, not the client's); the answer says nothing of it.
    log.error("unexpected error", path=request.url.path, method=request.method,
              error=exc.__class__.__name__, exc_info=exc)
    return error_response(500, "internal", "an unexpected error occurred")


class InternalErrors:
    """ASGI middleware: an unexpected exception becomes the contract's 500 here, inside the other
    middleware, so the answer passes through them (ApiCors adds its headers: a browser reads the
    JSON error rather than reporting a CORS failure).

    Starlette's own `Exception` handler runs in ServerErrorMiddleware, outside every middleware:
    its 500 skipped ApiCors, and the exception it re-raises made uvicorn log it a second time
    and close the client's keep-alive connection. Here the exception is logged once and the
    connection kept. An exception after the answer began (a stream cut short) is re-raised: only
    closing the connection can tell the client. `EXCEPTION_HANDLERS` keeps the outer handler
    for whatever fails outside this middleware.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            if started:
                raise
            response = await internal_error_handler(Request(scope), exc)
            await response(scope, receive, send)


EXCEPTION_HANDLERS = {
    HTTPException: http_error_handler,
    ApiError: api_error_handler,
    Exception: internal_error_handler,
}
