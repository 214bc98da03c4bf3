"""Postgres LISTEN source (local and self-hosted): channel `callflow_invitations`, fed by the
`call_invitations_notify` trigger of the migrations (`{op, id, status, room_name, updated_at}` on
every insert and status change).

One autocommit connection per session. Notifications sent while nobody listens are lost, so the
session counts as live once `LISTEN` is in place and the catch-up then reads what was missed.
Between notifications the connection is probed with `select 1` every `ping_interval` seconds
(TCP keepalives too), so a dead server ends the session instead of hanging it.
"""

from __future__ import annotations

import asyncio

import psycopg

from orchestration.ingest.mapping import from_notify
from workers.listener.core import Listener, SessionEnded

CHANNEL = "callflow_invitations"


class PostgresSource:
    name = "postgres"

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    async def session(self, listener: Listener) -> None:
        opts = listener.options
        conn = await asyncio.wait_for(psycopg.AsyncConnection.connect(
            self.database_url, autocommit=True, connect_timeout=5, application_name="callflow-listener",
            keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3), timeout=10)
        try:
            await conn.execute(f"LISTEN {CHANNEL}")
            listener.mark_live()
            while not listener.stopping.is_set():
                async for notify in conn.notifies(timeout=opts.ping_interval):
                    if notify.channel == CHANNEL:
                        listener.accept_or_skip("notification", from_notify, notify.payload)
                    if listener.stopping.is_set():
                        return
                try:
                    await asyncio.wait_for(conn.execute("select 1"), timeout=opts.ping_timeout)
                except asyncio.TimeoutError:
                    raise SessionEnded("database did not answer the liveness probe") from None
        except psycopg.OperationalError as exc:
            raise SessionEnded(f"connection lost: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:200]) from None
        finally:
            try:
                await asyncio.wait_for(conn.close(), timeout=5)
            except Exception:  # noqa: BLE001
                pass
