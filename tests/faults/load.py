"""Calls as clients make them, at a steady rate, while a fault is injected; and what users saw.

`CallLoad` plays the apps: each lifecycle is a caller and a callee of their own (no one is busy
elsewhere), the caller's client inserts the invitation (under RLS, as supabase-js does) and, once
it rings, the callee's client accepts or declines it or the caller's cancels it (in turn). A
client whose write fails (the database is away) tries again every 100 ms, as an app would; the
ring delay a user sees is counted from its first try.

`outcomes()` reads back what each lifecycle became, and `report()` prints one line of figures per
scenario (and appends it to `$CALLFLOW_FAULT_FIGURES` when set), for the faults table.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field

import psycopg
from psycopg.rows import dict_row

ACTIONS = ("accepted", "declined", "cancelled")
# What the invitation and its call become after each client action (an accepted call nobody joins
# is `active`, then `completed` once its join window passes).
EXPECTED = {
    "accepted": ("accepted", {"active", "completed"}),
    "declined": ("declined", {"declined"}),
    "cancelled": ("cancelled", {"cancelled"}),
}
RETRY_EVERY = 0.1


@dataclass
class Lifecycle:
    caller: str
    callee: str
    action: str
    first_try: float = 0.0
    invitation_id: str | None = None
    insert_failures: int = 0
    answered: bool = False
    answer_failures: int = 0


def make_pairs(conn: psycopg.Connection, n: int) -> list[tuple[str, str]]:
    ids = [str(uuid.uuid4()) for _ in range(2 * n)]
    conn.execute("insert into auth.users (id, email) select u, 'load-' || left(u::text, 8) || '@example.test' "
                 "from unnest(%s::uuid[]) as u", (ids,))
    return list(zip(ids[0::2], ids[1::2]))


def _as(conn: psycopg.Connection, user: str) -> None:
    conn.execute("set local role authenticated")
    conn.execute("select set_config('request.jwt.claims', %s, true)", (json.dumps({"sub": user, "role": "authenticated"}),))


class _Client:
    """One connection, made again after the database dropped it."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self.conn: psycopg.Connection | None = None

    def run(self, fn):
        try:
            if self.conn is None or self.conn.closed:
                self.conn = psycopg.connect(self.url, connect_timeout=3)
            with self.conn.transaction():
                return fn(self.conn)
        except psycopg.OperationalError:
            if self.conn is not None:
                self.conn.close()
            self.conn = None
            raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class CallLoad:
    def __init__(self, database_url: str, pairs: list[tuple[str, str]], rate: float) -> None:
        self.url, self.rate = database_url, rate
        self.pending = [Lifecycle(c, e, ACTIONS[i % len(ACTIONS)]) for i, (c, e) in enumerate(pairs)]
        self.lifecycles: list[Lifecycle] = []
        self._stop = threading.Event()
        self._done = False
        self._threads = [threading.Thread(target=self._insert, daemon=True),
                         threading.Thread(target=self._answer, daemon=True)]

    def start(self) -> "CallLoad":
        self.started = time.time()
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """No new calls; the calls begun are still answered until `finish()`."""
        self._stop.set()
        self.stopped = time.time()
        self._threads[0].join(30)

    def finish(self, timeout: float = 60) -> None:
        """Wait until every call begun was answered (or `timeout`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(lc.answered for lc in self.lifecycles):
            time.sleep(0.1)
        self._done = True
        self._threads[1].join(10)

    def _insert(self) -> None:
        client = _Client(self.url)
        next_at = time.monotonic()
        while self.pending and not self._stop.is_set():
            lc = self.pending.pop(0)
            lc.first_try = time.time()
            while True:  # a call begun is tried until it is made, as an app would
                try:
                    def insert(conn, lc=lc):
                        _as(conn, lc.caller)
                        return conn.execute(
                            "insert into public.call_invitations (room_name, caller_id, callee_id, call_type) "
                            "values (%s, %s, %s, 'audio') returning id",
                            (f"load-{uuid.uuid4().hex[:12]}", lc.caller, lc.callee)).fetchone()[0]
                    lc.invitation_id = str(client.run(insert))
                    self.lifecycles.append(lc)
                    break
                except psycopg.OperationalError:
                    lc.insert_failures += 1
                    time.sleep(RETRY_EVERY)
            next_at += 1.0 / self.rate
            time.sleep(max(0.0, next_at - time.monotonic()))
        client.close()

    def _answer(self) -> None:
        reader, writer = _Client(self.url), _Client(self.url)
        while not self._done:
            waiting = {lc.invitation_id: lc for lc in list(self.lifecycles) if not lc.answered}
            try:
                ringing = reader.run(lambda conn: [str(r[0]) for r in conn.execute(
                    "select id from public.call_invitations where id = any(%s::uuid[]) and status = 'ringing'",
                    (list(waiting),)).fetchall()]) if waiting else []
            except psycopg.OperationalError:
                time.sleep(RETRY_EVERY)
                continue
            for invitation_id in ringing:
                lc = waiting[invitation_id]
                who = lc.caller if lc.action == "cancelled" else lc.callee
                try:
                    def answer(conn, lc=lc, who=who):
                        _as(conn, who)
                        conn.execute("update public.call_invitations set status = %s where id = %s",
                                     (lc.action, lc.invitation_id))
                    writer.run(answer)
                    lc.answered = True
                except psycopg.OperationalError:
                    lc.answer_failures += 1
                    break
            time.sleep(RETRY_EVERY)
        reader.close()
        writer.close()


@dataclass
class Outcomes:
    rows: dict[str, dict]
    wrong: list[tuple[str, str, str, str | None]] = field(default_factory=list)
    unsettled: list[str] = field(default_factory=list)
    events_lost: list[str] = field(default_factory=list)


def outcomes(conn: psycopg.Connection, load: CallLoad) -> Outcomes:
    """What each call became: wrongly ended (not what its client asked for), not settled yet, and
    the client transitions the lifecycle never recorded (events lost)."""
    ids = [lc.invitation_id for lc in load.lifecycles]
    # The events first, then the rows: a decision records a client's transition in the transaction
    # that settles its call, so every transition read as recorded has its call read as settled (the
    # other order read a call still ringing whose decision committed between the two reads).
    recorded = {r["event_id"] for r in conn.execute(
        "select event_id from public.call_events where invitation_id = any(%s::uuid[])", (ids,)).fetchall()}
    rows = {str(r["id"]): r for r in conn.execute(
        """select i.id, i.status, i.end_reason, i.ringing_at, i.created_at, c.status as call_status
             from public.call_invitations i left join public.calls c on c.id = i.call_id
            where i.id = any(%s::uuid[])""", (ids,)).fetchall()}
    out = Outcomes(rows)
    for lc in load.lifecycles:
        row = rows[lc.invitation_id]
        status, call_statuses = EXPECTED[lc.action]
        if row["status"] in ("pending", "ringing") or row["call_status"] is None:
            out.unsettled.append(lc.invitation_id)
        elif row["status"] != status or row["call_status"] not in call_statuses:
            out.wrong.append((lc.invitation_id, lc.action, row["status"], row["call_status"]))
        for wanted in (f"realtime:{lc.invitation_id}:pending", f"realtime:{lc.invitation_id}:{lc.action}"):
            if wanted not in recorded:
                out.events_lost.append(wanted)
    return out


def failures_since(stack, since: float) -> list[tuple[str, str]]:
    """Tasks kept in `callflow tasks failed`, and failures no database could take (worker logs)."""
    with psycopg.connect(stack.database_url, autocommit=True, connect_timeout=5, row_factory=dict_row) as conn:
        kept = [(r["task_name"], r["error"][:200]) for r in conn.execute(
            "select task_name, error from public.callflow_failed_tasks where failed_at >= to_timestamp(%s)",
            (since,)).fetchall()]
    unkept = [(proc.name, line[:200]) for proc in stack.processes.values() for line in proc.log().splitlines()
              if "task failed; could not keep it" in line]
    return kept + unkept


def wait_recorded(database_url: str, event_ids: list[str], timeout: float = 60) -> set[str]:
    """The webhook events of `event_ids` recorded in `call_events`, once all are (or `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
            found = {r[0] for r in conn.execute("select event_id from public.call_events where event_id = any(%s)",
                                                (event_ids,)).fetchall()}
        if len(found) == len(event_ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def settle(conn: psycopg.Connection, load: CallLoad, timeout: float = 60) -> Outcomes:
    deadline = time.monotonic() + timeout
    while True:
        found = outcomes(conn, load)
        if (not found.unsettled and not found.events_lost) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def ring_delays(load: CallLoad, found: Outcomes, between: tuple[float, float] | None = None) -> list[float]:
    """Seconds from a caller's first try to ringing, for the calls first tried within `between`."""
    out = []
    for lc in load.lifecycles:
        ringing_at = found.rows[lc.invitation_id]["ringing_at"]
        if ringing_at is None:
            continue
        if between is None or between[0] <= lc.first_try <= between[1]:
            out.append(ringing_at.timestamp() - lc.first_try)
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def report(scenario: str, **figures) -> str:
    """One line of figures for the faults table: printed, and appended to $CALLFLOW_FAULT_FIGURES."""
    shown = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in figures.items()}
    line = f"FAULT {scenario}: " + ", ".join(f"{k}={v}" for k, v in shown.items())
    print(line, flush=True)
    path = os.environ.get("CALLFLOW_FAULT_FIGURES")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"scenario": scenario, **shown}, default=str) + "\n")
    return line


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class LiveKitLikeWebhooks:
    """Signed webhook events at `rate` a second, each retried as LiveKit's server does (after 1, 2,
    4 and 8 s on a connection error, a 429 or a 5xx; then dropped: LiveKit persists nothing).
    Events are `room_started` of rooms nobody uses: recorded by the lifecycle, changing nothing."""

    SCHEDULE = (1, 2, 4, 8)

    def __init__(self, web_url: str, rate: float, api_key: str, api_secret: str) -> None:
        self.url, self.rate, self.key, self.secret = f"{web_url}/livekit/webhook", rate, api_key, api_secret
        self.sent: dict[str, list[int]] = {}  # event id -> the status of each attempt (0: no connection)
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._pacer = threading.Thread(target=self._pace, daemon=True)

    def start(self) -> "LiveKitLikeWebhooks":
        self._pacer.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._pacer.join(10)
        for worker in self._workers:
            worker.join(30)

    @property
    def accepted(self) -> list[str]:
        return [i for i, statuses in self.sent.items() if statuses and statuses[-1] == 200]

    @property
    def dropped(self) -> list[str]:
        return [i for i, statuses in self.sent.items() if len(statuses) > len(self.SCHEDULE) and statuses[-1] != 200]

    def answers(self, status: int) -> int:
        return sum(statuses.count(status) for statuses in self.sent.values())

    def _pace(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            worker = threading.Thread(target=self._deliver, daemon=True)
            worker.start()
            self._workers.append(worker)
            next_at += 1.0 / self.rate
            time.sleep(max(0.0, next_at - time.monotonic()))

    def _deliver(self) -> None:
        import httpx
        from livekit.api import AccessToken

        from orchestration.webhooks import body_sha256

        now = str(int(time.time()))
        room = f"hook-{uuid.uuid4().hex[:10]}"
        event_id = f"EV_{uuid.uuid4().hex[:12]}"
        body = json.dumps({"event": "room_started", "id": event_id, "createdAt": now,
                           "room": {"sid": f"RM_{room}", "name": room, "emptyTimeout": 300, "creationTime": now}}).encode()
        statuses = self.sent.setdefault(event_id, [])
        for wait in (*self.SCHEDULE, None):
            token = AccessToken(self.key, self.secret).with_sha256(body_sha256(body)).to_jwt()
            try:
                status = httpx.post(self.url, content=body, timeout=5, headers={
                    "Authorization": token, "Content-Type": "application/webhook+json"}).status_code
            except httpx.HTTPError:
                status = 0
            statuses.append(status)
            if status == 200 or (status and status < 500 and status != 429) or wait is None:
                return
            time.sleep(wait)
