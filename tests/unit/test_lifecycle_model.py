"""The lifecycle against a model of every interleaving (hypothesis state machine, no services).

Clients insert and move invitations (their changes delivered, duplicated or lost), participants
join, leave, abort and rejoin from another device, LiveKit's webhooks arrive late, twice, out of
order or never, rooms time out, timers fire or are lost, and the sweep runs — all against the
real decision code through the fakes of `tests/support/fakes.py`. After every step the contract's
invariants are checked.

What it does not model: two workers at once (the store's locks serialise a room; the integration
tier runs the same machine against Postgres), and LiveKit's own 30-second drop of old webhooks
(a dropped webhook is modelled directly).
"""

from __future__ import annotations

import itertools
import os
from datetime import timedelta

import hypothesis.strategies as st
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from orchestration.domain.model import (
    CallStatus,
    EndReason,
    InvitationStatus as S,
    call_started_at,
    deserves_missed_call_email,
    room_parties,
    seconds_between,
)
from orchestration.lifecycle.context import LifecycleConfig, Ports
from orchestration.lifecycle.grace_expired import handle_grace_expired
from orchestration.ingest.mapping import Change
from orchestration.lifecycle.invitation_changed import handle_invitation_changed, handle_invitations_changed
from orchestration.lifecycle.livekit_event import handle_livekit_event, handle_livekit_events
from orchestration.lifecycle.ring_timeout import handle_ring_timeout
from orchestration.lifecycle.sweep import run_sweep
from tests.support.fakes import FakeClock, FakeRoom, FakeRooms, FakeScheduler, FakeStore, FakeThrottle, GuardViolation

USERS = ("ana", "bo", "cy", "di")
DEVICES = {"ana": 2, "bo": 1, "di": 1}  # push tokens each user registered (cy has none)
ROOMS = ("r1", "r2")
RING, GRACE, SWEEP = 30.0, 5.0, 1.0
SLACK = timedelta(seconds=1)  # LiveKit's second-resolution times
EXAMPLES = int(os.environ.get("CALLFLOW_MODEL_EXAMPLES", "2000"))


class LiveKitSim(FakeRooms):
    """FakeRooms that emits webhooks (protojson, second resolution) as LiveKit would."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.outbox: list[dict] = []
        self._ev = itertools.count(1)

    def _emit(self, kind: str, room: str, sid: str, participant: dict | None = None) -> None:
        ev = {"id": f"EV_{next(self._ev):06d}", "event": kind, "room": {"name": room, "sid": sid},
              "createdAt": str(int(self.clock.now().timestamp()))}
        if participant is not None:
            ev["participant"] = participant
        self.outbox.append(ev)

    def _p(self, identity: str, sid: str, joined: int) -> dict:
        return {"sid": sid, "identity": identity, "joinedAt": str(joined), "state": "ACTIVE"}

    def create_room(self, name, **kw):
        fresh = name not in self.rooms
        info = super().create_room(name, **kw)
        if fresh:
            self._emit("room_started", name, info.sid)
        return info

    def join(self, identity: str, room: str) -> None:
        if room not in self.rooms:  # a valid token brings a closed room back
            self.rooms[room] = FakeRoom(self.new_sid("RM"))
            self._emit("room_started", room, self.rooms[room].sid)
        r = self.rooms[room]
        if identity in r.participants:  # the same identity from another device: the first is dropped
            self._emit("participant_left", room, r.sid, self._p(identity, r.participants[identity], self._joined))
        sid = self.new_sid("PA")
        self._joined = int(self.clock.now().timestamp())
        r.participants[identity] = sid
        self._emit("participant_joined", room, r.sid, self._p(identity, sid, self._joined))

    _joined = 0

    def leave(self, identity: str, room: str, aborted: bool = False) -> None:
        r = self.rooms[room]
        sid = r.participants.pop(identity)
        self._emit("participant_connection_aborted" if aborted else "participant_left", room, r.sid,
                   self._p(identity, sid, int(self.clock.now().timestamp())))

    def close_if_empty(self, room: str) -> None:
        r = self.rooms.get(room)
        if r is not None and not r.participants:
            del self.rooms[room]
            self._emit("room_finished", room, r.sid)

    def delete_room(self, room):
        r = self.rooms.get(room)
        super().delete_room(room)
        if r is not None:
            for identity, sid in r.participants.items():
                self._emit("participant_left", room, r.sid, self._p(identity, sid, 0))
            self._emit("room_finished", room, r.sid)

    def remove_participant(self, room, identity):
        self._check()
        r = self.rooms.get(room)
        if r is not None and identity in r.participants:
            self.leave(identity, room)
        self.removed.append((room, identity))


class LifecycleModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = self.make_clock()
        self.livekit = LiveKitSim(self.clock)
        self.scheduler = FakeScheduler()
        self.throttle = FakeThrottle()  # one for the whole run: the sweep's marks carry from look to look
        self.world = self.make_world()  # where clients write, and what the invariants read
        self.view = self.world
        self.uid = {name: name for name in USERS}
        self.room = {name: name for name in ROOMS}
        self.register_devices()
        self.ports = Ports(self.world, self.livekit, self.scheduler, LifecycleConfig(ring_timeout=RING, grace=GRACE))
        self.webhooks: list[dict] = []        # sent by LiveKit, not yet delivered
        self.dropped_rooms: set[str] = set()  # rooms some webhook of which was lost
        self.timers: list[tuple] = []         # (due, kind, args)
        self.inserted: list[str] = []         # invitation ids, in insert order
        self.held: list[Change] = []            # changes the listener has not handed on yet (sent as one batch)
        self.last_sweep = None
        self.just_swept = False
        self.silent_until = None  # when LiveKit's API last gave no answer (None: it always answered)
        self.missed_seen: set[str] = set()
        self.retried_room_actions = 0

    # ---- the world: in memory here, Postgres in the integration tier --------------------------
    def make_clock(self) -> FakeClock:
        return FakeClock()

    def make_world(self):
        return FakeStore(self.clock)

    def refresh(self) -> None:
        """Bring `view` up to date with the world (a no-op in memory)."""

    def register_devices(self) -> None:
        for name, n in DEVICES.items():
            self.world.push_tokens[self.uid[name]] = [f"{name}-device-{i}" for i in range(n)]

    def devices_of(self, user: str) -> set[str]:
        return set(self.world.push_tokens.get(user, ()))

    # ---- plumbing ---------------------------------------------------------------------------
    def _collect(self) -> None:
        """Move what the code sent (webhooks, countdowns, queue hand-offs) into the world."""
        self.webhooks.extend(self.livekit.outbox)
        self.livekit.outbox.clear()
        now = self.clock.now()
        for invitation_id, at in self.scheduler.timeouts:
            self.timers.append((at, "timeout", (invitation_id,)))
        for room, sid, identity, aborted, delay in self.scheduler.graces:
            self.timers.append((now + timedelta(seconds=delay), "grace", (room, sid, identity, aborted)))
        changes = list(self.scheduler.changes)
        self.scheduler.timeouts.clear()
        self.scheduler.graces.clear()
        self.scheduler.changes.clear()
        for change in changes:
            handle_invitation_changed(change, self.ports)
            self._collect()
        self.refresh()
        self.just_swept = False  # the sweep step sets it again after this

    def _change(self, invitation_id: str, status: str, held: bool = False) -> None:
        change = Change(invitation_id, str(status), "realtime", None, None, {})
        if held:  # arrives later, together with others
            self.held.append(change)
            return
        handle_invitation_changed(change, self.ports)
        self._collect()

    def _invitations(self, *statuses):
        # In the order they were inserted (ids may be random: draws must not depend on them).
        return [i for i in self.inserted if not statuses or self.view.invitations[i].status in statuses]

    # ---- clients ----------------------------------------------------------------------------
    @rule(caller=st.sampled_from(USERS), callee=st.sampled_from(USERS), room=st.sampled_from(ROOMS),
          video=st.booleans(), delivered=st.booleans(), held=st.booleans())
    def insert(self, caller, callee, room, video, delivered, held):
        if caller == callee:
            return
        try:
            inv = self.world.insert_invitation(self.uid[caller], self.uid[callee], self.room[room],
                                               "video" if video else "audio")
        except GuardViolation:  # refused by the database's rules (room in use, already invited)
            self._collect()
            return
        self.inserted.append(inv.id)
        if delivered:
            self._change(inv.id, "pending", held)
        self._collect()

    @rule(data=st.data(), move=st.sampled_from([S.ACCEPTED, S.DECLINED, S.CANCELLED]), delivered=st.booleans(),
          held=st.booleans())
    def client_moves(self, data, move, delivered, held):
        open_ids = self._invitations(S.PENDING, S.RINGING)
        if not open_ids:
            return
        inv = self.view.invitations[data.draw(st.sampled_from(open_ids))]
        user = inv.caller_id if move == S.CANCELLED else inv.callee_id
        try:
            self.world.client_update(user, inv.id, move)
        except GuardViolation:
            return
        if delivered:
            self._change(inv.id, move, held)
        self._collect()

    @precondition(lambda self: self.held)
    @rule(data=st.data(), again=st.booleans())
    def held_changes_arrive_together(self, data, again):
        # One batch, in any order (a catch-up reads by time, not by arrival), perhaps with a change twice.
        batch = data.draw(st.permutations(self.held))
        if again:
            batch.append(batch[0])
        self.held = []
        outcomes = handle_invitations_changed(batch, self.ports)
        assert len(outcomes) == len(batch)
        if again:
            assert outcomes[-1].result == "duplicate"
        self._collect()

    @rule(data=st.data())
    def change_delivered_again(self, data):
        ids = self._invitations()
        if ids:
            inv = self.view.invitations[data.draw(st.sampled_from(ids))]
            self._change(inv.id, inv.status)

    # ---- participants ----------------------------------------------------------------------------
    @rule(identity=st.sampled_from(USERS), room=st.sampled_from(ROOMS))
    def join(self, identity, room):
        self.livekit.join(self.uid[identity], self.room[room])
        self._collect()

    @rule(data=st.data(), aborted=st.booleans())
    def leave(self, data, aborted):
        rank = {uid: n for n, uid in enumerate(self.uid.values())}  # ids may be random: sort by name
        present = sorted(((room, identity) for room, r in self.livekit.rooms.items() for identity in r.participants),
                         key=lambda ri: (ri[0], rank.get(ri[1], 99)))
        if present:
            room, identity = data.draw(st.sampled_from(present))
            self.livekit.leave(identity, room, aborted)
            self._collect()

    @rule(room=st.sampled_from(ROOMS))
    def empty_room_times_out(self, room):
        self.livekit.close_if_empty(self.room[room])
        self._collect()

    # ---- LiveKit's webhooks ------------------------------------------------------------------------
    @precondition(lambda self: self.webhooks)
    @rule(data=st.data(), fate=st.sampled_from(["deliver", "deliver", "deliver", "twice", "drop"]))
    def webhook(self, data, fate):
        # Any waiting webhook, not only the oldest: they can arrive out of order.
        index = data.draw(st.integers(0, min(2, len(self.webhooks) - 1)))
        event = self.webhooks.pop(index)
        if fate == "drop":
            self.dropped_rooms.add(event["room"]["name"])
            self._collect()
            return
        handle_livekit_event(event, None, self.ports)
        if fate == "twice":
            assert handle_livekit_event(event, None, self.ports).result == "duplicate"
        self._collect()

    @precondition(lambda self: len(self.webhooks) >= 2)
    @rule(data=st.data(), again=st.booleans())
    def webhooks_arrive_together(self, data, again):
        # Waiting webhooks taken as one batch (the webhook backlog), in the order they were sent,
        # perhaps with one twice (a retry or redelivery taking what was taken before).
        count = data.draw(st.integers(2, min(6, len(self.webhooks))))
        batch, self.webhooks = self.webhooks[:count], self.webhooks[count:]
        if again:
            batch.append(batch[data.draw(st.integers(0, count - 1))])
        outcomes = handle_livekit_events(batch, self.ports)
        assert len(outcomes) == len(batch)
        if again:
            assert outcomes[-1].result == "duplicate"
        self._collect()

    # ---- LiveKit's API gives no answer, or refuses -----------------------------------------------------
    @rule(answer=st.sampled_from(["ok", "ok", "unanswered", "refused"]))
    def livekit_answers(self, answer):
        """From now on LiveKit's API answers, gives no answer (down, 5xx, 429), or refuses (4xx).
        Media and webhooks go on: participants join and leave as before."""
        if self.livekit.answer != "ok" or answer != "ok":
            self.silent_until = self.clock.now()
        self.livekit.answer = answer
        self.just_swept = False  # what the last sweep found was found under the old answer

    def silent_within(self, seconds: float) -> bool:
        """Whether LiveKit did not say who is in its rooms (no answer, or a refusal: neither says
        anyone is absent) at some time in the last `seconds`."""
        if self.livekit.answer != "ok":
            return True
        return self.silent_until is not None and self.silent_until > self.clock.now() - timedelta(seconds=seconds)

    # ---- time, timers, sweeps ------------------------------------------------------------------------
    @rule(seconds=st.sampled_from([0.3, 1.0, 2.5, 4.0, 6.0, 12.0, 31.0]), lose_timers=st.booleans())
    def time_passes(self, seconds, lose_timers):
        if self.livekit.answer != "ok":
            self.silent_until = self.clock.now() + timedelta(seconds=seconds)
        self.clock.advance(seconds)
        now = self.clock.now()
        due = [t for t in self.timers if t[0] <= now]
        self.timers = [t for t in self.timers if t[0] > now]
        if lose_timers:
            self._collect()
            return
        for _, kind, args in sorted(due, key=lambda t: t[0]):
            if kind == "timeout":
                handle_ring_timeout(args[0], "timer", self.ports)
            else:
                handle_grace_expired(*args, self.ports)
            self._collect()
        self._collect()

    @rule()
    def sweep(self):
        self.live_before_sweep = {c.id for c in self.view.calls.values() if c.live}
        self.parties_before_sweep = {c.room_name: room_parties(
            [i for i in self.view.invitations.values() if i.room_name == c.room_name], c)
            for c in self.view.calls.values() if c.live}
        report = run_sweep(self.ports, self.throttle, interval=SWEEP)
        self.retried_room_actions += report.room_actions
        self._collect()
        self.last_sweep = self.clock.now()
        self.just_swept = True

    def teardown(self):
        # What the run reached (shown by --hypothesis-show-statistics), so a model that stopped
        # exploring is noticed.
        for status in sorted({str(c.status) for c in self.view.calls.values()}):
            event(f"a call ended {status}")
        for reason in sorted({str(i.end_reason) for i in self.view.invitations.values() if i.end_reason}):
            event(f"an invitation ended {reason}")
        if any(e.type == "transition_recovered" for e in self.view.events.values()):
            event("a lost transition was recovered")
        if any(e.type == "participant_removed" for e in self.view.events.values()):
            event("a stranger was removed")
        if any(e.type == "ring_timeout" and "livekit" in e.payload for e in self.view.events.values()):
            event("a ring deadline was decided without LiveKit's answer")
        if any(entry[1] for entry in self.view.room_actions.values()) or self.retried_room_actions:
            event("a room action was retried")

    # ---- invariants ------------------------------------------------------------------------------
    @invariant()
    def terminal_invitations_never_change(self):
        """Status, reason and times are final; only a missing call link may still be filled in."""
        for versions in self.view.history.values():
            terminal = [v for v in versions if v.terminal]
            for v in terminal:
                assert (v.status, v.end_reason, v.ended_at, v.answered_at, v.ringing_at) == (
                    terminal[0].status, terminal[0].end_reason, terminal[0].ended_at, terminal[0].answered_at,
                    terminal[0].ringing_at), versions
                assert terminal[0].call_id is None or v.call_id == terminal[0].call_id, versions

    @invariant()
    def one_live_call_per_room(self):
        live = [c.room_name for c in self.view.calls.values() if c.live]
        assert len(live) == len(set(live))

    @invariant()
    def sessions_lie_inside_their_call(self):
        for p in self.view.participants.values():
            call = self.view.calls[p.call_id]
            assert p.joined_at is None or p.joined_at >= call.created_at - SLACK, (p, call)
            if call.ended_at is not None:
                assert p.left_at is not None and p.left_at <= call.ended_at + SLACK, (p, call)
            if p.left_at is not None and p.joined_at is not None:
                assert p.left_at >= p.joined_at
                assert p.duration_seconds == seconds_between(p.joined_at, p.left_at)
            # In the call of its room at that time: no other call of the room was live then.
            for other in self.view.calls.values():
                if other.id != call.id and other.room_name == call.room_name and p.joined_at is not None:
                    inside_other = other.created_at + SLACK < p.joined_at and (
                        other.ended_at is None or p.joined_at + SLACK < other.ended_at)
                    assert not inside_other, (p, call, other)

    @invariant()
    def call_times_come_from_sessions(self):
        for call in self.view.calls.values():
            sessions = [p for p in self.view.participants.values() if p.call_id == call.id]
            started = call_started_at(sessions)
            if call.ended_at is not None and started is not None and started > call.ended_at:
                started = call.ended_at
            assert call.started_at == started, (call, sessions)
            assert call.duration_seconds == seconds_between(call.started_at, call.ended_at)
            if not call.live:
                assert call.ended_at is not None and call.end_reason

    @invariant()
    def ended_calls_ring_nobody(self):
        for inv in self.view.invitations.values():
            if inv.call_id and not self.view.calls[inv.call_id].live:
                assert not inv.open, (inv, self.view.calls[inv.call_id])

    @invariant()
    def unanswered_calls_end_with_their_invitations_reason(self):
        for call in self.view.calls.values():
            invs = [i for i in self.view.invitations.values() if i.call_id == call.id]
            if call.status not in (CallStatus.RINGING, CallStatus.ACTIVE, CallStatus.COMPLETED) and invs:
                assert call.status in {i.status.value for i in invs}, (call, invs)
                assert call.end_reason in {i.end_reason for i in invs}, (call, invs)

    @invariant()
    def emails_once_and_only_when_earned(self):
        for inv in self.view.invitations.values():
            earned = inv.terminal and deserves_missed_call_email(inv.status, inv.ringing_at, inv.ended_at,
                                                                 inv.end_reason)
            if inv.id in self.view.notifications:
                assert earned, inv
            elif earned and self.last_sweep is not None and inv.ended_at + timedelta(seconds=3) < self.last_sweep:
                raise AssertionError(f"no outbox row for {inv}")

    @invariant()
    def every_device_rings_and_stops_once(self):
        """incoming_call to each of the callee's devices when it rang; call_ended to each when a
        rung invitation ended; missed_call exactly when the email is earned. Once each."""
        pushes = self.view.push_messages
        settled = self.last_sweep - timedelta(seconds=3) if self.last_sweep is not None else None
        for inv in self.view.invitations.values():
            devices = self.devices_of(inv.callee_id)
            for kind in ("incoming_call", "call_ended", "missed_call"):
                got = {token for (k, i, token) in pushes if k == kind and i == inv.id}
                assert got <= devices, (kind, inv, got)
                if kind == "incoming_call":
                    due = inv.ringing_at is not None
                elif kind == "call_ended":
                    due = inv.terminal and inv.ringing_at is not None
                else:
                    due = inv.terminal and deserves_missed_call_email(inv.status, inv.ringing_at, inv.ended_at,
                                                                      inv.end_reason)
                if not due:
                    assert not got, (kind, inv, got)
                elif kind == "incoming_call" or (settled is not None and inv.ended_at < settled):
                    assert got == devices, (kind, inv, got, devices)

    @invariant()
    def glare_answers_the_earlier(self):
        for inv in self.view.invitations.values():
            if inv.end_reason == EndReason.GLARE:
                assert inv.status == S.CANCELLED and inv.id not in self.view.notifications

    @invariant()
    def nobody_in_the_room_is_missed_on_livekits_silence(self):
        """A callee in the room is missed only when LiveKit kept silent: 10 s past the deadline,
        decided from what the database knew (their join's webhook had not arrived)."""
        for inv in self.view.invitations.values():
            if inv.status != S.MISSED or inv.id in self.missed_seen:
                continue
            self.missed_seen.add(inv.id)
            room = self.livekit.rooms.get(inv.room_name)
            if room is not None and inv.callee_id in room.participants:
                assert self.silent_within(0), inv
                assert inv.ended_at >= inv.ring_deadline + timedelta(seconds=10), inv

    @invariant()
    def room_actions_done_once_livekit_answers(self):
        """After a sweep while LiveKit answers, no room action that was due is left."""
        if not self.just_swept or self.livekit.answer == "unanswered":
            return
        now = self.clock.now()
        late = [e[0] for e in self.view.room_actions.values() if e[2] <= now]
        assert not late, late

    @invariant()
    def nothing_rings_past_its_deadline_after_a_sweep(self):
        if not self.just_swept:
            return
        now = self.clock.now()
        # While LiveKit keeps silent a deadline waits for its answer, 10 s at most.
        wait = 10 if self.silent_within(10 + SWEEP) else 0
        for inv in self.view.invitations.values():
            if inv.status == S.RINGING:
                assert inv.ring_deadline > now - timedelta(seconds=SWEEP + wait), inv
            if inv.status == S.PENDING:
                assert inv.created_at > now - timedelta(seconds=10 + SWEEP), inv
        # A client's transition is never left unrecorded for long.
        for inv in self.view.invitations.values():
            if inv.status in (S.ACCEPTED, S.DECLINED, S.CANCELLED) and inv.ended_at < now - timedelta(seconds=3):
                assert inv.call_id is not None or inv.end_reason == EndReason.GLARE, inv

    @invariant()
    def strangers_never_stay(self):
        """After a sweep, nobody is in a live call's room who is not one of its parties (once
        LiveKit has answered for a while: a removal it gave no answer to is retried with backoff)."""
        if not self.just_swept or self.livekit.answer != "ok" or self.silent_within(6 + SWEEP):
            return
        for call in self.view.calls.values():
            room = self.livekit.rooms.get(call.room_name)
            if not call.live or room is None or call.id not in self.live_before_sweep:
                continue  # (a call the sweep itself rang is looked at by the next one)
            invs = [i for i in self.view.invitations.values() if i.room_name == call.room_name]
            # (Whoever stopped being a party through work the sweep itself handed on, e.g. a
            # glare decided from a lost change, is the next sweep's.)
            strangers = set(room.participants) - room_parties(invs, call) - self.parties_before_sweep.get(
                call.room_name, set())
            assert not strangers, (call, strangers, invs)

    @invariant()
    def active_calls_have_someone(self):
        # (An active call is never ended for lack of LiveKit's answer: looked at once it answers.)
        if not self.just_swept or self.livekit.answer != "ok" or self.silent_within(6 + SWEEP):
            return
        now = self.clock.now()
        for call in self.view.calls.values():
            if call.status != CallStatus.ACTIVE or call.room_name in self.dropped_rooms:
                continue
            if any(w["room"]["name"] == call.room_name for w in self.webhooks):
                continue  # LiveKit has not told us yet
            invs = [i for i in self.view.invitations.values() if i.room_name == call.room_name]
            parties = room_parties(invs, call)
            room = self.livekit.rooms.get(call.room_name)
            if room is not None and parties & set(room.participants):
                continue
            sessions = [p for p in self.view.participants.values() if p.call_id == call.id]
            if any(p.left_at and p.left_at > now - timedelta(seconds=GRACE + 1 + SWEEP) for p in sessions):
                continue
            answered = [i.answered_at for i in invs if i.call_id == call.id and i.answered_at]
            if answered and min(answered) > now - timedelta(seconds=RING + SWEEP):
                continue
            if room is None and call.created_at > now - timedelta(seconds=60 + SWEEP):
                continue  # the room is gone: the reconciliation ends it within its period
            raise AssertionError(f"active call with nobody: {call} sessions={sessions} room={room}")


LifecycleModel.TestCase.settings = settings(
    max_examples=EXAMPLES, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink], stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLifecycleModel = LifecycleModel.TestCase
