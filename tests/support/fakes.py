"""In-memory fakes of the lifecycle's ports: store, rooms (LiveKit), scheduler, clock, throttle.

`FakeStore` keeps the same tables as the database and enforces the same guards the database
keeps (the transition table, terminal statuses, what a client may do, one live call per room and
per sid, one outbox row per invitation), so a decision the database would refuse fails here too.
Its `load` follows the Postgres adapter's query for query. The rules the database writes in SQL are
the domain's own code here, never a copy: the parties of a room (`domain.model.room_parties`),
the missed-call notices' opt-out and repeat window (`domain.notices`), and which devices get which
push (`domain.decision.push_goes_to`);
`tests/integration/test_rules_match_sql.py` holds the SQL equal to them.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

from orchestration.domain.decision import (
    ROOM_ACTION_FIRST_RETRY_SECONDS,
    ROOM_ACTIONS,
    Decision,
    EventRecord,
    Push,
    SendNotification,
    SendPushes,
    Snapshot,
    Want,
    push_goes_to,
)
from orchestration.domain.notices import MISSED_CALL, EarlierNotice, notice_skip_reason
from orchestration.domain.model import (
    CLIENT_MOVES,
    DEFAULT_END_REASON,
    Call,
    Invitation,
    InvitationStatus as S,
    Participant,
    can_transition,
    order_key,
    room_parties,
)
from orchestration.ports import LiveParticipant, RoomInfo, RoomRefused, RoomUnanswered

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


class GuardViolation(Exception):
    """What the database would refuse."""


class FakeClock:
    def __init__(self, start: datetime = T0) -> None:
        self.t = start

    def now(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> datetime:
        self.t += timedelta(seconds=seconds)
        return self.t


@dataclass
class Notification:
    invitation_id: str
    recipient_id: str
    status: str
    caller_id: str = ""
    created_at: datetime | None = None
    last_error: str | None = None


class FakeStore:
    def __init__(self, clock: FakeClock, email_repeat_window: float = 900.0) -> None:
        self.clock = clock
        self.email_repeat_window = timedelta(seconds=email_repeat_window)
        self.invitations: dict[str, Invitation] = {}
        self.calls: dict[str, Call] = {}
        self.participants: dict[str, Participant] = {}
        self.events: dict[str, EventRecord] = {}
        self.notifications: dict[str, Notification] = {}
        # auth.users: raw_user_meta_data and email (a user not here: no metadata, an address)
        self.user_meta: dict[str, object] = {}
        self.user_emails: dict[str, str | None] = {}
        self.push_tokens: dict[str, list[str]] = {}   # user -> device tokens
        self.push_providers: dict[str, str] = {}  # device token -> push_tokens.provider (missing: expo)
        self.push_messages: dict[tuple[str, str, str], str] = {}  # (kind, invitation, token) -> status
        self.push_created: dict[tuple[str, str, str], datetime] = {}  # (kind, invitation, token) -> created_at
        self.history: dict[str, list[Invitation]] = {}  # every version of each invitation
        # callflow_room_actions: key -> [effect, attempts, next attempt at]
        self.room_actions: dict[str, list] = {}
        self._ids = itertools.count(1)
        self.locked: list[tuple[str, ...]] = []

    # ---- as clients act (through the database's guards) ------------------------------------------
    def insert_invitation(self, caller: str, callee: str, room: str, call_type: str = "video") -> Invitation:
        if caller == callee:
            raise GuardViolation("caller = callee")
        # The database's admission rules (the rate limit and anonymous users are left to the
        # tests of the migration itself).
        room_invs = [i for i in self.invitations.values() if i.room_name == room]
        live = next((c for c in self.calls.values() if c.room_name == room and c.live), None)
        parties = room_parties(room_invs, live)
        if parties and caller not in parties:
            raise GuardViolation(f"room_in_use: {room}")
        if any(i.callee_id == callee and i.open for i in room_invs):
            raise GuardViolation(f"already_invited: {callee} in {room}")
        inv = Invitation(id=f"inv-{next(self._ids):05d}", room_name=room, caller_id=caller, callee_id=callee,
                         call_type=call_type, status=S.PENDING, created_at=self.clock.now())
        self._put_invitation(inv)
        return inv

    def client_update(self, user: str, invitation_id: str, status: S) -> Invitation:
        inv = self.invitations[invitation_id]
        role = "callee" if user == inv.callee_id else "caller" if user == inv.caller_id else None
        if (role, inv.status, status) not in CLIENT_MOVES:
            raise GuardViolation(f"{role} may not move {inv.status} -> {status}")
        now = self.clock.now()
        moved = replace(inv, status=status, ended_at=now, end_reason=DEFAULT_END_REASON[status].value,
                        answered_at=now if status == S.ACCEPTED else inv.answered_at)
        self._put_invitation(moved)
        return moved

    def _put_invitation(self, inv: Invitation) -> None:
        old = self.invitations.get(inv.id)
        if old is not None and old.status != inv.status:
            if old.terminal:
                raise GuardViolation(f"{inv.id} is {old.status} and can no longer become {inv.status}")
            if not can_transition(old.status, inv.status):
                raise GuardViolation(f"illegal transition {old.status} -> {inv.status}")
        self.invitations[inv.id] = inv
        self.history.setdefault(inv.id, []).append(inv)

    def meta_of(self, user: str) -> object:
        return self.user_meta.get(user, {})

    def email_of(self, user: str) -> str | None:
        return self.user_emails.get(user, f"{user}@example.test")

    def earlier_notices(self, channel: str) -> list[EarlierNotice]:
        """The outbox's rows as the repeat window reads them: emails, or push messages (each device's)."""
        if channel == "email":
            return [EarlierNotice(n.caller_id, n.recipient_id, n.status, n.created_at)
                    for n in self.notifications.values()]
        return [EarlierNotice(self.invitations[inv].caller_id, self.invitations[inv].callee_id, status,
                              self.push_created[(kind, inv, token)], kind=kind)
                for (kind, inv, token), status in self.push_messages.items()]

    # ---- the port ---------------------------------------------------------------------------------
    @contextmanager
    def transaction(self, *rooms: str, pairs=()):
        self.locked.append(tuple(sorted(set(rooms))))
        yield FakeUnitOfWork(self)


class FakeUnitOfWork:
    def __init__(self, store: FakeStore) -> None:
        self.s = store

    def now(self) -> datetime:
        return self.s.clock.now()

    def load(self, want: Want, *, lock: bool = True) -> Snapshot:
        s = self.s
        rooms = {r for r in (want.room_name, *want.other_rooms) if r}
        sids = set(want.participant_sids)
        part_calls = {p.call_id for p in s.participants.values() if p.sid in sids}
        calls = {c.id: c for c in s.calls.values()
                 if (c.room_name in rooms and c.live) or c.id in want.call_ids
                 or (c.livekit_room_sid and c.livekit_room_sid in want.room_sids) or c.id in part_calls}
        invitations = {i.id: i for i in s.invitations.values()
                       if (i.room_name in rooms and (i.open or (i.status == S.ACCEPTED and i.call_id is None)))
                       or i.id in want.invitation_ids or i.call_id in calls}
        participants = {p.sid: p for p in s.participants.values() if p.call_id in calls or p.sid in sids}
        busy = frozenset(self.busy_users(want.busy))
        counters = tuple(sorted(self.counter_invitations(want.counter_pairs), key=order_key))
        for c in counters:
            invitations.setdefault(c.id, c)
        aborted = frozenset(sid for sid in want.aborted_sids
                            if any(e.type == "participant_connection_aborted"
                                   and (e.payload.get("participant") or {}).get("sid") == sid
                                   for e in s.events.values()))
        return Snapshot(now=self.now(), room_name=want.room_name, invitations=invitations, calls=calls,
                        participants=participants,
                        seen_events=frozenset(e for e in want.event_ids if e in s.events),
                        busy_users=busy, counter_invitations=counters, aborted_sids=aborted)

    def apply(self, decision: Decision) -> list:
        s = self.s
        for action in decision.effects:
            if isinstance(action, ROOM_ACTIONS):
                s.room_actions.setdefault(action.key, [action, 0, self.now() + timedelta(
                    seconds=ROOM_ACTION_FIRST_RETRY_SECONDS)])
        for call in sorted(decision.calls, key=lambda c: c.live):
            s.calls[call.id] = call
        live_rooms = [c.room_name for c in s.calls.values() if c.live]
        if len(live_rooms) != len(set(live_rooms)):
            raise GuardViolation(f"two live calls in one room: {sorted(live_rooms)}")
        live_sids = [c.livekit_room_sid for c in s.calls.values() if c.live and c.livekit_room_sid]
        if len(live_sids) != len(set(live_sids)):
            raise GuardViolation("two live calls with one sid")
        for inv in decision.invitations:
            if inv.call_id is not None and inv.call_id not in s.calls:
                raise GuardViolation(f"{inv.id} linked to a call that does not exist")
            s._put_invitation(inv)
        for p in decision.participants:
            s.participants[p.sid] = p
        for ev in decision.events:
            s.events.setdefault(ev.event_id, ev)
        follow = []
        pushes = []
        now = self.now()
        # Each outbox decides a decision's rows against what it held before them, as the database's
        # one statement does (the rows of one statement do not see each other).
        earlier_pushes, earlier_mails = s.earlier_notices("push"), s.earlier_notices("email")
        for item in decision.outbox:
            if isinstance(item, Push):
                why = notice_skip_reason(
                    "push", caller_id=item.caller_id, recipient_id=item.callee_id,
                    recipient_meta=s.meta_of(item.callee_id), recipient_email=s.email_of(item.callee_id),
                    earlier=earlier_pushes, now=now, window=s.email_repeat_window,
                ) if item.kind == MISSED_CALL else None
                for token in s.push_tokens.get(item.callee_id, ()):
                    provider = s.push_providers.get(token, "expo")
                    if not push_goes_to(provider, item.kind):
                        continue
                    key = (item.kind, item.invitation_id, token)
                    if key not in s.push_messages:
                        s.push_messages[key] = "skipped" if why else "pending"
                        s.push_created[key] = now
                        if not why:
                            pushes.append((f"push-{len(s.push_messages)}", provider))
        send = SendPushes.of(pushes)
        if send:
            follow.append(send)
        for mail in (m for m in decision.outbox if not isinstance(m, Push)):
            if mail.invitation_id in s.notifications:
                continue
            why = notice_skip_reason(
                "email", caller_id=mail.caller_id, recipient_id=mail.callee_id,
                recipient_meta=s.meta_of(mail.callee_id), recipient_email=s.email_of(mail.callee_id),
                earlier=earlier_mails, now=now, window=s.email_repeat_window)
            status = "skipped" if why else "pending"
            s.notifications[mail.invitation_id] = Notification(mail.invitation_id, mail.callee_id, status,
                                                               mail.caller_id, now, why)
            if status == "pending":
                follow.append(SendNotification(f"n-{mail.invitation_id}"))
        return follow

    def room_actions_done(self, keys) -> None:
        for key in keys:
            self.s.room_actions.pop(key, None)

    def room_actions_failed(self, failures) -> None:
        for key, delay, _error in failures:
            if key in self.s.room_actions:
                entry = self.s.room_actions[key]
                entry[1] += 1
                entry[2] = self.now() + timedelta(seconds=delay)

    def take_due_room_actions(self, limit, lease):
        due = sorted((e for e in self.s.room_actions.values() if e[2] <= self.now()), key=lambda e: e[2])[:limit]
        rows = []
        for entry in due:
            action, attempts = entry[0], entry[1]
            entry[2] = self.now() + timedelta(seconds=lease)
            rows.append({"key": action.key, "action": action.action, "room_name": action.room_name,
                         "call_id": getattr(action, "call_id", None), "identity": getattr(action, "identity", None),
                         "participant_sid": getattr(action, "participant_sid", None), "attempts": attempts})
        return rows

    def event_seen(self, event_id: str) -> bool:
        return event_id in self.s.events

    def events_seen(self, event_ids) -> set[str]:
        return {e for e in event_ids if e in self.s.events}

    def invitation(self, invitation_id: str) -> Invitation | None:
        return self.s.invitations.get(invitation_id)

    def invitations(self, invitation_ids) -> dict[str, Invitation]:
        return {i: self.s.invitations[i] for i in invitation_ids if i in self.s.invitations}

    def counter_invitations(self, pairs, *, lock: bool = False) -> list[Invitation]:
        pairs = set(pairs)
        return [i for i in self.s.invitations.values() if (i.callee_id, i.caller_id) in pairs and i.open]

    def live_call_ids(self, room_names) -> dict[str, str]:
        rooms = set(room_names)
        return {c.room_name: c.id for c in self.s.calls.values() if c.room_name in rooms and c.live}

    def busy_users(self, user_rooms) -> set[str]:
        return {u for u, room in user_rooms if self._busy(u, room)}

    def _busy(self, callee_id: str, room_name: str) -> bool:
        s, u = self.s, callee_id
        here = {c.id for c in s.calls.values() if c.live and c.room_name == room_name}
        connected = any(p.identity == u and p.left_at is None and s.calls[p.call_id].status == "active"
                        and p.call_id not in here for p in s.participants.values())
        accepted = any(i.callee_id == u and i.status == S.ACCEPTED and i.call_id
                       and s.calls[i.call_id].status == "active" and i.call_id not in here
                       for i in s.invitations.values())
        return connected or accepted

    def is_party(self, room_name: str, identity: str) -> bool:
        live = next((c for c in self.s.calls.values() if c.room_name == room_name and c.live), None)
        return identity in room_parties([i for i in self.s.invitations.values() if i.room_name == room_name], live)

    def set_room_sid(self, call_id: str, room_sid: str) -> None:
        call = self.s.calls.get(call_id)
        if call and not call.livekit_room_sid and room_sid:
            if any(c.live and c.livekit_room_sid == room_sid for c in self.s.calls.values()):
                return
            self.s.calls[call_id] = replace(call, livekit_room_sid=room_sid)

    # sweeps
    def ringing_due_between(self, start, end, limit=2000):
        now = self.now()
        return [dict(id=i.id, room_name=i.room_name, caller_id=i.caller_id, callee_id=i.callee_id)
                for i in self.s.invitations.values()
                if i.status == S.RINGING and start < i.ring_deadline <= end and i.ring_deadline <= now][:limit]

    def due_ring_timeouts(self, limit, overdue_by=0.0):
        edge = self.now() - timedelta(seconds=overdue_by)
        return sorted((dict(id=i.id, room_name=i.room_name, caller_id=i.caller_id, callee_id=i.callee_id,
                            deadline=i.ring_deadline)
                       for i in self.s.invitations.values() if i.status == S.RINGING and i.ring_deadline <= edge),
                      key=lambda r: r["deadline"])[:limit]

    def stale_pending(self, older_than, limit):
        edge = self.now() - timedelta(seconds=older_than)
        return [dict(id=i.id, room_name=i.room_name, status=i.status, updated_at=i.created_at)
                for i in self.s.invitations.values() if i.status == S.PENDING and i.created_at < edge][:limit]

    def unrecorded_transitions(self, older_than, within, limit, since=None):
        edge = self.now() - timedelta(seconds=older_than)
        out = []
        for i in sorted(self.s.invitations.values(), key=lambda i: i.ended_at or i.created_at):
            updated = i.ended_at or i.created_at
            if since is not None and updated < since:
                continue
            if i.status in (S.ACCEPTED, S.DECLINED, S.CANCELLED) and updated < edge and not (
                    f"realtime:{i.id}:{i.status}" in self.s.events
                    or f"transition_recovered:{i.id}:{i.status}" in self.s.events):
                out.append(dict(id=i.id, room_name=i.room_name, status=str(i.status), updated_at=updated))
        return out[:limit]

    def due_grace_expiries(self, grace, limit):
        edge = self.now() - timedelta(seconds=grace + 1.0)
        return [dict(participant_sid=p.sid, identity=p.identity, room_name=self.s.calls[p.call_id].room_name)
                for p in self.s.participants.values()
                if self.s.calls[p.call_id].live and p.left_at is not None and p.left_at < edge
                and f"grace:{p.sid}" not in self.s.events][:limit]

    def silent_active_calls(self, ring_timeout, grace, limit):
        now = self.now()
        out = []
        for c in sorted(self.s.calls.values(), key=lambda c: c.created_at):  # oldest first
            if c.status != "active":
                continue
            sessions = [p for p in self.s.participants.values() if p.call_id == c.id]
            if any(p.left_at is None for p in sessions):
                continue
            if any(p.left_at > now - timedelta(seconds=grace) for p in sessions):
                continue
            answered = [i.answered_at for i in self.s.invitations.values() if i.call_id == c.id and i.answered_at]
            if answered and min(answered) < now - timedelta(seconds=ring_timeout):
                out.append(dict(id=c.id, room_name=c.room_name))
        return out[:limit]

    def live_calls_older_than(self, seconds, limit):
        edge = self.now() - timedelta(seconds=seconds)
        return [dict(id=c.id, room_name=c.room_name) for c in self.s.calls.values()
                if c.live and c.created_at < edge and f"make:{c.id}" not in self.s.room_actions][:limit]

    def live_rooms(self, limit):
        return [c.room_name for c in self.s.calls.values() if c.live][:limit]



@dataclass
class FakeRoom:
    sid: str
    participants: dict[str, str] = field(default_factory=dict)  # identity -> participant sid


class FakeRooms:
    """LiveKit's RoomService as the lifecycle sees it. Participants are moved by the test."""

    def __init__(self) -> None:
        self.rooms: dict[str, FakeRoom] = {}
        self._sids = itertools.count(1)
        # What LiveKit answers: "ok", "unanswered" (no answer: down, 5xx, 429) or "refused" (a 4xx).
        self.answer = "ok"
        self.removed: list[tuple[str, str]] = []
        self.deleted: list[str] = []

    def new_sid(self, prefix: str) -> str:
        return f"{prefix}_{next(self._sids):05d}"

    def _check(self) -> None:
        if self.answer == "unanswered":
            raise RoomUnanswered("LiveKit gave no answer")
        if self.answer == "refused":
            raise RoomRefused("LiveKit refused: HTTP 403 permission_denied")

    def create_room(self, name, *, empty_timeout, departure_timeout, max_participants, metadata) -> RoomInfo:
        self._check()
        room = self.rooms.setdefault(name, FakeRoom(self.new_sid("RM")))
        return RoomInfo(name, room.sid)

    def list_participants(self, room):
        if self.answer != "ok":
            return None
        r = self.rooms.get(room)
        if r is None:
            return []
        return [LiveParticipant(identity, sid, "ACTIVE") for identity, sid in r.participants.items()]

    def existing_rooms(self, names):
        if self.answer != "ok":
            return None
        return {n for n in names if n in self.rooms}

    def delete_room(self, room):
        self._check()
        self.deleted.append(room)
        self.rooms.pop(room, None)

    def remove_participant(self, room, identity):
        self._check()
        self.removed.append((room, identity))
        r = self.rooms.get(room)
        if r is not None:
            r.participants.pop(identity, None)


class FakeScheduler:
    def __init__(self) -> None:
        self.timeouts: list[tuple[str, datetime]] = []
        self.buckets: list[float] = []
        self.graces: list[tuple[str, str, str, bool | None, float]] = []
        self.deliveries: list[tuple[str, list[str]]] = []
        self.changes: list = []  # Change objects, as the use cases hand them on

    def ring_timeouts(self, deadlines):
        self.timeouts.extend(deadlines)

    def ring_timeout_bucket(self, end):
        self.buckets.append(end)

    def ring_timeout_at(self, invitation_id, at):
        self.timeouts.append((invitation_id, at))

    def grace_expiry(self, room_name, participant_sid, identity, aborted, delay):
        self.graces.append((room_name, participant_sid, identity, aborted, delay))

    def deliver(self, channel, ids):
        self.deliveries.append((channel, list(ids)))

    def invitation_changed(self, change):
        self.changes.append(change)


class FakeThrottle:
    def __init__(self) -> None:
        self.marks: dict[str, float] = {}

    def once(self, key: str, seconds: float) -> bool:
        return True

    def forget(self, key: str) -> None:
        pass

    def mark(self, key: str) -> float | None:
        return self.marks.get(key)

    def move_mark(self, key: str, at: float, keep_seconds: float) -> None:
        self.marks[key] = max(at, self.marks.get(key, at))
