"""A stand-in Supabase Realtime server: Phoenix V1 JSON over a websocket, `postgres_changes` only.

What it covers (as ../shared/PROTOCOLS.md describes the real server and realtime-py 2.34 expects):

- `GET /realtime/v1/websocket?apikey=<key>&vsn=1.0.0` upgrade (a wrong `apikey`, when one is
  configured, is refused with HTTP 401);
- `phx_join` on `realtime:<name>` with `config.postgres_changes` bindings; `phx_reply`
  `{"status": "ok", "response": {"postgres_changes": [<each binding echoed with a non-zero id>]}}`;
  then, asynchronously (after `system_delay` seconds), the `system` message
  `{"channel", "extension": "postgres_changes", "message": "Subscribed to PostgreSQL",
  "status": "ok"}` with `"ref": null`. As on the real server, changes committed before that
  message are not delivered to that channel;
- `postgres_changes` pushes `{"ids": [...], "data": {"schema", "table", "commit_timestamp",
  "type", "record", "old_record", "columns", "errors": null}}` with `"ref": null`; INSERT carries
  `record`, UPDATE `record` + `old_record` with the primary key only (default REPLICA IDENTITY);
- `heartbeat` on topic `phoenix` answered with a `phx_reply`; `phx_leave` answered, then
  `phx_close`; `access_token` pushes (token kept, and checked when a JWT secret is configured);
- with `jwt_secret`: join/access tokens verified (HS256), and a channel whose token expires gets a
  `system` error ("Token has expired ...") and a `phx_close`, like the real server.

Where the changes come from: real Postgres. It LISTENs on channel `callflow_invitations` (the
NOTIFY of the migrations' `call_invitations_notify` trigger: op, id, status, updated_at,
status_by) and reads the row for the other columns, with `status`, `updated_at` and `status_by`
taken from the notification. It does
not use logical decoding, so: `commit_timestamp` is the row's `updated_at` (transaction start),
other columns are read after the commit (they may be newer than the change), only INSERT and
status-changing UPDATE are seen (not other UPDATEs, not DELETE), and `filter` on bindings,
RLS/authorization of non-service roles, Broadcast and Presence are not implemented.

Misbehaviour on demand (thread-safe calls from the test): `drop_connections()` (TCP abort, no
close frame), `close_channels()` (`phx_close`), `error_channels()` (`phx_error`),
`send_malformed(kind)`, `system_delay = s`, `silence()` / `unsilence()` (stop reading and writing:
websocket pings go unanswered), `go_down()` / `come_up()` (stop serving on the port, then serve
again on the same port), `hold_changes` (stop delivering changes while keeping the socket healthy).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
from psycopg.rows import dict_row
from websockets.asyncio.server import ServerConnection, serve

NOTIFY_CHANNEL = "callflow_invitations"
COLUMNS = [
    {"name": n, "type": t} for n, t in (
        ("id", "uuid"), ("room_name", "text"), ("caller_id", "uuid"), ("callee_id", "uuid"), ("call_type", "text"),
        ("status", "text"), ("call_id", "uuid"), ("created_at", "timestamptz"), ("updated_at", "timestamptz"),
        ("ringing_at", "timestamptz"), ("ring_deadline", "timestamptz"), ("answered_at", "timestamptz"),
        ("ended_at", "timestamptz"), ("end_reason", "text"), ("metadata", "jsonb"), ("status_by", "text"))
]
MALFORMED_KINDS = ("not_json", "binary", "no_ref", "bad_record", "unknown_status", "server_errors", "no_record")


@dataclass
class _Channel:
    topic: str
    bindings: list[dict[str, Any]]
    token: str | None
    join_ref: str | None
    streaming: bool = False


@dataclass(eq=False)
class _Conn:
    ws: ServerConnection
    channels: dict[str, _Channel] = field(default_factory=dict)
    silent: bool = False


def _ts(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat()
    return value


def _commit_ts(value: str | None) -> str:
    try:
        dt = datetime.fromisoformat(value) if value else datetime.now(timezone.utc)
    except ValueError:
        dt = datetime.now(timezone.utc)
    dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


class RealtimeStandIn:
    def __init__(self, database_url: str, *, host: str = "127.0.0.1", port: int = 0, apikey: str | None = None,
                 jwt_secret: str | None = None) -> None:
        self.database_url = database_url
        self.host, self.port = host, port
        self.apikey = apikey
        self.jwt_secret = jwt_secret
        self.system_delay = 0.0
        self.hold_changes = False
        self.conns: set[_Conn] = set()
        self.stats = {"connections": 0, "joins": 0, "access_tokens": 0, "changes_sent": 0, "heartbeats": 0,
                      "expired_kicks": 0, "refused": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server = None
        self._feeder: asyncio.Task | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None

    # ---- lifecycle (from the test's thread) ---------------------------------------------------
    @property
    def url(self) -> str:
        """What SUPABASE_URL is set to."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> "RealtimeStandIn":
        self._thread = threading.Thread(target=self._run, name="realtime-standin", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("realtime stand-in did not start")
        if self._error:
            raise RuntimeError(f"realtime stand-in failed: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop and self._stopped:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread:
            self._thread.join(10)

    def _call(self, coro_fn, *args, timeout: float = 10) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro_fn(*args), self._loop).result(timeout)

    def go_down(self) -> None:
        self._call(self._go_down)

    def come_up(self) -> None:
        self._call(self._serve)

    def drop_connections(self) -> int:
        return self._call(self._drop)

    def close_channels(self) -> int:
        return self._call(self._push_all, "phx_close")

    def error_channels(self) -> int:
        return self._call(self._push_all, "phx_error")

    def send_malformed(self, kind: str) -> int:
        assert kind in MALFORMED_KINDS, kind
        return self._call(self._malformed, kind)

    def silence(self) -> None:
        self._call(self._set_silent, True)

    def unsilence(self) -> None:
        self._call(self._set_silent, False)

    def live_channels(self) -> int:
        return sum(1 for c in list(self.conns) for ch in list(c.channels.values()) if ch.streaming)

    # ---- the server's own loop ------------------------------------------------------------------
    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        self._pg = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True,
                                                         application_name="realtime-standin-listen")
        self._reader = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True, row_factory=dict_row,
                                                             application_name="realtime-standin-read")
        await self._pg.execute(f"LISTEN {NOTIFY_CHANNEL}")
        self._feeder = asyncio.create_task(self._feed())
        await self._serve()
        self._ready.set()
        await self._stopped.wait()
        await self._go_down()
        self._feeder.cancel()
        await asyncio.gather(self._feeder, return_exceptions=True)
        await self._pg.close()
        await self._reader.close()

    async def _serve(self) -> None:
        if self._server is not None:
            return
        self._server = await serve(self._handle, self.host, self.port, process_request=self._check_request,
                                   ping_interval=None)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _go_down(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close(close_connections=False)
        await self._drop()
        await server.wait_closed()

    async def _drop(self) -> int:
        conns = list(self.conns)
        for conn in conns:
            conn.ws.transport.abort()
        return len(conns)

    async def _set_silent(self, on: bool) -> None:
        for conn in list(self.conns):
            conn.silent = on
            if on:
                conn.ws.transport.pause_reading()
            else:
                conn.ws.transport.resume_reading()

    def _check_request(self, connection: ServerConnection, request: Any):
        parts = urlsplit(request.path)
        if parts.path.rstrip("/") != "/realtime/v1/websocket":
            self.stats["refused"] += 1
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        query = parse_qs(parts.query)
        if self.apikey is not None and query.get("apikey", [None])[0] != self.apikey:
            self.stats["refused"] += 1
            return connection.respond(HTTPStatus.UNAUTHORIZED, "invalid apikey\n")
        return None

    async def _send(self, conn: _Conn, frame: dict[str, Any] | str | bytes) -> None:
        if conn.silent:
            return
        try:
            await conn.ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))
        except Exception:  # noqa: BLE001 - the socket is going away; the handler cleans up
            pass

    def _token_error(self, token: str | None) -> str | None:
        if self.jwt_secret is None:
            return None
        import jwt

        try:
            jwt.decode(token or "", self.jwt_secret, algorithms=["HS256"], options={"verify_aud": False})
        except jwt.ExpiredSignatureError:
            return "Token has expired"
        except jwt.PyJWTError as exc:
            return f"Invalid JWT: {exc.__class__.__name__}"
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        conn = _Conn(ws)
        self.conns.add(conn)
        self.stats["connections"] += 1
        expiry = asyncio.create_task(self._expiry_watch(conn)) if self.jwt_secret else None
        try:
            async for raw in ws:
                try:
                    msg = json.loads(raw)
                    topic, event, payload, ref = msg["topic"], msg["event"], msg.get("payload") or {}, msg.get("ref")
                except (ValueError, KeyError, TypeError):
                    continue
                if topic == "phoenix" and event == "heartbeat":
                    self.stats["heartbeats"] += 1
                    await self._send(conn, {"topic": "phoenix", "event": "phx_reply",
                                            "payload": {"status": "ok", "response": {}}, "ref": ref})
                elif event == "phx_join":
                    await self._join(conn, topic, payload, ref, msg.get("join_ref"))
                elif event == "access_token":
                    self.stats["access_tokens"] += 1
                    channel = conn.channels.get(topic)
                    if channel is not None:
                        channel.token = payload.get("access_token")
                        if self._token_error(channel.token):
                            await self._kick(conn, channel, self._token_error(channel.token) or "")
                elif event == "phx_leave":
                    await self._send(conn, {"topic": topic, "event": "phx_reply",
                                            "payload": {"status": "ok", "response": {}}, "ref": ref})
                    if conn.channels.pop(topic, None) is not None:
                        await self._send(conn, {"topic": topic, "event": "phx_close", "payload": {}, "ref": None})
        except Exception:  # noqa: BLE001 - connection errors end the handler
            pass
        finally:
            if expiry:
                expiry.cancel()
            self.conns.discard(conn)

    async def _join(self, conn: _Conn, topic: str, payload: dict[str, Any], ref: str | None, join_ref: str | None) -> None:
        self.stats["joins"] += 1
        token = payload.get("access_token")
        error = self._token_error(token)
        if error:
            await self._send(conn, {"topic": topic, "event": "phx_reply",
                                    "payload": {"status": "error", "response": {"reason": error}}, "ref": ref})
            return
        config = payload.get("config") or {}
        bindings = []
        for b in config.get("postgres_changes") or []:
            bindings.append(dict(b, id=random.randint(10_000_000, 99_999_999)))
        channel = _Channel(topic, bindings, token, join_ref)
        conn.channels[topic] = channel
        await self._send(conn, {"topic": topic, "event": "phx_reply",
                                "payload": {"status": "ok", "response": {"postgres_changes": bindings}}, "ref": ref})
        if bindings:
            asyncio.create_task(self._subscribed(conn, channel))

    async def _subscribed(self, conn: _Conn, channel: _Channel) -> None:
        if self.system_delay:
            await asyncio.sleep(self.system_delay)
        if conn.channels.get(channel.topic) is not channel:
            return
        channel.streaming = True
        await self._send(conn, {"topic": channel.topic, "event": "system", "ref": None, "payload": {
            "channel": channel.topic.removeprefix("realtime:"), "extension": "postgres_changes",
            "message": "Subscribed to PostgreSQL", "status": "ok"}})

    async def _kick(self, conn: _Conn, channel: _Channel, reason: str) -> None:
        self.stats["expired_kicks"] += 1
        conn.channels.pop(channel.topic, None)
        await self._send(conn, {"topic": channel.topic, "event": "system", "ref": None, "payload": {
            "channel": channel.topic.removeprefix("realtime:"), "extension": "system",
            "message": f"{reason} 0 seconds ago" if reason == "Token has expired" else reason, "status": "error"}})
        await self._send(conn, {"topic": channel.topic, "event": "phx_close", "payload": {}, "ref": None})

    async def _expiry_watch(self, conn: _Conn) -> None:
        while True:
            await asyncio.sleep(0.5)
            for channel in list(conn.channels.values()):
                error = self._token_error(channel.token)
                if error:
                    await self._kick(conn, channel, error)

    async def _push_all(self, event: str) -> int:
        n = 0
        for conn in list(self.conns):
            for topic in list(conn.channels):
                if event == "phx_close":
                    conn.channels.pop(topic, None)
                else:
                    conn.channels[topic].streaming = False
                await self._send(conn, {"topic": topic, "event": event, "payload": {}, "ref": None})
                n += 1
        return n

    # ---- changes --------------------------------------------------------------------------------
    async def _feed(self) -> None:
        pending: asyncio.Queue = asyncio.Queue()

        async def listen() -> None:
            async for notify in self._pg.notifies():
                pending.put_nowait(notify.payload)

        reader = asyncio.create_task(listen())
        try:
            while True:
                batch = [await pending.get()]
                while not pending.empty() and len(batch) < 1000:
                    batch.append(pending.get_nowait())
                changes = []
                for raw in batch:
                    try:
                        changes.append(json.loads(raw))
                    except ValueError:
                        continue
                ids = list({c["id"] for c in changes if isinstance(c, dict) and "id" in c})
                rows: dict[str, dict] = {}
                if ids:
                    try:
                        cur = await self._reader.execute("select * from public.call_invitations where id = any(%s::uuid[])",
                                                         (ids,))
                        rows = {str(r["id"]): r for r in await cur.fetchall()}
                    except psycopg.Error:
                        rows = {}
                for change in changes:
                    await self._deliver(change, rows.get(str(change.get("id"))))
        finally:
            reader.cancel()

    async def _deliver(self, change: dict[str, Any], row: dict[str, Any] | None) -> None:
        if self.hold_changes:
            return
        op = str(change.get("op", "")).upper()
        record = {k: _ts(v) if not hasattr(v, "hex") else str(v) for k, v in (row or {}).items()}
        record.update(id=change.get("id"), status=change.get("status"), room_name=change.get("room_name"),
                      updated_at=_ts(change.get("updated_at")))
        if "status_by" in change:  # who made this change, not whoever changed the row since
            record["status_by"] = change["status_by"]
        data = {"schema": "public", "table": "call_invitations", "commit_timestamp": _commit_ts(change.get("updated_at")),
                "type": op, "record": record, "old_record": {"id": change.get("id")} if op == "UPDATE" else {},
                "columns": COLUMNS, "errors": None}
        if op == "INSERT":
            data.pop("old_record")
        await self._broadcast(data)

    async def _broadcast(self, data: dict[str, Any], raw_frame: Any = None, matcher=None) -> int:
        sent = 0
        for conn in list(self.conns):
            for channel in list(conn.channels.values()):
                if not channel.streaming:
                    continue
                ids = [b["id"] for b in channel.bindings
                       if b.get("event") in ("*", data.get("type")) and b.get("schema", "public") == data.get("schema")
                       and b.get("table") in (None, "*", data.get("table"))]
                if not ids:
                    continue
                frame = {"topic": channel.topic, "event": "postgres_changes", "payload": {"ids": ids, "data": data},
                         "ref": None}
                await self._send(conn, frame)
                self.stats["changes_sent"] += 1
                sent += 1
        return sent

    async def _malformed(self, kind: str) -> int:
        n = 0
        for conn in list(self.conns):
            for channel in list(conn.channels.values()):
                ids = [b["id"] for b in channel.bindings] or [1]
                base = {"schema": "public", "table": "call_invitations", "commit_timestamp": _commit_ts(None),
                        "type": "INSERT", "columns": COLUMNS, "errors": None,
                        "record": {"id": "6d9c3c1e-0000-4000-8000-000000000000", "status": "pending", "room_name": "x"}}
                if kind == "not_json":
                    frame: Any = '{"topic": "' + channel.topic + '", "event": "postgres_changes", "payload": {'
                elif kind == "binary":
                    frame = b"\x00\x01\x02 not a phoenix frame"
                elif kind == "no_ref":
                    frame = {"topic": channel.topic, "event": "postgres_changes", "payload": {"ids": ids, "data": base}}
                elif kind == "bad_record":
                    frame = {"topic": channel.topic, "event": "postgres_changes", "ref": None,
                             "payload": {"ids": ids, "data": dict(base, record={"id": "not-a-uuid", "status": "pending"})}}
                elif kind == "unknown_status":
                    frame = {"topic": channel.topic, "event": "postgres_changes", "ref": None,
                             "payload": {"ids": ids, "data": dict(base, record=dict(base["record"], status="exploded"))}}
                elif kind == "server_errors":
                    frame = {"topic": channel.topic, "event": "postgres_changes", "ref": None,
                             "payload": {"ids": ids, "data": dict(base, record={}, errors=["Error 413: Payload Too Large"])}}
                else:  # no_record
                    data = dict(base)
                    data.pop("record")
                    frame = {"topic": channel.topic, "event": "postgres_changes", "ref": None,
                             "payload": {"ids": ids, "data": data}}
                await self._send(conn, frame)
                n += 1
        return n


def main() -> None:  # pragma: no cover - manual use: python -m devstack.standins.realtime_server DATABASE_URL [PORT]
    import sys

    server = RealtimeStandIn(sys.argv[1], port=int(sys.argv[2]) if len(sys.argv) > 2 else 0).start()
    print(f"SUPABASE_URL={server.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
