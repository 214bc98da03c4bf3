"""The lifecycle model of `tests/unit/test_lifecycle_model.py`, against the real Postgres.

The same rules, steps and invariants; the world is the real database (the same migrations,
guards and unique indexes as production) through the real `PostgresStore`, so its `load`, `apply`
and sweep queries are checked against the decisions the fakes were checked with. The clock is the
model's (the store takes it in place of the database's `now()`), so thirty seconds of ringing
pass in no time. LiveKit, the scheduler and the throttle stay fakes: the e2e tier has the real ones.

Clients act as the database lets them: the client rule (who may move what) is checked as the
guard does, then the row is written with the model's clock; the transition table, terminal
statuses and unique indexes are the database's own.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from hypothesis import HealthCheck, Phase, settings

from orchestration.adapters.postgres_store import PostgresStore
from orchestration.domain.decision import EventRecord
from orchestration.domain.model import CLIENT_MOVES, DEFAULT_END_REASON, Call, Invitation, InvitationStatus as S, Participant
from tests.support.calls import as_client
from tests.support.fakes import FakeClock, GuardViolation, Notification
from tests.unit.test_lifecycle_model import ROOMS, USERS, LifecycleModel

EXAMPLES = int(os.environ.get("CALLFLOW_MODEL_PG_EXAMPLES", "200"))
_TABLES = "public.push_messages, public.push_tokens, public.call_events, public.notifications, public.call_participants, public.call_invitations, public.calls, public.callflow_room_actions"


class PostgresWorld:
    """The database as clients and the lifecycle see it."""

    def __init__(self, database_url: str, clock: FakeClock) -> None:
        self.url = database_url
        self.clock = clock
        self.store = PostgresStore(database_url, pool_size=2, clock=clock.now)
        self.conn = psycopg.connect(database_url, autocommit=True, row_factory=psycopg.rows.dict_row)
        self.inserted = 0

    def transaction(self, *rooms, pairs=()):
        return self.store.transaction(*rooms, pairs=pairs)

    def insert_invitation(self, caller: str, callee: str, room: str, call_type: str = "video") -> Invitation:
        """As the caller's client (the database's admission rules decide), then dated by the model's clock."""
        try:
            with self.conn.transaction():
                as_client(self.conn, caller)
                row = self.conn.execute(
                    """insert into public.call_invitations (room_name, caller_id, callee_id, call_type)
                       values (%s, %s, %s, %s) returning id""", (room, caller, callee, call_type)).fetchone()
                self.conn.execute("reset role")
                # A microsecond apart: ties of `created_at` would be broken by random ids, and
                # hypothesis needs the same steps to give the same story.
                self.inserted += 1
                created = self.clock.now() + timedelta(microseconds=self.inserted)
                row = self._dated(row["id"], created, "created_at = %(at)s,")
        except psycopg.errors.RaiseException as exc:
            raise GuardViolation(str(exc)) from exc
        return Invitation.from_row(row)

    def client_update(self, user: str, invitation_id: str, status: S) -> None:
        inv = Invitation.from_row(self.conn.execute("select * from public.call_invitations where id = %s",
                                                    (invitation_id,)).fetchone())
        role = "callee" if user == inv.callee_id else "caller" if user == inv.caller_id else None
        if (role, inv.status, status) not in CLIENT_MOVES:
            raise GuardViolation(f"{role} may not move {inv.status} -> {status}")
        now = self.clock.now()
        try:
            with self.conn.transaction():
                self.conn.execute(
                    """update public.call_invitations set status = %s, ended_at = %s, end_reason = %s,
                              answered_at = case when %s = 'accepted' then %s else answered_at end
                        where id = %s""",
                    (str(status), now, DEFAULT_END_REASON[status].value, str(status), now, invitation_id))
                self._dated(invitation_id, now)
        except psycopg.errors.CheckViolation as exc:
            raise GuardViolation(str(exc)) from exc

    def _dated(self, invitation_id: str, at: datetime, also: str = "") -> dict:
        """The client's change dated by the model's clock, `updated_at` too: the guard stamps it
        with the database's clock, which the model's runs ahead of, and the sweep's look for lost
        transitions walks `updated_at` from a mark in the model's time (a change stamped behind
        the mark would never be looked at). Triggers held off for this statement only: the guard
        has judged the change already."""
        self.conn.execute("set local session_replication_role = replica")
        row = self.conn.execute(f"update public.call_invitations set {also} updated_at = %(at)s where id = %(id)s returning *",
                                {"at": at, "id": invitation_id}).fetchone()
        self.conn.execute("set local session_replication_role = origin")
        return row

    def close(self) -> None:
        self.conn.close()


class PostgresView:
    """The tables, read after every step, in the shapes the invariants read."""

    def __init__(self) -> None:
        self.history: dict[str, list[Invitation]] = {}
        self.invitations: dict[str, Invitation] = {}
        self.calls: dict[str, Call] = {}
        self.participants: dict[str, Participant] = {}
        self.events: dict[str, EventRecord] = {}
        self.notifications: dict[str, Notification] = {}

    def load(self, conn: psycopg.Connection) -> None:
        self.invitations = {str(r["id"]): Invitation.from_row(r)
                            for r in conn.execute("select * from public.call_invitations").fetchall()}
        for inv in self.invitations.values():
            versions = self.history.setdefault(inv.id, [])
            if not versions or versions[-1] != inv:
                versions.append(inv)
        self.calls = {str(r["id"]): Call.from_row(r) for r in conn.execute("select * from public.calls").fetchall()}
        self.participants = {r["participant_sid"]: Participant.from_row(r)
                             for r in conn.execute("select * from public.call_participants").fetchall()}
        self.events = {r["event_id"]: EventRecord(r["event_id"], r["source"], r["type"], r["room_name"],
                                                  str(r["invitation_id"]) if r["invitation_id"] else None,
                                                  r["occurred_at"], r["payload"])
                       for r in conn.execute("select * from public.call_events").fetchall()}
        self.notifications = {str(r["invitation_id"]): Notification(str(r["invitation_id"]), str(r["recipient_id"]),
                                                                    r["status"])
                              for r in conn.execute("select * from public.notifications").fetchall()}
        # (key, attempts, next attempt at), as the fake keeps them
        self.room_actions = {r["key"]: [r["key"], r["attempts"], r["next_attempt_at"]] for r in conn.execute(
            "select key, attempts, next_attempt_at from public.callflow_room_actions").fetchall()}
        self.push_messages = {(r["kind"], str(r["invitation_id"]), r["token"]): r["status"] for r in conn.execute(
            """select m.kind, m.invitation_id, t.token, m.status from public.push_messages m
                 join public.push_tokens t on t.id = m.push_token_id""").fetchall()}


@pytest.fixture(scope="module")
def model_database():
    """A database of its own: the model truncates its tables between examples, and the run's worker
    and beat must not see its rows."""
    from devstack import services

    with services.scratch_database("callflow_model") as url:
        PostgresLifecycleModel.database_url = url
        yield url


class PostgresLifecycleModel(LifecycleModel):
    database_url: str = ""

    def make_clock(self) -> FakeClock:
        # Start at the database's time: rows the workers write are stamped with its clock.
        return FakeClock(datetime.now(timezone.utc).replace(microsecond=0))

    def make_world(self):
        world = PostgresWorld(self.database_url, self.clock)
        world.conn.execute(f"truncate {_TABLES}")
        # Invitations are dated by the model's clock, ahead of the database's: no rate limit here
        # (the migration's own tests cover it).
        world.conn.execute("""insert into public.callflow_settings (key, value) values ('CALLFLOW_INVITE_RATE_PER_MINUTE', '100000')
                              on conflict (key) do update set value = excluded.value""")
        return world

    def __init__(self) -> None:
        super().__init__()
        self.uid = {name: str(uuid.uuid4()) for name in USERS}
        suffix = uuid.uuid4().hex[:8]
        self.room = {name: f"{name}-{suffix}" for name in ROOMS}
        for name, uid in self.uid.items():
            self.world.conn.execute("insert into auth.users (id, email) values (%s, %s)",
                                    (uid, f"{name}-{uid[:8]}@example.test"))
        self.tokens: dict[str, list[str]] = {}
        self.view = PostgresView()
        self.register_devices()
        self.refresh()

    def refresh(self) -> None:
        self.view.load(self.world.conn)

    def register_devices(self) -> None:
        if not hasattr(self, "tokens"):
            return  # the base class asks before the users exist; __init__ asks again
        from tests.unit.test_lifecycle_model import DEVICES

        for name, n in DEVICES.items():
            for i in range(n):
                token = f"ExponentPushToken[{name}-{self.uid[name][:8]}-{i}]"
                self.world.conn.execute(
                    "insert into public.push_tokens (user_id, token, platform) values (%s, %s, 'ios')",
                    (self.uid[name], token))
                self.tokens.setdefault(self.uid[name], []).append(token)

    def devices_of(self, user: str) -> set[str]:
        return set(self.tokens.get(user, ()))

    def teardown(self):
        super().teardown()
        self.world.conn.execute("delete from auth.users where id = any(%s::uuid[])", (list(self.uid.values()),))
        self.world.close()


PostgresLifecycleModel.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=30, deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.usefixtures("model_database")
class TestLifecycleModelOnPostgres(PostgresLifecycleModel.TestCase):
    pass
