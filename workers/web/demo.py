"""`GET /demo`: the browser call page (when `CALLFLOW_DEMO`), from `web/demo/`.

The page's script is bundled at build time (`npm ci && npm run build` in `web/demo`, done by the
set-up and the Dockerfile), never committed: without it `/demo` answers 503 naming that command.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from config.settings import get_settings
from workers.web.dev import dev_routes_open
from workers.web.errors import ApiError

DEMO_DIR = Path(__file__).resolve().parents[2] / "web" / "demo"
BUNDLE = DEMO_DIR / "dist" / "demo.js"
BUILD_COMMAND = "cd web/demo && npm ci && npm run build"


def _served() -> None:
    if not get_settings().demo_enabled:
        raise ApiError(404, "not_found", "no such route")
    if not BUNDLE.is_file():
        raise ApiError(503, "unavailable", f"the demo page is not built: run `{BUILD_COMMAND}` (or `make setup`)")


async def page(_request: Request) -> Response:
    _served()
    return FileResponse(DEMO_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


async def script(_request: Request) -> Response:
    _served()
    return FileResponse(BUNDLE, media_type="text/javascript", headers={"Cache-Control": "no-cache"})


async def config(request: Request) -> Response:
    """What the page needs to sign in: the dev routes locally, or Supabase Auth with the anon key."""
    _served()
    settings = get_settings()
    return JSONResponse({
        "development": dev_routes_open(request),  # whether /api/dev/* answer this browser
        "supabase_url": settings.supabase_url if settings.supabase_anon_key else None,
        "supabase_anon_key": settings.supabase_anon_key,
    }, headers={"Cache-Control": "no-store"})


routes: list = [
    Route("/demo", page, methods=["GET"]),
    Route("/demo/demo.js", script, methods=["GET"]),
    Route("/demo/config.json", config, methods=["GET"]),
]
