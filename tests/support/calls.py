"""Helpers to act as the product does: clients insert and move invitations under RLS, and the
ingest side puts their changes on the queue."""

from __future__ import annotations

import json
import time
import uuid

import psycopg

from devstack.services import wait_for

from orchestration import names


def as_client(conn: psycopg.Connection, user_id: str):
    """Inside the current transaction, act as Supabase would for `user_id`."""
    conn.execute("set local role authenticated")
    conn.execute("select set_config('request.jwt.claims', %s, true)",
                 (json.dumps({"sub": user_id, "role": "authenticated"}),))


def insert_invitation(database_url: str, caller: str, callee: str, room: str | None = None,
                      call_type: str = "video") -> dict:
    room = room or f"room-{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url) as conn:
        as_client(conn, caller)
        row = conn.execute(
            """insert into public.call_invitations (room_name, caller_id, callee_id, call_type)
               values (%s, %s, %s, %s) returning id, room_name""",
            (room, caller, callee, call_type),
        ).fetchone()
    return {"id": str(row[0]), "room_name": row[1]}


def client_set_status(database_url: str, user: str, invitation_id: str, status: str) -> None:
    with psycopg.connect(database_url) as conn:
        as_client(conn, user)
        cur = conn.execute("update public.call_invitations set status = %s where id = %s", (status, invitation_id))
        if cur.rowcount != 1:
            raise AssertionError(f"client update of {invitation_id} to {status} touched {cur.rowcount} rows")


def change_event(invitation_id: str, status: str, room_name: str | None = None, source: str = "postgres") -> dict:
    return {
        "event_id": f"realtime:{invitation_id}:{status}", "source": source, "type": f"invitation_{status}",
        "invitation_id": invitation_id, "status": status, "room_name": room_name,
        "occurred_at": None, "payload": {"test": True},
    }


def enqueue_change(invitation_id: str, status: str, room_name: str | None = None, app=None) -> None:
    if app is None:
        from workers.app import app
    app.send_task(names.INVITATION_CHANGED, args=[change_event(invitation_id, status, room_name)], queue="events")


def invitation(db, invitation_id: str) -> dict:
    return db.execute("select * from public.call_invitations where id = %s", (invitation_id,)).fetchone()


def call_of(db, invitation_id: str) -> dict | None:
    return db.execute(
        "select c.* from public.calls c join public.call_invitations i on i.call_id = c.id where i.id = %s",
        (invitation_id,),
    ).fetchone()


def wait_invitation(db, invitation_id: str, status: str, timeout: float = 20) -> dict:
    return wait_for(lambda: (lambda r: r if r and r["status"] == status else None)(invitation(db, invitation_id)),
                    timeout=timeout, what=f"invitation {invitation_id} {status}")


def wait_call(db, invitation_id: str, status: str, timeout: float = 20) -> dict:
    return wait_for(lambda: (lambda r: r if r and r["status"] == status else None)(call_of(db, invitation_id)),
                    timeout=timeout, what=f"call of {invitation_id} {status}")


def settle(seconds: float) -> None:
    time.sleep(seconds)


def hold_back_from_catch_up(invitation_id: str, *statuses: str) -> None:
    """Marks these transitions as listed already (the listener's dedupe marks), so the beat's
    catch-up leaves them to the test."""
    import redis as redis_lib

    from orchestration.ingest.mapping import dedupe_key
    from workers.app import settings

    client = redis_lib.Redis.from_url(settings.redis_url)
    try:
        for status in statuses:
            client.set(dedupe_key(invitation_id, status), "test", ex=300)
    finally:
        client.close()
