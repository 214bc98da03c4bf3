"""The contract's JSON error shape, shared by every route of the `web` process.

`{"error": {"code": ..., "message": ..., "field": ...}}`, `field` only on 422. Messages are fixed
texts written by us: never a token, a secret or an exception's text.
"""

from __future__ import annotations

from typing import Mapping

from starlette.responses import JSONResponse

CODES = ("unauthorized", "forbidden", "not_found", "invalid_request", "payload_too_large", "rate_limited", "unavailable")


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    assert code in CODES, code
    body: dict = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return JSONResponse({"error": body}, status_code=status, headers=dict(headers or {}))
