"""The contract's "When a dependency gives no answer", LiveKit's API part, rule by rule, on the fakes.

LiveKit giving no answer (down, a timeout, 5xx, 429) is never an answer: it is never "nobody is in
the room"; ringing does not wait for it; a decision on who is in a room waits for an answer (a
ring deadline 10 s past it at most, then the database decides); an active call is never ended for
lack of one; what callflow must do in a room is retried until LiveKit answers. A refusal (4xx) is
an answer. (The model test plays the same rules in every interleaving; the fault tests with the
real LiveKit behind Toxiproxy.)
"""

from __future__ import annotations

from orchestration.domain.model import CallStatus, InvitationStatus as S
from orchestration.lifecycle import room_actions
from orchestration.lifecycle.context import LifecycleConfig, Ports
from orchestration.lifecycle.grace_expired import handle_grace_expired
from orchestration.ingest.mapping import Change
from orchestration.lifecycle.invitation_changed import handle_invitation_changed
from orchestration.lifecycle.livekit_event import handle_livekit_event
from orchestration.lifecycle.ring_timeout import handle_ring_timeout
from orchestration.lifecycle.sweep import run_sweep
from tests.support.fakes import FakeClock, FakeScheduler, FakeStore, FakeThrottle
from tests.unit.test_lifecycle_model import LiveKitSim

RING, GRACE = 30.0, 5.0


class World:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.store = FakeStore(self.clock)
        self.livekit = LiveKitSim(self.clock)
        self.scheduler = FakeScheduler()
        self.ports = Ports(self.store, self.livekit, self.scheduler, LifecycleConfig(ring_timeout=RING, grace=GRACE))

    def ring(self, caller="ana", callee="bo", room="r1"):
        inv = self.store.insert_invitation(caller, callee, room)
        handle_invitation_changed(Change(inv.id, "pending", "realtime", None, None, {}), self.ports)
        return self.store.invitations[inv.id]

    def webhooks(self) -> None:
        """Deliver what LiveKit sent (its webhooks go on while its API is silent)."""
        while self.livekit.outbox:
            handle_livekit_event(self.livekit.outbox.pop(0), None, self.ports)

    def sweep(self):
        return run_sweep(self.ports, FakeThrottle(), interval=1.0)


def test_an_invitation_rings_while_livekit_gives_no_answer_and_its_room_is_made_once_it_answers():
    w = World()
    w.livekit.answer = "unanswered"
    inv = w.ring()
    assert inv.status == S.RINGING
    call = w.store.calls[inv.call_id]
    assert call.livekit_room_sid is None and f"make:{call.id}" in w.store.room_actions
    w.livekit.answer = "ok"
    w.clock.advance(6)
    w.sweep()
    assert w.store.calls[call.id].livekit_room_sid == w.livekit.rooms["r1"].sid
    assert not w.store.room_actions


def test_an_invitation_whose_room_livekit_refuses_ends_failed():
    w = World()
    w.livekit.answer = "refused"
    inv = w.ring()
    assert inv.status == S.FAILED and inv.end_reason == "error"


def test_a_ring_deadline_waits_for_livekits_answer_and_a_callee_in_the_room_is_not_missed():
    w = World()
    inv = w.ring()
    w.livekit.join("bo", "r1")  # the callee joins; its webhook lags
    w.livekit.answer = "unanswered"
    w.clock.advance(RING + 0.5)
    assert handle_ring_timeout(inv.id, "timer", w.ports).result == "livekit_unanswered"
    w.clock.advance(5)
    w.sweep()
    assert w.store.invitations[inv.id].status == S.RINGING
    w.livekit.answer = "ok"  # LiveKit answers: the callee is there, so the call was answered
    w.sweep()
    assert w.store.invitations[inv.id].status == S.ACCEPTED


def test_a_ring_deadline_unanswered_10s_past_it_is_decided_from_the_database():
    w = World()
    inv = w.ring()
    w.livekit.answer = "unanswered"
    w.clock.advance(RING + 9.5)
    w.sweep()
    assert w.store.invitations[inv.id].status == S.RINGING
    w.clock.advance(1)
    w.sweep()
    missed = w.store.invitations[inv.id]
    assert missed.status == S.MISSED
    assert "livekit" in w.store.events[f"timeout:{inv.id}"].payload


def test_a_grace_period_decides_nothing_on_livekits_silence_and_an_active_call_stays_active():
    w = World()
    inv = w.ring()
    w.livekit.join("ana", "r1")
    w.livekit.join("bo", "r1")
    w.webhooks()
    assert w.store.invitations[inv.id].status == S.ACCEPTED
    w.livekit.answer = "unanswered"
    w.livekit.leave("bo", "r1")
    w.webhooks()
    w.clock.advance(GRACE + 2)
    (room, sid, identity, aborted, _delay), = w.scheduler.graces
    assert handle_grace_expired(room, sid, identity, aborted, w.ports).result == "livekit_unanswered"
    for _ in range(5):
        w.clock.advance(2)
        w.sweep()
    call = w.store.calls[inv.call_id]
    assert call.status == CallStatus.ACTIVE, "an active call ended for lack of LiveKit's answer"
    w.livekit.answer = "ok"
    w.sweep()
    assert w.store.calls[inv.call_id].status == CallStatus.COMPLETED


def test_the_room_of_an_ended_call_is_deleted_with_everyone_out_once_livekit_answers_again():
    w = World()
    inv = w.ring()
    w.livekit.join("ana", "r1")
    w.webhooks()
    w.livekit.answer = "unanswered"
    w.store.client_update("ana", inv.id, S.CANCELLED)
    handle_invitation_changed(Change(inv.id, "cancelled", "realtime", None, None, {}), w.ports)
    key = f"release:{inv.call_id}"
    assert w.store.room_actions[key][1] == 1, "tried once, and written down for later"
    assert "ana" in w.livekit.rooms["r1"].participants
    for _ in range(10):  # LiveKit silent for a minute: still owed
        w.clock.advance(6)
        w.sweep()
    assert key in w.store.room_actions and "r1" in w.livekit.rooms
    w.livekit.answer = "ok"
    w.clock.advance(room_actions.RETRY_CAP_SECONDS)
    w.sweep()
    assert "r1" not in w.livekit.rooms and not w.store.room_actions


def test_a_room_action_whose_worker_died_before_running_it_is_done_by_the_sweep():
    # Written down with the decision, never run (the worker died right after its commit).
    from orchestration.domain.decision import Decision, ReleaseRoom

    w = World()
    inv = w.ring()
    w.livekit.join("ana", "r1")
    w.webhooks()
    with w.store.transaction("r1") as uow:
        call = w.store.calls[inv.call_id]
        uow.apply(Decision("test", effects=[ReleaseRoom("r1", call.id)]))
    w.store.client_update("ana", inv.id, S.CANCELLED)  # (the call ends with it, its own release aside)
    w.sweep()
    assert "release:" + call.id in w.store.room_actions, "not due yet: its worker may still run it"
    w.clock.advance(room_actions.RETRY_CAP_SECONDS + 0.1)
    w.sweep()
    assert "release:" + call.id not in w.store.room_actions


def test_the_reconciliation_and_stranger_check_are_looked_at_again_at_the_next_sweep_after_no_answer():
    class Remembering(FakeThrottle):
        def __init__(self):
            super().__init__()
            self.forgotten = []

        def forget(self, key):
            self.forgotten.append(key)

    w = World()
    inv = w.ring()
    w.livekit.join("ana", "r1")
    w.livekit.join("bo", "r1")
    w.webhooks()
    w.clock.advance(61)  # an active call old enough for the reconciliation
    w.livekit.answer = "unanswered"
    throttle = Remembering()
    run_sweep(w.ports, throttle, interval=1.0)
    assert {"members", "reconcile"} <= set(throttle.forgotten)
    assert w.store.calls[inv.call_id].live


def test_no_answer_and_refusal_are_told_apart_by_the_livekit_adapter():
    import http.server
    import threading

    from orchestration.adapters.livekit_rooms import LiveKitRooms
    from orchestration.ports import RoomRefused, RoomUnanswered

    status = {"code": 503}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b'{"code": "unavailable", "msg": "x"}' if status["code"] >= 500 or status["code"] == 429 \
                else b'{"code": "permission_denied", "msg": "x"}'
            self.send_response(status["code"])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rooms = LiveKitRooms(f"http://127.0.0.1:{server.server_address[1]}", "devkey", "devsecret-devsecret-devsecret-0001",
                         attempts=1)
    try:
        for code, error in ((503, RoomUnanswered), (429, RoomUnanswered), (403, RoomRefused)):
            status["code"] = code
            try:
                rooms.delete_room("r1")
            except error:
                pass
            else:
                raise AssertionError(f"HTTP {code} should raise {error.__name__}")
        status["code"] = 503
        assert rooms.list_participants("r1") is None, "no answer is not an empty room"
    finally:
        server.shutdown()
    unreachable = LiveKitRooms("http://127.0.0.1:9", "devkey", "devsecret-devsecret-devsecret-0001", attempts=1)
    try:
        unreachable.create_room("r1", empty_timeout=1, departure_timeout=1, max_participants=2, metadata="{}")
    except RoomUnanswered:
        pass
    else:
        raise AssertionError("an unreachable LiveKit should be no answer")
