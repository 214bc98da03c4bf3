"""CORS for the `/api/` routes: browsers of `CALLFLOW_CORS_ORIGINS` may call them, nobody else.

A plain ASGI middleware, so the event stream (a streaming response) gets its header too. A
preflight from an allowed origin is answered here (204) before any route sees it; one from
another origin gets a 204 without `Access-Control-Allow-Origin`, which the browser refuses.
"""

from __future__ import annotations

API_PREFIX = "/api/"
ALLOW_METHODS = b"GET, POST, OPTIONS"
ALLOW_HEADERS = b"Authorization, Content-Type, Last-Event-ID"
EXPOSE_HEADERS = b"Retry-After"
MAX_AGE = b"600"


class ApiCors:
    def __init__(self, app, origins: list[str]) -> None:
        self.app = app
        self.origins = {o.encode() for o in origins}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        origin = headers.get(b"origin")
        allowed = origin is not None and origin in self.origins
        if scope["method"] == "OPTIONS" and origin is not None and b"access-control-request-method" in headers:
            out = [(b"vary", b"Origin"), (b"content-length", b"0")]
            if allowed:
                out += [(b"access-control-allow-origin", origin), (b"access-control-allow-methods", ALLOW_METHODS),
                        (b"access-control-allow-headers", ALLOW_HEADERS), (b"access-control-max-age", MAX_AGE)]
            await send({"type": "http.response.start", "status": 204, "headers": out})
            await send({"type": "http.response.body", "body": b""})
            return
        if origin is None:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"vary", b"Origin")]
                if allowed:
                    extra += [(b"access-control-allow-origin", origin), (b"access-control-expose-headers", EXPOSE_HEADERS)]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_cors)
