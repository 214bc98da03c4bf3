"""The `/api/calls` routes' database work, done AS THE SIGNED-IN USER.

Each write runs in one transaction with `set local role authenticated` and the user's claims in
`request.jwt.claims`, exactly as PostgREST runs a supabase-js call: RLS, the state-machine guard
and the insert rules (`room_in_use`, `rate_limited`, ...) decide, not this module. Their refusals
come back as `ApiError`s with the contract's codes.

One user cannot take the pool from everyone (issue 23): a user's requests hold at most
`per_user` of its connections at once (the rest of theirs wait, then 429 `rate_limited`), nobody
waits more than `timeout` for a connection (then 503 `unavailable`), and every statement has a
time bound (`statement_timeout`; past it, 503). The event streams read through a store of their
own (`workers.web.events.store()`), so streams and API requests never wait for each other's
connections.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from contextlib import asynccontextmanager
from datetime import date, datetime
from decimal import Decimal
from typing import Any, AsyncIterator

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from config.logging import get_logger
from orchestration.auth import User
from orchestration.db import RECONNECT_SECONDS, check_open_async
from workers.web.errors import ApiError

log = get_logger("callflow.web.calls")

# The insert rules' SQLSTATE P0001 messages start with the contract's code.
_RULE_REFUSALS = {
    "room_in_use": (409, "room_in_use"),
    "already_invited": (409, "already_invited"),
    "rate_limited": (429, "rate_limited"),
    "anonymous": (403, "anonymous"),
}
ACTIONS = {"accept": ("accepted", "callee"), "decline": ("declined", "callee"), "cancel": ("cancelled", "caller")}

# GET /api/calls: the ids of the user's newest calls from their participation index
# (callflow_call_parties_recent; an internal table, read as the service), then the user's
# invitations of those calls AS THE USER, under RLS, and the calls those invitations name, by id.
# Cost: the rows shown, not the table (issue 23: `select * from calls order by created_at desc
# limit 20` under the policy read every call of the table for a user with none or only old ones).
# A party row RLS does not let through (an invitation moved to another call) is skipped, and the
# next ids are read after it.
# The calls are shown by the calls policy's own rule ("an invitation of the call names the user"),
# applied through the invitations read under RLS: read under the calls policy itself, the planner
# hashed every invitation of the user to check 20 calls (12,587 for the heavy user of a year of
# history: 17 ms of the request's 20; the policy's subquery is planned for an average user).
HISTORY_IDS = """select call_id, call_created_at from public.callflow_call_parties
                  where user_id = %(user_id)s
                  order by call_created_at desc, call_id limit %(n)s"""
HISTORY_MORE_IDS = """select call_id, call_created_at from public.callflow_call_parties
                       where user_id = %(user_id)s and call_created_at <= %(at)s
                         and (call_created_at < %(at)s or call_id > %(after)s)
                       order by call_created_at desc, call_id limit %(n)s"""
HISTORY_INVITATIONS = "select * from public.call_invitations where call_id = any(%(ids)s) order by created_at, id"
HISTORY_CALLS = "select * from public.calls where id = any(%(ids)s) order by created_at desc, id"
# A user's open invitations, either side: through the indexes of open invitations by caller and by
# callee (migration 20261208000012), never a walk of the user's history.
LIVE_INVITATIONS_SQL = """select * from public.call_invitations
                           where status in ('pending', 'ringing') and (caller_id = %s or callee_id = %s)
                           order by created_at, id"""
HISTORY_ROUNDS = 5  # pages of ids read at most (a stale party row is rare: one page nearly always)


class DatabaseBusy(ApiError):
    """503 `unavailable` because the database is slow or full, not gone: no connection came within
    the wait, or a statement ran out of its time. Whoever reads for others (the event hub) tries
    again; a request's client is told to (`Retry-After`)."""

    def __init__(self, message: str) -> None:
        super().__init__(503, "unavailable", message, headers={"Retry-After": "2"})


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """A row as JSON values: uuids as strings, times as ISO 8601."""
    out = {}
    for key, value in row.items():
        if isinstance(value, uuid.UUID):
            value = str(value)
        elif isinstance(value, (datetime, date)):
            value = value.isoformat()
        elif isinstance(value, Decimal):
            value = float(value)
        elif isinstance(value, list):
            value = [str(v) if isinstance(v, uuid.UUID) else v for v in value]
        out[key] = value
    return out


def _refusal(exc: psycopg.Error, field: str | None = None) -> ApiError:
    """The database said no: the contract's code for why, with the database's own sentence."""
    message = (exc.diag.message_primary or "refused by the database").strip()
    if isinstance(exc, pg_errors.RaiseException):
        prefix = message.split(":", 1)[0].strip()
        if prefix in _RULE_REFUSALS:
            status, code = _RULE_REFUSALS[prefix]
            headers = {"Retry-After": "60"} if code == "rate_limited" else None
            return ApiError(status, code, message, headers=headers)
        return ApiError(409, "conflict", message)
    if isinstance(exc, pg_errors.InsufficientPrivilege):  # RLS, or the guard's "clients may not ..."
        return ApiError(403, "forbidden", message)
    if isinstance(exc, pg_errors.ForeignKeyViolation):
        return ApiError(422, "invalid_request", "no such user", field=field or "callee_ids")
    if isinstance(exc, (pg_errors.CheckViolation, pg_errors.NotNullViolation, pg_errors.StringDataRightTruncation,
                        pg_errors.InvalidTextRepresentation)):
        return ApiError(422, "invalid_request", message, field=field or "body")
    if isinstance(exc, (pg_errors.UniqueViolation, pg_errors.ExclusionViolation, pg_errors.SerializationFailure,
                        pg_errors.DeadlockDetected)):
        return ApiError(409, "conflict", "a concurrent change got there first; try again")
    raise exc


class CallStore:
    """A small async pool of its own, opened on first use (after uvicorn's event loop exists).

    `per_user`: how many of its connections one user's requests may hold at once (None: no
    limit). `timeout`: the longest a request waits for its place and a connection.
    `statement_timeout_ms`: every statement's time bound (the sessions' `statement_timeout`)."""

    def __init__(self, database_url: str, *, max_size: int = 10, timeout: float = 5.0, per_user: int | None = 3,
                 statement_timeout_ms: int = 5000, name: str = "callflow-api") -> None:
        self.database_url = database_url
        self.max_size = max_size
        self.timeout = timeout
        self.per_user = per_user
        self.statement_timeout_ms = statement_timeout_ms
        self.name = name
        self._pool: AsyncConnectionPool | None = None
        self._lock: asyncio.Lock | None = None
        self._users: dict[str, list] = {}  # user id -> [semaphore, requests holding or waiting]

    async def pool(self) -> AsyncConnectionPool:
        if self._pool is None:
            self._lock = self._lock or asyncio.Lock()
            async with self._lock:
                if self._pool is None:
                    pool = AsyncConnectionPool(
                        self.database_url, min_size=1, max_size=self.max_size, open=False, timeout=self.timeout,
                        kwargs={"row_factory": dict_row, "autocommit": False, "connect_timeout": 5,
                                "application_name": self.name},
                        configure=self._configure, check=check_open_async, reconnect_timeout=RECONNECT_SECONDS,
                        name=self.name)
                    await pool.open(wait=False)
                    self._pool = pool
        return self._pool

    async def _configure(self, conn: psycopg.AsyncConnection) -> None:
        await conn.execute(f"set statement_timeout = {int(self.statement_timeout_ms)}")
        await conn.commit()

    @asynccontextmanager
    async def _place(self, user_id: str | None, deadline: float) -> AsyncIterator[None]:
        """One of the user's `per_user` places, waited for until `deadline` (then 429)."""
        if user_id is None or self.per_user is None:
            yield
            return
        entry = self._users.get(user_id)
        if entry is None:
            entry = self._users[user_id] = [asyncio.Semaphore(self.per_user), 0]
        entry[1] += 1
        try:
            try:
                async with asyncio.timeout(max(0.0, deadline - asyncio.get_running_loop().time())):
                    await entry[0].acquire()
            except TimeoutError:
                log.info("api: a user's requests are over their share of the database", user_id=user_id,
                         pool=self.name)
                raise ApiError(429, "rate_limited",
                               f"{self.per_user} of your requests are already waiting on the database; try again",
                               headers={"Retry-After": "1"}) from None
            try:
                yield
            finally:
                entry[0].release()
        finally:
            entry[1] -= 1
            if entry[1] == 0 and self._users.get(user_id) is entry:
                del self._users[user_id]

    @staticmethod
    async def _act_as(conn: psycopg.AsyncConnection, user: User) -> None:
        await conn.execute("set local role authenticated")
        await conn.execute("select set_config('request.jwt.claims', %s, true)",
                           (json.dumps(user.claims or {"sub": user.id, "role": "authenticated"}),))

    @asynccontextmanager
    async def _transaction(self, user: User | None = None, *, as_user: bool = True
                           ) -> AsyncIterator[psycopg.AsyncConnection]:
        """One transaction; with `user`, as that user under RLS (PostgREST's way), and in one of
        the user's places (`as_user=False`: the place, not yet the role)."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        async with self._place(user.id if user is not None else None, deadline):
            try:
                wait = max(0.01, deadline - asyncio.get_running_loop().time())
                async with (await self.pool()).connection(timeout=wait) as conn:
                    async with conn.transaction():
                        if user is not None and as_user:
                            await self._act_as(conn, user)
                        yield conn
            except PoolTimeout:
                log.warning("api: no database connection within the wait", pool=self.name, wait_s=self.timeout)
                raise DatabaseBusy("the database is busy; try again") from None
            except pg_errors.QueryCanceled:
                log.warning("api: a statement ran out of time", pool=self.name, ms=self.statement_timeout_ms)
                raise DatabaseBusy("the database took too long to answer; try again") from None
            except psycopg.OperationalError as exc:
                log.warning("api: database unavailable", error=exc.__class__.__name__)
                raise ApiError(503, "unavailable", "the database is unavailable; try again",
                               headers={"Retry-After": "2"}) from None

    # ---- writes, as the user ----------------------------------------------------------------------
    async def start_call(self, user: User, callee_ids: list[str], call_type: str, room_name: str) -> list[dict]:
        """All the invitations or none (one transaction)."""
        try:
            async with self._transaction(user) as conn:
                rows = []
                for callee_id in callee_ids:
                    cur = await conn.execute(
                        """insert into public.call_invitations (room_name, caller_id, callee_id, call_type)
                           values (%s, %s, %s, %s) returning *""",
                        (room_name, user.id, callee_id, call_type))
                    rows.append(await cur.fetchone())
                return [jsonable(r) for r in rows]
        except psycopg.Error as exc:
            raise _refusal(exc) from None

    async def move_invitation(self, user: User, invitation_id: str, action: str) -> dict:
        status, role = ACTIONS[action]
        try:
            async with self._transaction(user) as conn:
                cur = await conn.execute(
                    "update public.call_invitations set status = %s where id = %s returning *", (status, invitation_id))
                row = await cur.fetchone()
        except psycopg.Error as exc:
            if isinstance(exc, pg_errors.CheckViolation):  # the guard: illegal transition, terminal status
                raise ApiError(409, "conflict", (exc.diag.message_primary or "not allowed now").strip()) from None
            raise _refusal(exc) from None
        if row is not None:
            return jsonable(row)
        # RLS let nothing through: say why, from a look past RLS.
        async with self._transaction() as conn:
            cur = await conn.execute("select caller_id, callee_id, status from public.call_invitations where id = %s",
                                     (invitation_id,))
            found = await cur.fetchone()
        if found is None:
            raise ApiError(404, "not_found", "no such invitation")
        if str(found[f"{role}_id"]) != user.id:
            if user.id not in (str(found["caller_id"]), str(found["callee_id"])):
                raise ApiError(403, "forbidden", "this invitation is not yours")
            raise ApiError(403, "forbidden", f"only the {role} may {action} an invitation")
        raise ApiError(409, "conflict", f"the invitation is {found['status']}: it can no longer be {status}")

    # ---- reads, as the user -----------------------------------------------------------------------
    async def recent_calls(self, user: User, limit: int) -> list[dict]:
        """The user's newest calls (HISTORY_IDS: their participation index), each with the user's
        invitations of it: the invitations read as the user, under RLS, and the calls they name."""
        async with self._transaction(user, as_user=False) as conn:
            calls: list[dict] = []
            invitations: list[dict] = []
            last = None
            for _ in range(HISTORY_ROUNDS):
                want = limit - len(calls)
                if last is None:
                    cur = await conn.execute(HISTORY_IDS, {"user_id": user.id, "n": want})
                else:
                    cur = await conn.execute(HISTORY_MORE_IDS, {"user_id": user.id, "n": want,
                                                                "at": last["call_created_at"],
                                                                "after": last["call_id"]})
                ids = await cur.fetchall()
                if not ids:
                    break
                last = ids[-1]
                await self._act_as(conn, user)
                cur = await conn.execute(HISTORY_INVITATIONS, {"ids": [r["call_id"] for r in ids]})
                seen = await cur.fetchall()
                await conn.execute("reset role")
                shown = list(dict.fromkeys(r["call_id"] for r in seen))
                if shown:
                    cur = await conn.execute(HISTORY_CALLS, {"ids": shown})
                    calls += [jsonable(r) for r in await cur.fetchall()]
                    invitations += [jsonable(r) for r in seen]
                if len(ids) < want or len(calls) >= limit:
                    break
        by_call: dict[str, list] = {c["id"]: [] for c in calls}
        for inv in invitations:
            by_call[inv["call_id"]].append(inv)
        return [{**c, "invitations": by_call[c["id"]]} for c in calls]

    async def live_invitations(self, user: User) -> list[dict]:
        async with self._transaction(user) as conn:
            cur = await conn.execute(LIVE_INVITATIONS_SQL, (user.id, user.id))
            return [jsonable(r) for r in await cur.fetchall()]

    # ---- service reads (the event hub routes rows to their own users) -----------------------------
    async def invitations_by_id(self, invitation_ids: list[str]) -> dict[str, dict]:
        """The rows found, by id (the event hub's batch of changed rows)."""
        async with self._transaction() as conn:
            cur = await conn.execute("select * from public.call_invitations where id = any(%s::uuid[])",
                                     (invitation_ids,))
            return {str(r["id"]): jsonable(r) for r in await cur.fetchall()}

    async def calls_with_parties(self, call_ids: list[str]) -> dict[str, tuple[dict, set[str]]]:
        """The `calls` rows found, by id, each with everyone RLS lets read it (its invitations'
        callers and callees, and its caller)."""
        async with self._transaction() as conn:
            cur = await conn.execute("select * from public.calls where id = any(%s::uuid[])", (call_ids,))
            calls = {str(r["id"]): r for r in await cur.fetchall()}
            if not calls:
                return {}
            cur = await conn.execute("select call_id, caller_id, callee_id from public.call_invitations"
                                     " where call_id = any(%s::uuid[])", (list(calls),))
            parties: dict[str, set[str]] = {call_id: set() for call_id in calls}
            for r in await cur.fetchall():
                parties[str(r["call_id"])].update((str(r["caller_id"]), str(r["callee_id"])))
        for call_id, row in calls.items():
            if row.get("caller_id"):
                parties[call_id].add(str(row["caller_id"]))
        return {call_id: (jsonable(row), parties[call_id]) for call_id, row in calls.items()}

    async def local_users(self) -> list[dict]:
        async with self._transaction() as conn:
            cur = await conn.execute(
                """select id, email, coalesce(raw_user_meta_data->>'full_name', raw_user_meta_data->>'name') as name
                     from auth.users order by coalesce(raw_user_meta_data->>'full_name', email), id limit 500""")
            return [jsonable(r) for r in await cur.fetchall()]

    async def user_profile(self, user_id: str) -> dict | None:
        async with self._transaction() as conn:
            cur = await conn.execute("select email, raw_user_meta_data from auth.users where id = %s", (user_id,))
            return await cur.fetchone()
