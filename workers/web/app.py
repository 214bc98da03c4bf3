"""The `web` ASGI app: `uvicorn workers.web.app:app --port $PORT`."""

from __future__ import annotations

from starlette.applications import Starlette

from config.logging import configure_logging
from config.settings import load_settings_or_exit
from workers.web import health, token, webhook

settings = load_settings_or_exit()
configure_logging(settings.is_production)

app = Starlette(routes=[*webhook.routes, *token.routes, *health.routes])
app.add_middleware(webhook.FastPath)  # POST /livekit/webhook skips the router (hot path)
