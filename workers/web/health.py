"""`GET /healthz` (the process answers), `GET /readyz` (Redis and Postgres answer), `GET /metrics`."""

from __future__ import annotations

import asyncio
import time

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from config.logging import get_logger
from config.settings import get_settings
from orchestration.delivery import metrics as _delivery_metrics
from orchestration.ingest import metrics as _listener_metrics  # noqa: F401 - registers the listener heartbeat collector
from orchestration.ops import queues as _ops_metrics
from orchestration.ops import room_actions as _room_actions_metrics
from orchestration.push import metrics as _push_metrics  # noqa: F401 - registers the push outbox collector
from orchestration.retention import metrics as _retention_metrics
from orchestration.usage import metrics as _usage_metrics  # noqa: F401 - registers the LiveKit usage collector
from workers.queues import QUEUES
from workers.web import webhook

_ops_metrics.register(QUEUES)  # queue depths, oldest message ages, task outcomes (from Redis)
_room_actions_metrics.register()  # room actions LiveKit has not answered yet (from Postgres)
_retention_metrics.register()  # rows pruned, oldest kept (from Redis)
_delivery_metrics.register()  # outbox rows sent, failed, skipped per channel (from Redis)

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


class _ReadinessCache:
    """The last answer, kept for a second and shared by everyone asking meanwhile.

    A flood of `/readyz` then costs at most one Postgres connection and one Redis ping a second.
    """

    TTL_SECONDS = 1.0

    def __init__(self) -> None:
        self._answer: tuple[float, int, dict] | None = None
        self._in_flight: asyncio.Future | None = None

    async def get(self) -> tuple[int, dict]:
        now = time.monotonic()
        if self._answer is not None and now - self._answer[0] < self.TTL_SECONDS:
            return self._answer[1], self._answer[2]
        if self._in_flight is None:
            self._in_flight = asyncio.ensure_future(self._check())
        future = self._in_flight
        try:
            status, body = await asyncio.shield(future)
        finally:
            if self._in_flight is future and future.done():
                self._in_flight = None
        return status, body

    async def _check(self) -> tuple[int, dict]:
        results = await asyncio.gather(_run("redis", _check_redis), _run("postgres", _check_postgres))
        failed = {name: error for name, error in results if error}
        checks = {name: ("ok" if error is None else "unreachable") for name, error in results}
        if failed:
            log.warning("not ready", **{f"{name}_error": error for name, error in failed.items()})
            answer = (503, {"error": {"code": "unavailable", "message": f"{', '.join(sorted(failed))} unreachable"},
                            "checks": checks})
        else:
            answer = (200, {"status": "ready", "checks": checks})
        self._answer = (time.monotonic(), *answer)
        return answer


_readiness = _ReadinessCache()


async def readyz(_request: Request) -> Response:
    status, body = await _readiness.get()
    return JSONResponse(body, status_code=status, headers={"retry-after": "1"} if status == 503 else None)


async def metrics(_request: Request) -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


routes: list = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
