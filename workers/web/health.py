"""`GET /healthz` (the process answers), `GET /readyz` (Redis and Postgres answer), `GET /metrics`."""

from __future__ import annotations

import asyncio

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from config.logging import get_logger
from config.settings import get_settings
from orchestration.ingest import metrics as _listener_metrics  # noqa: F401 - registers the listener heartbeat collector
from workers.web import webhook

CHECK_TIMEOUT_SECONDS = 2.0

log = get_logger("callflow.web.health")


async def healthz(_request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _check_redis() -> None:
    await webhook.endpoint.enqueuer.ping()


async def _check_postgres() -> None:
    url = get_settings().database_url
    conn = await psycopg.AsyncConnection.connect(url, connect_timeout=int(CHECK_TIMEOUT_SECONDS), autocommit=True)
    try:
        await conn.execute("select 1")
    finally:
        await conn.close()


async def _run(name: str, check) -> tuple[str, str | None]:
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT_SECONDS)
        return name, None
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        # The class only: driver messages can carry connection strings.
        return name, exc.__class__.__name__


async def readyz(_request: Request) -> Response:
    results = await asyncio.gather(_run("redis", _check_redis), _run("postgres", _check_postgres))
    failed = {name: error for name, error in results if error}
    checks = {name: ("ok" if error is None else "unreachable") for name, error in results}
    if failed:
        log.warning("not ready", **{f"{name}_error": error for name, error in failed.items()})
        return JSONResponse(
            {"error": {"code": "unavailable", "message": f"{', '.join(sorted(failed))} unreachable"},
             "checks": checks},
            status_code=503, headers={"retry-after": "1"},
        )
    return JSONResponse({"status": "ready", "checks": checks})


async def metrics(_request: Request) -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


routes: list = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
