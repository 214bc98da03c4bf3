"""Helpers of the listener tests (no tests here): a private Redis database, the listener process, client-style writes."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from typing import Any

import jwt
import psycopg
import redis as redis_lib

from devstack import services
from orchestration import names
from orchestration.ingest.sink import CHANGES_KEY
from tests.conftest import subprocess_env

# The listener tests' own Redis database: no worker consumes its `events` list, so what the
# listener enqueued can be read back exactly.
LISTENER_REDIS_DB = 9
DEV_JWT_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"


def service_role_key(secret: str = DEV_JWT_SECRET) -> str:
    return jwt.encode({"role": "service_role", "iss": "supabase-demo", "exp": int(time.time()) + 10 * 365 * 86400},
                      secret, algorithm="HS256")


def queued(client: redis_lib.Redis) -> list[dict[str, Any]]:
    """The changes the listener listed for the workers, oldest first (see orchestration.ingest.sink);
    while any wait, a `callflow.invitations_changed` nudge waits on `events` too."""
    changes = [json.loads(raw) for raw in reversed(client.lrange(CHANGES_KEY, 0, -1))]
    if changes:
        tasks = [json.loads(raw)["headers"]["task"] for raw in client.lrange("events", 0, -1)]
        assert names.INVITATIONS_CHANGED in tasks, "changes are waiting but no worker was nudged"
    return changes


def event_counts(client: redis_lib.Redis, ids: set[str]) -> Counter:
    return Counter(c["event_id"] for c in queued(client) if c["invitation_id"] in ids)


def insert_invitations(database_url: str, caller: str, callee: str, n: int, *, conn: psycopg.Connection | None = None,
                       pause: float = 0.0, on_each=None) -> list[str]:
    """Insert `n` invitations as the caller's client would (role authenticated, JWT claims), one per transaction."""
    own = conn is None
    conn = conn or psycopg.connect(database_url)
    ids = []
    try:
        for i in range(n):
            with conn.transaction():
                conn.execute("set local role authenticated")
                conn.execute("select set_config('request.jwt.claims', %s, true)",
                             (json.dumps({"sub": caller, "role": "authenticated"}),))
                row = conn.execute(
                    "insert into public.call_invitations (room_name, caller_id, callee_id, call_type) "
                    "values (%s, %s, %s, 'audio') returning id", (f"room-{uuid.uuid4().hex[:10]}", caller, callee),
                ).fetchone()
            ids.append(str(row[0]))
            if on_each:
                on_each(i)
            if pause:
                time.sleep(pause)
    finally:
        if own:
            conn.close()
    return ids


def set_status(database_url: str, user: str, invitation_id: str, status: str) -> None:
    """A client's status update (the callee accepts/declines, the caller cancels)."""
    with psycopg.connect(database_url) as conn, conn.transaction():
        conn.execute("set local role authenticated")
        conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps({"sub": user, "role": "authenticated"}),))
        conn.execute("update public.call_invitations set status = %s where id = %s", (status, invitation_id))


class ListenerProcess(services.Process):
    def __init__(self, log_dir, redis_url: str, source: str, *, supabase_url: str | None = None,
                 key: str | None = None, database_url: str | None = None, args: list[str] | None = None,
                 name: str | None = None) -> None:
        self.listener_id = name or f"test-{source}-{uuid.uuid4().hex[:6]}"
        env = subprocess_env(REDIS_URL=redis_url, CALLFLOW_LISTENER_SOURCE=source)
        if database_url:
            env["DATABASE_URL"] = database_url
        if supabase_url:
            env.update(SUPABASE_URL=supabase_url, SUPABASE_SERVICE_ROLE_KEY=key or service_role_key())
        defaults = {"--catch-up-interval": "0", "--backoff-base": "0.2", "--backoff-max": "2", "--ping-interval": "1",
                    "--ping-timeout": "1.5", "--heartbeat-interval": "0.3", "--overlap": "5", "--initial-horizon": "20",
                    "--system-timeout": "10"}
        extra = list(args or [])
        for flag, value in defaults.items():
            if flag not in extra:
                extra += [flag, value]
        argv = [str(services.VENV_BIN / "python"), "-m", "workers.listener", "--id", self.listener_id] + extra
        super().__init__(f"listener-{self.listener_id}", argv, env, log_dir)

    def heartbeat(self, client: redis_lib.Redis) -> dict[str, Any] | None:
        raw = client.get(names.listener_key(self.listener_id))
        return json.loads(raw) if raw else None

    def wait_live(self, client: redis_lib.Redis, timeout: float = 20, after_reconnects: int = 0) -> dict[str, Any]:
        def live():
            if not self.alive():
                raise AssertionError(f"listener died:\n{self.log()[-3000:]}")
            beat = self.heartbeat(client)
            # live, and the catch-up of this subscription has run
            return beat if (beat and beat["state"] == "live" and beat["reconnects"] >= after_reconnects
                            and (beat["last_catch_up_at"] or 0) >= beat["since"]) else None

        return services.wait_for(live, timeout=timeout, what=f"listener {self.listener_id} live")
