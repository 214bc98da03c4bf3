"""The `web` ASGI app: `uvicorn workers.web.app:app --port $PORT`."""

from __future__ import annotations

from starlette.applications import Starlette

from config.logging import configure_logging
from config.settings import load_settings_or_exit
from workers.web import api_docs, calls, demo, dev, events, health, token, webhook
from workers.web.cors import ApiCors
from workers.web.errors import EXCEPTION_HANDLERS, InternalErrors

settings = load_settings_or_exit()
configure_logging(settings.is_production)
api_docs.extend(token.OPENAPI)

app = Starlette(
    routes=[*webhook.routes, *token.routes, *events.routes, *calls.routes, *dev.routes, *demo.routes,
            *health.routes],
    exception_handlers=EXCEPTION_HANDLERS,  # every error in the contract's JSON shape, 404/405/500 included
)
# Outermost last: FastPath, ApiCors, InternalErrors (so a 500 gets the CORS headers too), the router.
app.add_middleware(InternalErrors)
app.add_middleware(ApiCors, origins=settings.cors_origins)
app.add_middleware(webhook.FastPath)  # POST /livekit/webhook skips the router (hot path)
