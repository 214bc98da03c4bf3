"""The lifecycle's store: one transaction per unit of work, serialised per room.

Every unit of work that touches a room takes a transaction-scoped advisory lock on the room name
first, so the events of one room apply one at a time whichever worker runs them, while different
rooms go on in parallel. Events are recorded in `call_events` in the same transaction as their
effects, so a duplicate finds its `event_id` and changes nothing.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterator

import psycopg
from psycopg.types.json import Jsonb

from orchestration.db import get_pool
from orchestration.domain.model import Invitation


@dataclass
class EventRecord:
    event_id: str
    source: str
    type: str
    room_name: str | None
    invitation_id: str | None
    occurred_at: datetime | None
    payload: dict


class Tx:
    """The queries of one unit of work (inside one transaction)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn

    def _one(self, sql: str, params: Any = None) -> dict | None:
        return self.conn.execute(sql, params).fetchone()

    def _all(self, sql: str, params: Any = None) -> list[dict]:
        return self.conn.execute(sql, params).fetchall()

    # ---- clock & locks --------------------------------------------------------------------------
    def now(self) -> datetime:
        return self._one("select now() as now")["now"]

    def lock_room(self, room_name: str) -> None:
        self.conn.execute("select pg_advisory_xact_lock(hashtextextended(%s, 7))", (room_name,))

    # ---- events ---------------------------------------------------------------------------------
    def event_seen(self, event_id: str) -> bool:
        return self._one("select 1 as x from public.call_events where event_id = %s", (event_id,)) is not None

    def record_event(self, ev: EventRecord) -> bool:
        row = self._one(
            """insert into public.call_events (event_id, source, type, room_name, invitation_id, occurred_at, payload)
               values (%s, %s, %s, %s, %s, %s, %s)
               on conflict (event_id) do nothing returning id""",
            (ev.event_id, ev.source, ev.type, ev.room_name, ev.invitation_id, ev.occurred_at, Jsonb(ev.payload)),
        )
        return row is not None

    # ---- invitations ----------------------------------------------------------------------------
    def invitation(self, invitation_id: str, *, for_update: bool = False) -> Invitation | None:
        try:
            uuid.UUID(str(invitation_id))
        except ValueError:
            return None
        sql = "select * from public.call_invitations where id = %s" + (" for update" if for_update else "")
        row = self._one(sql, (invitation_id,))
        return Invitation.from_row(row) if row else None

    def invitations_of_call(self, call_id: str) -> list[Invitation]:
        rows = self._all("select * from public.call_invitations where call_id = %s order by created_at, id", (call_id,))
        return [Invitation.from_row(r) for r in rows]

    def answerable_invitations_in_room(self, room_name: str) -> list[Invitation]:
        rows = self._all(
            """select * from public.call_invitations where room_name = %s and status in ('pending', 'ringing')
               order by created_at, id""",
            (room_name,),
        )
        return [Invitation.from_row(r) for r in rows]

    def link_invitation(self, inv: Invitation, call_id: str) -> None:
        if inv.call_id != call_id:
            self.conn.execute("update public.call_invitations set call_id = %s where id = %s", (call_id, inv.id))
        if inv.call_type == "video":
            self.conn.execute("update public.calls set call_type = 'video' where id = %s and call_type <> 'video'", (call_id,))

    def start_ringing(self, invitation_id: str, ring_timeout: float) -> datetime:
        row = self._one(
            """update public.call_invitations
                  set status = 'ringing', ringing_at = now(), ring_deadline = now() + make_interval(secs => %s)
                where id = %s and status = 'pending' returning ring_deadline""",
            (ring_timeout, invitation_id),
        )
        return row["ring_deadline"]

    def end_invitation(self, invitation_id: str, status: str, end_reason: str | None = None) -> Invitation | None:
        """Move to a terminal status (the database stamps ended_at/answered_at); None if it was no longer open."""
        row = self._one(
            """update public.call_invitations set status = %s, end_reason = coalesce(%s, end_reason)
                where id = %s and status in ('pending', 'ringing') returning *""",
            (status, end_reason, invitation_id),
        )
        return Invitation.from_row(row) if row else None

    def callee_busy(self, callee_id: str, other_than_call: str | None) -> bool:
        row = self._one(
            """select exists (
                 select 1 from public.call_participants p join public.calls c on c.id = p.call_id
                  where p.identity = %(u)s::text and p.left_at is null and c.status = 'active'
                    and c.id is distinct from %(call)s::uuid
               ) or exists (
                 select 1 from public.call_invitations i join public.calls c on c.id = i.call_id
                  where i.callee_id = %(u)s::uuid and i.status = 'accepted' and c.status = 'active'
                    and c.id is distinct from %(call)s::uuid
               ) as busy""",
            {"u": callee_id, "call": other_than_call},
        )
        return bool(row["busy"])

    # ---- calls ----------------------------------------------------------------------------------
    def call(self, call_id: str, *, for_update: bool = False) -> dict | None:
        return self._one("select * from public.calls where id = %s" + (" for update" if for_update else ""), (call_id,))

    def live_call_for_room(self, room_name: str) -> dict | None:
        return self._one(
            "select * from public.calls where room_name = %s and status in ('ringing', 'active')", (room_name,)
        )

    def create_call(self, room_name: str, call_type: str, caller_id: str | None, room_sid: str | None = None,
                    call_id: str | None = None) -> dict:
        return self._one(
            """insert into public.calls (id, room_name, call_type, caller_id, status, livekit_room_sid)
               values (coalesce(%s::uuid, gen_random_uuid()), %s, %s, %s, 'ringing', %s) returning *""",
            (call_id, room_name, call_type, caller_id, room_sid or None),
        )

    def call_for_livekit(self, room_sid: str | None, room_name: str, at: datetime | None) -> dict | None:
        """The call a LiveKit event belongs to: by room sid, else by room name and time."""
        if room_sid:
            row = self._one("select * from public.calls where livekit_room_sid = %s", (room_sid,))
            if row:
                return row
        live = self.live_call_for_room(room_name)
        if live:
            return live
        if at is not None:
            # Second-resolution timestamps: a second of slack on each side of the lifetime.
            return self._one(
                """select * from public.calls where room_name = %s
                     and created_at <= %s + interval '1 second'
                     and (ended_at is null or ended_at >= %s - interval '1 second')
                   order by created_at desc limit 1""",
                (room_name, at, at),
            )
        return None

    def set_room_sid(self, call_id: str, room_sid: str) -> None:
        if room_sid:
            self.conn.execute(
                """update public.calls set livekit_room_sid = %s
                    where id = %s and livekit_room_sid is null
                      and not exists (select 1 from public.calls where livekit_room_sid = %s)""",
                (room_sid, call_id, room_sid),
            )

    def activate_call(self, call_id: str) -> None:
        self.conn.execute("update public.calls set status = 'active' where id = %s and status = 'ringing'", (call_id,))

    def end_call(self, call_id: str, status: str, end_reason: str, ended_at: datetime | None) -> bool:
        row = self._one(
            """update public.calls set status = %s, end_reason = %s, ended_at = coalesce(%s, now())
                where id = %s and status in ('ringing', 'active') returning id""",
            (status, end_reason, ended_at, call_id),
        )
        if row:
            self.close_open_sessions(call_id)
            self.refresh_call_times(call_id)
        return row is not None

    def lower_call_end(self, call_id: str, ended_at: datetime) -> None:
        """LiveKit's room_finished time bounds an ended call's end from above."""
        self.conn.execute(
            "update public.calls set ended_at = least(ended_at, %s) where id = %s and ended_at is not null",
            (ended_at, call_id),
        )
        self.close_open_sessions(call_id)
        self.refresh_call_times(call_id)

    def refresh_call_times(self, call_id: str) -> None:
        """started_at = first join of the second identity; duration from started_at to ended_at."""
        self.conn.execute(
            """with firsts as (
                 select identity, min(joined_at) as first_join from public.call_participants
                  where call_id = %(c)s and joined_at is not null group by identity
               ), second as (
                 select first_join from firsts order by first_join offset 1 limit 1
               )
               update public.calls c
                  set started_at = (select first_join from second),
                      duration_seconds = coalesce(greatest(0, round(extract(epoch from
                          (c.ended_at - (select first_join from second)))))::int, 0)
                where c.id = %(c)s""",
            {"c": call_id},
        )

    # ---- participants ---------------------------------------------------------------------------
    def upsert_participant(self, call_id: str, identity: str, sid: str, joined_at: datetime | None,
                           left_at: datetime | None) -> dict:
        row = self._one(
            """insert into public.call_participants (call_id, identity, participant_sid, joined_at, left_at)
               values (%(c)s, %(i)s, %(s)s, %(j)s, %(l)s)
               on conflict (participant_sid) do update set
                 joined_at = coalesce(least(call_participants.joined_at, excluded.joined_at),
                                      call_participants.joined_at, excluded.joined_at),
                 left_at = coalesce(least(call_participants.left_at, excluded.left_at),
                                    call_participants.left_at, excluded.left_at)
               returning *""",
            {"c": call_id, "i": identity, "s": sid, "j": joined_at, "l": left_at},
        )
        self.conn.execute(
            """update public.call_participants p
                  set left_at = coalesce(p.left_at, c.ended_at)
                 from public.calls c where c.id = p.call_id and p.participant_sid = %s""",
            (sid,),
        )
        self._refresh_session_duration("participant_sid = %s", (sid,))
        return row

    def close_open_sessions(self, call_id: str) -> None:
        self.conn.execute(
            """update public.call_participants p set left_at = c.ended_at
                 from public.calls c where c.id = p.call_id and p.call_id = %s and p.left_at is null
                  and c.ended_at is not null""",
            (call_id,),
        )
        self._refresh_session_duration("call_id = %s", (call_id,))

    def _refresh_session_duration(self, where: str, params: tuple) -> None:
        self.conn.execute(
            f"""update public.call_participants
                   set duration_seconds = coalesce(greatest(0, round(extract(epoch from (left_at - joined_at))))::int, 0)
                 where {where}""",
            params,
        )

    def participant(self, sid: str) -> dict | None:
        return self._one("select * from public.call_participants where participant_sid = %s", (sid,))

    def identity_connected(self, call_id: str, identity: str) -> bool:
        return self._one(
            "select 1 as x from public.call_participants where call_id = %s and identity = %s and left_at is null",
            (call_id, identity),
        ) is not None

    def session_aborted(self, sid: str) -> bool:
        return self._one(
            """select 1 as x from public.call_events where type = 'participant_connection_aborted'
                 and payload->'participant'->>'sid' = %s limit 1""",
            (sid,),
        ) is not None

    # ---- outbox ---------------------------------------------------------------------------------
    def add_missed_call_notification(self, inv: Invitation) -> str | None:
        """The outbox row, in the transaction of the transition that calls for it.

        A recipient who turned missed-call emails off, or has no address, gets the row already
        `skipped` (with why), so no delivery task is needed; returns the id of a `pending` row only.
        """
        row = self._one(
            """insert into public.notifications (kind, invitation_id, recipient_id, recipient_email, status, last_error)
               select 'missed_call', %(i)s, %(u)s, u.email,
                      case when lower(coalesce(u.raw_user_meta_data->>'missed_call_emails', 'true')) = 'false'
                             or coalesce(u.email, '') = '' then 'skipped' else 'pending' end,
                      case when lower(coalesce(u.raw_user_meta_data->>'missed_call_emails', 'true')) = 'false'
                           then 'recipient turned missed-call emails off (raw_user_meta_data.missed_call_emails is false)'
                           when coalesce(u.email, '') = '' then 'recipient has no email address' end
                 from auth.users u where u.id = %(u)s
               on conflict (kind, invitation_id, recipient_id) do nothing returning id, status""",
            {"i": inv.id, "u": inv.callee_id},
        )
        return str(row["id"]) if row and row["status"] == "pending" else None

    # ---- sweeps ---------------------------------------------------------------------------------
    def ringing_due_between(self, start: datetime, end: datetime, limit: int = 2000) -> list[dict]:
        return self._all(
            """select id, room_name, callee_id from public.call_invitations where status = 'ringing'
                 and ring_deadline > %s and ring_deadline <= %s and ring_deadline <= now()
               order by ring_deadline limit %s""",
            (start, end, limit),
        )

    def due_ring_timeouts(self, limit: int, overdue_by: float = 0.0) -> list[dict]:
        return self._all(
            """select id, room_name, callee_id from public.call_invitations
                where status = 'ringing' and ring_deadline <= now() - make_interval(secs => %s)
                order by ring_deadline limit %s""",
            (overdue_by, limit),
        )

    def stale_pending(self, older_than: float, limit: int) -> list[dict]:
        return self._all(
            """select id, room_name, status, updated_at from public.call_invitations
                where status = 'pending' and created_at < now() - make_interval(secs => %s)
                order by created_at limit %s""",
            (older_than, limit),
        )

    def live_calls_older_than(self, seconds: float, limit: int) -> list[dict]:
        return self._all(
            """select id, room_name from public.calls where status in ('ringing', 'active')
                 and created_at < now() - make_interval(secs => %s) order by created_at limit %s""",
            (seconds, limit),
        )

    def last_left_at(self, call_id: str) -> datetime | None:
        row = self._one("select max(left_at) as t from public.call_participants where call_id = %s", (call_id,))
        return row["t"] if row else None

    def due_grace_expiries(self, grace: float, limit: int) -> list[dict]:
        return self._all(
            """select p.participant_sid, p.identity, c.room_name from public.call_participants p
                 join public.calls c on c.id = p.call_id
                where c.status in ('ringing', 'active') and p.left_at is not null
                  and p.left_at < now() - make_interval(secs => %s)
                  and not exists (select 1 from public.call_events e where e.event_id = 'grace:' || p.participant_sid)
                limit %s""",
            (grace + 1.0, limit),
        )


class PostgresStore:
    def __init__(self, database_url: str, pool_size: int = 4) -> None:
        self.url = database_url
        self.pool_size = pool_size

    @contextmanager
    def transaction(self, room_name: str | None = None) -> Iterator[Tx]:
        """One transaction; with `room_name`, serialised with every other unit of work on that room."""
        with get_pool(self.url, self.pool_size).connection() as conn:
            with conn.transaction():
                tx = Tx(conn)
                if room_name is not None:
                    tx.lock_room(room_name)
                yield tx

