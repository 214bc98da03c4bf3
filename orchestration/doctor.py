"""`callflow doctor`: configuration and every connection, one line each, never a secret."""

from __future__ import annotations

import time
from typing import Callable, Iterator

from config.settings import ConfigurationError, Settings, get_settings

Check = tuple[str, bool, str]


def _timed(fn: Callable[[], str]) -> tuple[bool, str]:
    start = time.perf_counter()
    try:
        detail = fn()
    except Exception as exc:  # noqa: BLE001 - the doctor reports, it does not crash
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return False, f"{exc.__class__.__name__}: {message}"[:200]
    return True, f"{detail} ({(time.perf_counter() - start) * 1000:.0f} ms)"


def _postgres(settings: Settings) -> str:
    import psycopg

    with psycopg.connect(settings.database_url, connect_timeout=3) as conn:
        version = conn.execute("show server_version").fetchone()[0]
        has_tables = conn.execute("select to_regclass('public.call_invitations') is not null").fetchone()[0]
    if not has_tables:
        raise RuntimeError(f"PostgreSQL {version} answers but has no callflow tables: run `callflow migrate`")
    return f"PostgreSQL {version}, schema migrated"


def _redis(settings: Settings) -> str:
    import redis

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=3, socket_connect_timeout=3)
    info = client.info("server")
    return f"Redis {info.get('redis_version')}"


def _livekit(settings: Settings) -> str:
    import asyncio

    from livekit import api

    async def probe() -> int:
        lk = api.LiveKitAPI(settings.livekit_http_url, settings.livekit_api_key,
                            settings.livekit_api_secret.get_secret_value())
        try:
            rooms = await asyncio.wait_for(lk.room.list_rooms(api.ListRoomsRequest()), 5)
            return len(rooms.rooms)
        finally:
            await lk.aclose()

    return f"LiveKit at {settings.livekit_url} answers, {asyncio.run(probe())} rooms open"


def _supabase(settings: Settings) -> str:
    if not settings.supabase_url:
        return f"not configured: listener source is {settings.listener_source}, user tokens use SUPABASE_JWT_SECRET"
    import httpx

    key = settings.supabase_service_role_key.get_secret_value() if settings.supabase_service_role_key else ""
    response = httpx.get(f"{settings.supabase_url}/auth/v1/.well-known/jwks.json", headers={"apikey": key}, timeout=5)
    response.raise_for_status()
    return f"{settings.supabase_url}: JWKS has {len(response.json().get('keys', []))} keys"


def _resend(settings: Settings) -> str:
    if not settings.resend_api_key:
        return f"no RESEND_API_KEY: emails are written to {settings.callflow_outbox_dir}"
    import httpx

    base = settings.resend_api_url or "https://api.resend.com"
    response = httpx.get(f"{base}/domains", headers={"Authorization": f"Bearer {settings.resend_api_key.get_secret_value()}"}, timeout=5)
    if response.status_code in (401, 403):
        raise RuntimeError(f"Resend refused the key (HTTP {response.status_code})")
    if response.status_code >= 500:
        raise RuntimeError(f"Resend answered HTTP {response.status_code}")
    return f"Resend at {base} accepts the key"


def _push(settings: Settings) -> str:
    if not settings.expo_push_configured:
        return f"no EXPO_PUSH_URL or EXPO_ACCESS_TOKEN: pushes are written to {settings.callflow_outbox_dir}/push"
    import httpx

    base = settings.expo_push_base_url
    # An empty receipts request proves the host answers (and, with a token, that it is accepted).
    headers = {"Authorization": f"Bearer {settings.expo_access_token.get_secret_value()}"} if settings.expo_access_token else {}
    response = httpx.post(f"{base}/--/api/v2/push/getReceipts", json={"ids": []}, headers=headers, timeout=5)
    if response.status_code in (401, 403):
        raise RuntimeError(f"Expo refused the access token (HTTP {response.status_code})")
    if response.status_code >= 500:
        raise RuntimeError(f"Expo answered HTTP {response.status_code}")
    token = "with an access token" if settings.expo_access_token else "without an access token"
    return f"Expo push at {base} answers ({token}), {settings.callflow_push_rate_per_second:g}/s"


EXTRA_CHECKS: list[Callable[[Settings], Check]] = []


def run_checks() -> Iterator[Check]:
    try:
        settings = get_settings()
    except ConfigurationError as exc:
        yield "configuration", False, str(exc)
        return
    yield "configuration", True, f"{settings.callflow_env}, listener source {settings.listener_source}"
    for name, fn in (("postgres", _postgres), ("redis", _redis), ("livekit", _livekit),
                     ("supabase", _supabase), ("resend", _resend), ("push", _push)):
        ok, detail = _timed(lambda fn=fn: fn(settings))
        yield name, ok, detail
    for extra in EXTRA_CHECKS:
        yield extra(settings)


# The listener's heartbeat in Redis (orchestration/ingest/heartbeat.py).
from orchestration.ingest.heartbeat import listener_check  # noqa: E402

EXTRA_CHECKS.append(listener_check)

# Room actions still owed to LiveKit (orchestration/ops/room_actions.py).
from orchestration.ops.room_actions import doctor_check as room_actions_check  # noqa: E402

EXTRA_CHECKS.append(room_actions_check)
