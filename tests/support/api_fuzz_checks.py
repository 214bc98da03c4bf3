"""Schemathesis checks of the contract's rules for every `/api/` answer (loaded by the fuzz tests
through SCHEMATHESIS_HOOKS, in the schemathesis process).

- `api_cors_headers`: a request from an allowed origin (`CALLFLOW_FUZZ_ORIGIN`) gets
  `Access-Control-Allow-Origin` for that origin and `Vary: Origin` on every answer, errors
  included, so a browser reads the JSON rather than reporting a CORS failure.
- `contract_error_shape`: every 4xx/5xx is `{"error": {"code", "message", "field"?}}` as JSON,
  `code` one of the contract's, `field` present on 422 only, nothing else in it.
"""

from __future__ import annotations

import json
import os

import schemathesis

from workers.web.errors import CODES


def _header(response, name: str) -> list[str]:
    return response.headers.get(name.lower(), [])


@schemathesis.check
def api_cors_headers(ctx, response, case) -> None:
    origin = os.environ.get("CALLFLOW_FUZZ_ORIGIN")
    if not origin or not case.path.startswith("/api/") or response.request.headers.get("Origin") != origin:
        return
    allowed = _header(response, "access-control-allow-origin")
    if allowed != [origin]:
        raise AssertionError(f"{response.status_code} without Access-Control-Allow-Origin: {origin} (got {allowed})")
    if not any("origin" in v.lower() for v in _header(response, "vary")):
        raise AssertionError(f"{response.status_code} without Vary: Origin")


@schemathesis.check
def contract_error_shape(ctx, response, case) -> None:
    if response.status_code < 400 or response.request.method == "HEAD":
        return
    content_type = (_header(response, "content-type") or [""])[0]
    if content_type.split(";")[0].strip() != "application/json":
        raise AssertionError(f"{response.status_code} error is {content_type!r}, not application/json")
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} error body is not JSON: {response.content[:200]!r}") from None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(error, dict):
        raise AssertionError(f"{response.status_code} error is not {{\"error\": {{...}}}}: {body!r:.300}")
    if error.get("code") not in CODES or not isinstance(error.get("message"), str):
        raise AssertionError(f"{response.status_code} error has no contract code and message: {error!r:.300}")
    if not set(error) <= {"code", "message", "field"}:
        raise AssertionError(f"{response.status_code} error has more than code, message, field: {sorted(error)}")
    if ("field" in error) != (response.status_code == 422):
        raise AssertionError(f"{response.status_code} error: `field` is for 422 only, and always there: {error!r:.300}")
