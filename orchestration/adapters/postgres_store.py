"""The lifecycle's store on Postgres: one transaction per unit of work, serialised per room.

A unit of work that touches a room takes a transaction-scoped advisory lock on the room name
first (and, for a new invitation, one on the pair of users, so glare is decided once), so the
events of one room apply one at a time whichever worker runs them, while different rooms go on in
parallel. `load` reads a snapshot (locking its invitation and call rows, so a client's own update
waits for the decision), `apply` writes what the decision changed and records its events, in the
same transaction: a duplicate finds its `event_id` and changes nothing.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Callable, Iterator

import psycopg
from psycopg.types.json import Jsonb

from orchestration.db import get_pool
from orchestration.domain.decision import (
    ROOM_ACTIONS,
    ROOM_ACTION_FIRST_RETRY_SECONDS,
    Decision,
    MissedCallEmail,
    Push,
    SendNotification,
    SendPushes,
    Snapshot,
    Want,
)
from orchestration.domain import notices
from orchestration.domain.model import Call, Invitation, Participant

_LIVE = "('ringing', 'active')"
# Every live call, through calls_one_live_call_per_room, before any order or filter of time: once
# ANALYZE has seen a few hundred live calls among millions, "live calls by created_at, limit N"
# was planned as a backward walk of calls_created_at, the whole history, filtered by status
# (1,711,373 rows removed per parallel worker, 1,032 ms, on a year of history).
_LIVE_CALLS = f"""with live as materialized (
  select id, room_name, created_at from public.calls where status in {_LIVE})"""
# Which of a room's left sessions LiveKit said aborted (the grace sweep does not know the event's
# id): through call_events_aborted_in_room, those events alone (migration 20261208000011).
ABORTED_SESSIONS_SQL = """select payload->'participant'->>'sid' as sid from public.call_events
                           where room_name = %s and type = 'participant_connection_aborted'
                             and payload->'participant'->>'sid' = any(%s)"""
# For this transaction only (`set local`): its status changes are the lifecycle worker's.
DECLARE_WORKER = "select set_config('callflow.actor', 'worker', true)"


def _uuids(values) -> list[str]:
    out = []
    for v in values:
        try:
            out.append(str(uuid.UUID(str(v))))
        except ValueError:
            pass
    return out


class PostgresUnitOfWork:
    def __init__(self, conn: psycopg.Connection, clock: Callable[[], datetime] | None = None,
                 email_repeat_window: float = 900.0) -> None:
        self.conn = conn
        self.email_repeat_window = email_repeat_window
        self._clock = clock
        self._now: datetime | None = None
        self._declared_worker = False

    def _one(self, sql: str, params: Any = None) -> dict | None:
        return self.conn.execute(sql, params).fetchone()

    def _all(self, sql: str, params: Any = None) -> list[dict]:
        return self.conn.execute(sql, params).fetchall()

    # ---- locks & clock --------------------------------------------------------------------
    def lock_all(self, keys: list[tuple[str, int]]) -> None:
        """Each (key, space) in the order given, in one round trip (a function scan keeps it);
        the transaction's `now()` comes back with them (one round trip fewer for `now`)."""
        if not keys:
            return
        if len(keys) == 1:
            row = self._one("select now() as now, pg_advisory_xact_lock(hashtextextended(%s, %s)) as locked",
                            keys[0])
        else:
            row = self._one(
                """select now() as now, count(pg_advisory_xact_lock(hashtextextended(k, s))) as locked
                     from unnest(%s::text[], %s::int[]) with ordinality as t(k, s, n)""",
                ([k for k, _ in keys], [s for _, s in keys]))
        if self._now is None:
            self._now = row["now"]

    def now(self) -> datetime:
        """The transaction's time: the database's (constant within a transaction), or the clock's."""
        if self._clock is not None:
            return self._clock()
        if self._now is None:
            self._now = self._one("select now() as now")["now"]
        return self._now

    # ---- the lifecycle's load and apply -----------------------------------------------------
    def load(self, want: Want, *, lock: bool = True) -> Snapshot:
        fu = " for update" if lock else ""
        rooms = [r for r in (want.room_name, *want.other_rooms) if r]
        sids = list(want.participant_sids)
        now = self.now()
        # Each arm on an index of its own (a UNION, not an OR the planner would scan the table for),
        # and only the arms with something to look for: `x = any('{}')` is false, and a false clause
        # lets the planner take any partial index for a "free" full scan of it (it did: every live
        # call read for an empty list of room sids). Then the rows themselves, locked, in the same
        # statement.
        call_params = {"rooms": rooms, "ids": _uuids(want.call_ids), "room_sids": list(want.room_sids), "sids": sids}
        call_arms = [arm for key, arm in (
            ("rooms", f"select id from public.calls where room_name = any(%(rooms)s) and status in {_LIVE}"),
            ("ids", "select id from public.calls where id = any(%(ids)s::uuid[])"),
            ("room_sids", "select id from public.calls where livekit_room_sid = any(%(room_sids)s)"),
            ("sids", "select call_id from public.call_participants where participant_sid = any(%(sids)s)"),
        ) if call_params[key]]
        calls = {str(r["id"]): Call.from_row(r) for r in self._all(
            f"""select * from public.calls where id = any(array({" union ".join(call_arms)}))
                order by created_at, id{fu}""", call_params)} if call_arms else {}
        inv_params = {"rooms": rooms, "ids": _uuids(want.invitation_ids), "calls": list(calls)}
        inv_arms = [arm for key, arm in (
            ("rooms", "select id from public.call_invitations where room_name = any(%(rooms)s) and status in ('pending', 'ringing')"),
            ("rooms", "select id from public.call_invitations where room_name = any(%(rooms)s) and status = 'accepted' and call_id is null"),
            ("ids", "select id from public.call_invitations where id = any(%(ids)s::uuid[])"),
            ("calls", "select id from public.call_invitations where call_id = any(%(calls)s::uuid[])"),
        ) if inv_params[key]]
        invitations = {str(r["id"]): Invitation.from_row(r) for r in self._all(
            f"""select * from public.call_invitations where id = any(array({" union ".join(inv_arms)}))
                order by created_at, id{fu}""", inv_params)} if inv_arms else {}
        participants = {r["participant_sid"]: Participant.from_row(r) for r in self._all(
            "select * from public.call_participants where call_id = any(%(calls)s::uuid[]) or participant_sid = any(%(sids)s)",
            {"calls": list(calls), "sids": sids})} if calls or sids else {}
        seen = frozenset(self.events_seen(want.event_ids)) if want.event_ids else frozenset()
        busy = frozenset(self.busy_users(want.busy))
        counters = tuple(self.counter_invitations(want.counter_pairs, lock=lock))
        for c in counters:
            invitations.setdefault(c.id, c)
        aborted: frozenset[str] = frozenset()
        if want.aborted_sids:
            aborted = frozenset(r["sid"] for r in self._all(
                ABORTED_SESSIONS_SQL, (want.room_name, list(want.aborted_sids))))
        return Snapshot(now=now, room_name=want.room_name, invitations=invitations, calls=calls,
                        participants=participants, seen_events=seen, busy_users=busy,
                        counter_invitations=counters, aborted_sids=aborted)

    def busy_users(self, user_rooms) -> set[str]:
        """The users (of these (user, room) pairs) in an active call other than their room's:
        connected in it, or its accepted invitation's call is active."""
        user_rooms = [(u, r) for u, r in user_rooms if _uuids([u])]
        if not user_rooms:
            return set()
        # Neither question walks the live calls nor the user's history: the statistics of a big
        # history see no live call at all, and the planner once joined each open session to a
        # full scan of every live call, and probed the heavy callee's thousands of accepted
        # invitations once per live call (74 ms at 800 live calls on a year of history); walking
        # the live calls instead cost 60 ms at 2,290. So: the user's open sessions, each call by
        # its primary key; and the user's calls made since the oldest active call began (its
        # time: the first entry of calls_active_created), each checked by its primary key and its
        # accepted invitations.
        return {str(r["u"]) for r in self._all(
            # (`order by ... limit 1`, not min(): believing the index holds one row, the planner
            # aggregated all of it, 2,320 entries and their heap visits, 9 ms.)
            """with since as materialized (
                  select created_at as at from public.calls where status = 'active' and created_at is not null
                   order by created_at limit 1)
                select w.u from unnest(%(users)s::uuid[], %(rooms)s::text[]) as w(u, room)
                 where exists (
                  select 1 from public.call_participants p
                   where p.identity = w.u::text and p.left_at is null
                     and (select c.status = 'active' and c.room_name <> w.room from public.calls c where c.id = p.call_id)
                ) or exists (
                  select 1 from public.callflow_call_parties cp
                   where cp.user_id = w.u and cp.call_created_at >= (select at from since)
                     and w.u = any(array(select i.callee_id from public.call_invitations i
                                          where i.call_id = cp.call_id and i.status = 'accepted'))
                     and (select c.status = 'active' and c.room_name <> w.room from public.calls c where c.id = cp.call_id)
                )""",
            {"users": [u for u, _ in user_rooms], "rooms": [r for _, r in user_rooms]})}

    @staticmethod
    def _update_invitations(cur, invitations) -> None:
        cur.executemany(
            """update public.call_invitations
                  set status = %(status)s, call_id = %(call_id)s, ringing_at = %(ringing_at)s,
                      ring_deadline = %(ring_deadline)s, answered_at = %(answered_at)s, ended_at = %(ended_at)s,
                      end_reason = %(end_reason)s
                where id = %(id)s""",
            [{"id": inv.id, "status": str(inv.status), "call_id": inv.call_id, "ringing_at": inv.ringing_at,
              "ring_deadline": inv.ring_deadline, "answered_at": inv.answered_at, "ended_at": inv.ended_at,
              "end_reason": inv.end_reason} for inv in invitations])

    def apply(self, decision: Decision) -> list:
        # One round trip per kind of row (executemany pipelines its statements).
        cur = self.conn.cursor()
        # Ended calls first: a new live call in the same room must find the old one ended.
        calls = sorted(decision.calls, key=lambda c: c.live)
        if calls:
            cur.executemany(
                """insert into public.calls (id, room_name, livekit_room_sid, call_type, caller_id, status, created_at,
                                             started_at, ended_at, duration_seconds, end_reason)
                   values (%(id)s, %(room_name)s, %(sid)s, %(call_type)s, %(caller_id)s, %(status)s, %(created_at)s,
                           %(started_at)s, %(ended_at)s, %(duration)s, %(end_reason)s)
                   on conflict (id) do update set
                     livekit_room_sid = excluded.livekit_room_sid, call_type = excluded.call_type,
                     status = excluded.status, started_at = excluded.started_at, ended_at = excluded.ended_at,
                     duration_seconds = excluded.duration_seconds, end_reason = excluded.end_reason""",
                [{"id": call.id, "room_name": call.room_name, "sid": call.livekit_room_sid,
                  "call_type": call.call_type, "caller_id": call.caller_id, "status": str(call.status),
                  "created_at": call.created_at, "started_at": call.started_at, "ended_at": call.ended_at,
                  "duration": call.duration_seconds, "end_reason": call.end_reason} for call in calls])
        if decision.invitations:
            # The transaction says it is the lifecycle worker (in the updates' round trip), so the
            # database writes `status_by = 'worker'` on the transitions it makes
            # (20_invitations.sql), and the listener drops their echo where it arrives.
            with self.conn.pipeline():
                if not self._declared_worker:
                    self.conn.execute(DECLARE_WORKER)
                    self._declared_worker = True
                self._update_invitations(cur, decision.invitations)
        if decision.participants:
            cur.executemany(
                """insert into public.call_participants (call_id, identity, participant_sid, joined_at, left_at,
                                                         duration_seconds)
                   values (%(c)s, %(i)s, %(s)s, %(j)s, %(l)s, %(d)s)
                   on conflict (participant_sid) do update set joined_at = excluded.joined_at,
                     left_at = excluded.left_at, duration_seconds = excluded.duration_seconds""",
                [{"c": p.call_id, "i": p.identity, "s": p.sid, "j": p.joined_at, "l": p.left_at,
                  "d": p.duration_seconds} for p in decision.participants])
        if decision.events:
            cur.executemany(
                """insert into public.call_events (event_id, source, type, room_name, invitation_id, occurred_at,
                                                   payload)
                   values (%s, %s, %s, %s, %s, %s, %s) on conflict (event_id) do nothing""",
                [(ev.event_id, ev.source, ev.type, ev.room_name, ev.invitation_id, ev.occurred_at, Jsonb(ev.payload))
                 for ev in decision.events])
        in_rooms = [e for e in decision.effects if isinstance(e, ROOM_ACTIONS)]
        if in_rooms:
            self.add_room_actions(in_rooms)
        follow_ups: list = []
        # Emails' pair locks, then pushes': one order, whatever the order of the decisions they came from.
        mails = [i for i in decision.outbox if not isinstance(i, Push)]
        if mails:
            follow_ups += [SendNotification(n) for n in self.add_missed_call_notifications(mails)]
        pushes = [i for i in decision.outbox if isinstance(i, Push)]
        if pushes:
            send = SendPushes.of(self.add_pushes(pushes))
            if send:
                follow_ups.append(send)
        return follow_ups

    def add_pushes(self, pushes: list[Push]) -> list[tuple[str, str]]:
        """One push outbox row per enabled device of each push's callee that gets its kind (one
        statement for all); returns the `pending` ones as (id, provider of its device).

        An `apns_voip` device gets `incoming_call` only; `expo` and `fcm` devices every kind (the
        domain's `push_goes_to`, held equal by tests/integration/test_rules_match_sql.py).

        A `missed_call` follows the missed-call email's rules: born `skipped` (with why) when the
        callee turned missed-call notices off or had one from the same caller within the repeat
        window (the pair's lock makes two at once see each other).
        """
        self.lock_all([(key, 17) for key in sorted({f"push:{p.caller_id}:{p.callee_id}"
                                                     for p in pushes if p.kind == "missed_call"})])
        rows = self._all(
            """with recipient as (
                 select r.kind, r.inv, u.id,
                        r.kind = 'missed_call'
                          and lower(coalesce(u.raw_user_meta_data->>'missed_call_emails', 'true')) = 'false' as opted_out,
                        r.kind = 'missed_call' and exists (
                          select 1 from public.push_messages m join public.call_invitations i on i.id = m.invitation_id
                           where m.kind = 'missed_call' and i.caller_id = r.caller and i.callee_id = u.id
                             and m.status in ('pending', 'sent')
                             and m.created_at > %(now)s::timestamptz - make_interval(secs => %(window)s)) as repeat
                   from unnest(%(kinds)s::text[], %(invs)s::uuid[], %(callers)s::uuid[], %(callees)s::uuid[])
                          as r(kind, inv, caller, callee)
                   join auth.users u on u.id = r.callee
               ),
               born as (
                 insert into public.push_messages (kind, invitation_id, push_token_id, status, last_error, created_at)
                 select r.kind, r.inv, t.id,
                        case when r.opted_out or r.repeat then 'skipped' else 'pending' end,
                        case when r.opted_out then %(opted_out_why)s when r.repeat then %(repeat_why)s end,
                        %(now)s
                   from public.push_tokens t join recipient r on r.id = t.user_id
                  where t.disabled_at is null
                    and (t.provider <> 'apns_voip' or r.kind = 'incoming_call')  -- ringing like a phone
                 on conflict (kind, invitation_id, push_token_id) do nothing returning id, status, push_token_id
               )
               select b.id, t.provider from born b join public.push_tokens t on t.id = b.push_token_id
                where b.status = 'pending'""",
            {"kinds": [p.kind for p in pushes], "invs": [p.invitation_id for p in pushes],
             "callers": [p.caller_id for p in pushes], "callees": [p.callee_id for p in pushes],
             "now": self.now(), "window": self.email_repeat_window, "opted_out_why": notices.OPTED_OUT["push"],
             "repeat_why": notices.repeat_reason("push", self.email_repeat_window)})
        return [(str(r["id"]), r["provider"]) for r in rows]

    def add_missed_call_notifications(self, mails: list[MissedCallEmail]) -> list[str]:
        """The outbox rows (one statement for all), in the transaction of the transitions that call
        for them; returns the ids of the `pending` ones.

        Born `skipped` (with why, and no delivery task) when the recipient turned missed-call
        emails off, has no address, or had one from the same caller within the repeat window (the
        pair's lock makes two at once see each other; one batch holds a pair at most once).
        """
        self.lock_all([(key, 17) for key in sorted({f"mail:{m.caller_id}:{m.callee_id}" for m in mails})])
        rows = self._all(
            """with recipient as (
                 select r.inv, u.id, u.email,
                        lower(coalesce(u.raw_user_meta_data->>'missed_call_emails', 'true')) = 'false' as opted_out,
                        coalesce(btrim(u.email), '') = '' as no_address,
                        exists (select 1 from public.notifications n
                                  join public.call_invitations i on i.id = n.invitation_id
                                 where n.recipient_id = u.id and n.kind = 'missed_call' and i.caller_id = r.caller
                                   and n.status in ('pending', 'sent')
                                   and n.created_at > %(now)s::timestamptz - make_interval(secs => %(window)s)) as repeat
                   from unnest(%(invs)s::uuid[], %(callers)s::uuid[], %(callees)s::uuid[]) as r(inv, caller, callee)
                   join auth.users u on u.id = r.callee
               )
               insert into public.notifications (kind, invitation_id, recipient_id, recipient_email, status, last_error,
                                                 created_at)
               select 'missed_call', inv, id, email,
                      case when opted_out or no_address or repeat then 'skipped' else 'pending' end,
                      case when opted_out then %(opted_out_why)s
                           when no_address then %(no_address_why)s
                           when repeat then %(repeat_why)s end,
                      %(now)s
                 from recipient
               on conflict (kind, invitation_id, recipient_id) do nothing returning id, status""",
            {"invs": [m.invitation_id for m in mails], "callers": [m.caller_id for m in mails],
             "callees": [m.callee_id for m in mails], "now": self.now(), "window": self.email_repeat_window,
             "opted_out_why": notices.OPTED_OUT["email"], "no_address_why": notices.NO_ADDRESS,
             "repeat_why": notices.repeat_reason("email", self.email_repeat_window)},
        )
        return [str(r["id"]) for r in rows if r["status"] == "pending"]

    # ---- first looks -------------------------------------------------------------------------
    def event_seen(self, event_id: str) -> bool:
        return bool(self.events_seen([event_id]))

    def events_seen(self, event_ids) -> set[str]:
        return {r["event_id"] for r in self._all(
            "select event_id from public.call_events where event_id = any(%s)", (list(event_ids),))}

    def invitation(self, invitation_id: str) -> Invitation | None:
        return self.invitations([invitation_id]).get(invitation_id)

    def invitations(self, invitation_ids) -> dict[str, Invitation]:
        return {str(r["id"]): Invitation.from_row(r) for r in self._all(
            "select * from public.call_invitations where id = any(%s::uuid[])", (_uuids(invitation_ids),))}

    def counter_invitations(self, pairs, *, lock: bool = False) -> list[Invitation]:
        """Open invitations from callee to caller, for each (caller, callee) of `pairs`."""
        pairs = [(a, b) for a, b in pairs if len(_uuids([a, b])) == 2]
        if not pairs:
            return []
        return [Invitation.from_row(r) for r in self._all(
            f"""select i.* from public.call_invitations i
                  join unnest(%s::uuid[], %s::uuid[]) as p(caller, callee)
                    on i.caller_id = p.callee and i.callee_id = p.caller
                 where i.status in ('pending', 'ringing')
                 order by i.created_at, i.id{" for update of i" if lock else ""}""",
            ([a for a, _ in pairs], [b for _, b in pairs]))]

    def live_call_ids(self, room_names) -> dict[str, str]:
        rows = self._all(f"select room_name, id from public.calls where room_name = any(%s) and status in {_LIVE}",
                         (list(room_names),))
        return {r["room_name"]: str(r["id"]) for r in rows}

    def is_party(self, room_name: str, identity: str) -> bool:
        return self._one("select exists (select 1 from public.callflow_room_parties(%s) p where p::text = %s) as x",
                         (room_name, identity))["x"]

    def set_room_sid(self, call_id: str, room_sid: str) -> None:
        if room_sid:
            self.conn.execute(
                "update public.calls set livekit_room_sid = %s where id = %s and livekit_room_sid is null",
                (room_sid, call_id))

    # ---- room actions (orchestration/lifecycle/room_actions.py) -----------------------------------
    def add_room_actions(self, actions: list) -> None:
        """Written down with the decision; the sweep takes one over if it is still here after the
        first retry delay (its worker died, or is slow)."""
        self.conn.cursor().executemany(
            """insert into public.callflow_room_actions (key, action, room_name, call_id, identity, participant_sid,
                                                         next_attempt_at)
               values (%(key)s, %(action)s, %(room)s, %(call)s, %(identity)s, %(sid)s,
                       %(now)s::timestamptz + make_interval(secs => %(after)s))
               on conflict (key) do nothing""",
            [{"key": a.key, "room": a.room_name, "now": self.now(), "after": ROOM_ACTION_FIRST_RETRY_SECONDS,
              "action": a.action,
              "call": getattr(a, "call_id", None), "identity": getattr(a, "identity", None),
              "sid": getattr(a, "participant_sid", None)} for a in actions])

    def room_actions_done(self, keys: list[str]) -> None:
        self.conn.execute("delete from public.callflow_room_actions where key = any(%s)", (list(keys),))

    def room_actions_failed(self, failures: list[tuple[str, float, str]]) -> None:
        """(key, seconds until the next attempt, error) each."""
        self.conn.cursor().executemany(
            """update public.callflow_room_actions
                  set attempts = attempts + 1, last_error = %(error)s,
                      next_attempt_at = %(now)s::timestamptz + make_interval(secs => %(delay)s)
                where key = %(key)s""",
            [{"key": k, "delay": d, "error": e, "now": self.now()} for k, d, e in failures])

    def take_due_room_actions(self, limit: int, lease: float) -> list[dict]:
        """The due actions, each out of other sweeps' way for `lease` seconds."""
        return self._all(
            """update public.callflow_room_actions a
                  set next_attempt_at = %(now)s::timestamptz + make_interval(secs => %(lease)s)
                where a.key in (select key from public.callflow_room_actions where next_attempt_at <= %(now)s
                                 order by next_attempt_at limit %(limit)s for update skip locked)
            returning a.key, a.action, a.room_name, a.call_id, a.identity, a.participant_sid, a.attempts""",
            {"now": self.now(), "lease": lease, "limit": limit})

    # ---- sweeps --------------------------------------------------------------------------------
    def ringing_due_between(self, start: datetime, end: datetime, limit: int = 2000) -> list[dict]:
        return self._all(
            """select id, room_name, caller_id, callee_id from public.call_invitations where status = 'ringing'
                 and ring_deadline > %s and ring_deadline <= %s and ring_deadline <= %s
               order by ring_deadline limit %s""",
            (start, end, self.now(), limit),
        )

    def due_ring_timeouts(self, limit: int, overdue_by: float = 0.0) -> list[dict]:
        return self._all(
            """select id, room_name, caller_id, callee_id from public.call_invitations
                where status = 'ringing' and ring_deadline <= %s::timestamptz - make_interval(secs => %s)
                order by ring_deadline limit %s""",
            (self.now(), overdue_by, limit),
        )

    def stale_pending(self, older_than: float, limit: int) -> list[dict]:
        return self._all(
            """select id, room_name, status, updated_at from public.call_invitations
                where status = 'pending' and created_at < %s::timestamptz - make_interval(secs => %s)
                order by created_at limit %s""",
            (self.now(), older_than, limit),
        )

    def unrecorded_transitions(self, older_than: float, within: float, limit: int,
                               since: datetime | None = None) -> list[dict]:
        # A look covers the seconds since the last (`since`), but the session's generic plan does
        # not know it: planned for a default share of a big table, it was a parallel scan whose
        # workers took 10 ms to start for a few hundred rows; and costed past jit_above_cost by
        # that share, it was compiled (11 ms of a 14 ms look on a year of history). Neither in the
        # sweep's transaction (its statements are all small).
        self.conn.execute("select set_config('max_parallel_workers_per_gather', '0', true), set_config('jit', 'off', true)")
        return self._all(
            """select i.id, i.room_name, i.status, i.updated_at from public.call_invitations i
                where i.status in ('accepted', 'declined', 'cancelled')
                  and i.updated_at < %(now)s::timestamptz - make_interval(secs => %(after)s)
                  and i.updated_at > %(now)s::timestamptz - make_interval(secs => %(within)s)
                  and i.updated_at >= coalesce(%(since)s::timestamptz, '-infinity')
                  and not exists (select 1 from public.call_events e
                                   where e.event_id in ('realtime:' || i.id || ':' || i.status,
                                                        'transition_recovered:' || i.id || ':' || i.status))
                order by i.updated_at limit %(limit)s""",
            {"now": self.now(), "after": older_than, "within": within, "limit": limit, "since": since},
        )

    def due_grace_expiries(self, grace: float, limit: int) -> list[dict]:
        return self._all(
            # From the live calls (few) to their sessions, not from every session ever recorded
            # (the planner scanned all of call_participants every sweep).
            f"""{_LIVE_CALLS}
               select p.participant_sid, p.identity, l.room_name from live l
                 join public.call_participants p on p.call_id = l.id
                where p.left_at is not null
                  and p.left_at < %s::timestamptz - make_interval(secs => %s)
                  and not exists (select 1 from public.call_events e where e.event_id = 'grace:' || p.participant_sid)
                limit %s""",
            (self.now(), grace + 1.0, limit),
        )

    def silent_active_calls(self, ring_timeout: float, grace: float, limit: int) -> list[dict]:
        return self._all(
            # Each live call's sessions by its call id (one probe of call_participants_call_left):
            # `p.left_at is null` in a subquery's own condition let the planner read all of
            # call_participants_identity_open (believed empty on a big history) once per live call.
            # Active calls oldest first (calls_active_created; `created_at is not null` lets the
            # planner use it): the walk stops at `limit` silent calls. Not only the calls made a
            # ring timeout ago: a call made when its lost ringing was recovered can be answered
            # before it was made, and must end a ring timeout after that answer all the same.
            """select c.id, c.room_name from public.calls c
                cross join lateral (
                  select count(*) filter (where p.left_at is null) as open, max(p.left_at) as last_left
                    from public.call_participants p where p.call_id = c.id) s
                where c.status = 'active'
                  and c.created_at is not null
                  and s.open = 0
                  and (s.last_left is null or s.last_left <= %(now)s::timestamptz - make_interval(secs => %(grace)s))
                  and (select min(i.answered_at) from public.call_invitations i where i.call_id = c.id)
                      < %(now)s::timestamptz - make_interval(secs => %(ring)s)
                order by c.created_at limit %(limit)s""",
            {"now": self.now(), "grace": grace, "ring": ring_timeout, "limit": limit},
        )

    def live_calls_older_than(self, seconds: float, limit: int) -> list[dict]:
        return self._all(
            # A call whose room is still to be made (LiveKit gave no answer) has no room to miss yet.
            # The live calls first, then their order (_LIVE_CALLS).
            f"""{_LIVE_CALLS}
               select c.id, c.room_name from live c
                where c.created_at < %s::timestamptz - make_interval(secs => %s)
                  and not exists (select 1 from public.callflow_room_actions a where a.key = 'make:' || c.id)
                order by c.created_at limit %s""",
            (self.now(), seconds, limit),
        )

    def live_rooms(self, limit: int) -> list[str]:
        return [r["room_name"] for r in self._all(
            f"{_LIVE_CALLS} select room_name from live order by created_at limit %s", (limit,))]



class PostgresStore:
    ROOM_LOCKS = 7
    PAIR_LOCKS = 11

    def __init__(self, database_url: str, pool_size: int = 4, clock: Callable[[], datetime] | None = None,
                 email_repeat_window: float = 900.0) -> None:
        self.url = database_url
        self.email_repeat_window = email_repeat_window
        self.pool_size = pool_size
        self.clock = clock  # None: the database's clock (the model tests bring their own)

    @contextmanager
    def transaction(self, *rooms: str, pairs=()) -> Iterator[PostgresUnitOfWork]:
        """One transaction; serialised with every other one on the same rooms (the pairs first).

        Every transaction takes its locks in one order (pairs, then rooms, each sorted), so two
        that share some never wait on each other in a circle.
        """
        with get_pool(self.url, self.pool_size, generic_plans=True).connection() as conn:
            with conn.transaction():
                uow = PostgresUnitOfWork(conn, self.clock, self.email_repeat_window)
                keys = [(k, self.PAIR_LOCKS) for k in sorted({":".join(sorted(p)) for p in pairs})]
                keys += [(room, self.ROOM_LOCKS) for room in sorted(set(rooms))]
                uow.lock_all(keys)
                yield uow
