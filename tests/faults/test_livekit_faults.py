"""LiveKit's API gives no answer (cut) or answers slowly, with real participants in real rooms.

The stack's LiveKit API calls go through a proxy; participants connect to LiveKit directly (so
media survives an API outage) and LiveKit's webhooks reach web through a proxy of their own (so
a test can make them lag). The contract ("When a dependency gives no answer"): no answer is never
"nobody is in the room"; ringing does not wait for LiveKit; a decision on who is in a room waits
for an answer (a ring deadline at most 10 s past it); an active call is never ended for lack of
an answer; once LiveKit answers again, the room of a call that has ended is deleted, with
everyone out, within 10 s.
"""

from __future__ import annotations

import asyncio
import time

from orchestration.adapters.livekit_rooms import LiveKitRooms
from tests.conftest import TEST_ENV
from tests.faults.load import report
from tests.support.calls import insert_invitation, invitation
from tests.support.participants import Participant, eventually

RING_TIMEOUT = 8.0  # long enough to cut LiveKit while the calls ring, before their deadlines


def _start(faults) -> None:
    """web, listener, and a worker and beat with this module's ring timeout."""
    faults.stop("worker", "beat")
    faults.start("web", "listener")
    faults.start("worker", "beat", CALLFLOW_RING_TIMEOUT_SECONDS=RING_TIMEOUT)


def _direct_rooms(faults) -> LiveKitRooms:
    """LiveKit's API without the proxy: what the test sees of the rooms, whatever is cut."""
    return LiveKitRooms(faults.livekit.url.replace("ws://", "http://"), TEST_ENV["LIVEKIT_API_KEY"],
                        TEST_ENV["LIVEKIT_API_SECRET"])


def _call(fdb, call_id):
    return fdb.execute("select * from public.calls where id = %s", (call_id,)).fetchone()


def _people_left_in_ended_rooms(fdb, rooms: LiveKitRooms, room_names) -> dict[str, list[str]]:
    """Who is still connected in a room whose calls have all ended (none live in it)."""
    left = {}
    for room in room_names:
        live = fdb.execute("select 1 from public.calls where room_name = %s and status in ('ringing', 'active')",
                           (room,)).fetchone()
        if live:
            continue
        people = rooms.list_participants(room) or []
        if people:
            left[room] = [p.identity for p in people]
    return left


def test_livekit_api_cut_20s_while_calls_ring_are_answered_with_lagging_webhooks_and_end(faults, fdb, fault_user):
    _start(faults)
    direct = _direct_rooms(faults)

    async def scenario():
        # Before the cut: three calls that will be answered by joining, two nobody answers.
        answered = [(fault_user(), fault_user()) for _ in range(3)]
        unanswered = [(fault_user(), fault_user()) for _ in range(2)]
        invs = {}
        for caller, callee in answered + unanswered:
            invs[(caller, callee)] = insert_invitation(faults.database_url, caller, callee)
        for inv in invs.values():
            await eventually(lambda: invitation(fdb, inv["id"])["status"] == "ringing", timeout=20, what="ringing")
        joined = await asyncio.gather(*(Participant(faults.livekit.url, pair[0], inv["room_name"]).join()
                                        for pair, inv in invs.items()))
        callers = dict(zip(invs, joined))

        # The cut: LiveKit's API gives no answer for 20 s; its webhooks lag (they reach web only
        # after LiveKit's own retries, once their proxy is back).
        cut_at = time.monotonic()
        faults.proxies["livekit"].cut()
        faults.proxies["webhooks"].cut()
        joined = await asyncio.gather(*(Participant(faults.livekit.url, pair[1], invs[pair]["room_name"]).join()
                                        for pair in answered))
        callees = dict(zip(answered, joined))
        # A call started during the cut rings at once; its caller's join makes the room (LiveKit
        # makes one on the first join), and nobody answers it.
        late_pair = (fault_user(), fault_user())
        inserted = time.monotonic()
        late = insert_invitation(faults.database_url, *late_pair)
        await eventually(lambda: invitation(fdb, late["id"])["status"] == "ringing", timeout=15,
                         what="ringing while LiveKit gives no answer")
        ring_delay_during_cut = time.monotonic() - inserted
        callers[late_pair] = await Participant(faults.livekit.url, late_pair[0], late["room_name"]).join()
        invs[late_pair] = late
        unanswered.append(late_pair)

        # Past every ring deadline: the callees who joined are not missed.
        deadline = max(invitation(fdb, invs[p]["id"])["ring_deadline"] for p in answered)
        now = fdb.execute("select now() as now").fetchone()["now"]
        assert deadline > now, "the cut came after the deadlines: the scenario did not happen"
        await asyncio.sleep((deadline - now).total_seconds() + 1.5)
        for pair in answered:
            assert invitation(fdb, invs[pair]["id"])["status"] in ("ringing", "accepted"), \
                "a callee in the room was decided on LiveKit's silence"
        faults.proxies["webhooks"].restore()  # the join webhooks now arrive on LiveKit's retries

        for pair in answered:
            await eventually(lambda: invitation(fdb, invs[pair]["id"])["status"] == "accepted", timeout=20,
                             what="answered by joining (its webhook late)")
        # Nobody answered these: decided from the database 10 s past their deadline.
        for pair in unanswered:
            got = await eventually(lambda: (lambda r: r if r["status"] == "missed" else None)(
                invitation(fdb, invs[pair]["id"])), timeout=25, what="missed, decided without LiveKit")
            late_by = (got["ended_at"] - got["ring_deadline"]).total_seconds()
            assert 10 <= late_by <= 15, late_by

        # The callees hang up while LiveKit is still cut: their grace periods pass, and the calls
        # stay active (never ended for lack of an answer).
        for pair in answered:
            await callees[pair].leave()
        await asyncio.sleep(3 * float(TEST_ENV["CALLFLOW_GRACE_SECONDS"]))
        for pair in answered:
            call = _call(fdb, invitation(fdb, invs[pair]["id"])["call_id"])
            assert call["status"] == "active", "an active call was ended on LiveKit's silence"
        await asyncio.sleep(max(0.0, 20 - (time.monotonic() - cut_at)))

        # LiveKit answers again: the hang-ups are decided, and every ended call's room is deleted
        # with everyone out within 10 s.
        faults.proxies["livekit"].restore()
        restored = time.monotonic()
        for pair in answered:
            await eventually(lambda: _call(fdb, invitation(fdb, invs[pair]["id"])["call_id"])["status"] == "completed",
                             timeout=15, what="hung up once LiveKit answered")
        ended_rooms = [invs[p]["room_name"] for p in answered + unanswered]
        await eventually(lambda: not _people_left_in_ended_rooms(fdb, direct, ended_rooms) and all(
            callers[p].disconnected.is_set() for p in answered + unanswered), timeout=10,
            what="everyone out of the ended calls' rooms within 10 s")
        emptied_after = time.monotonic() - restored
        await eventually(lambda: fdb.execute("select count(*) as n from public.callflow_room_actions")
                         .fetchone()["n"] == 0 or None, timeout=15, what="no room action left")
        # The call that rang during the cut got its room: made by the room action, or by the
        # caller's first join.
        late_call = _call(fdb, invitation(fdb, late["id"])["call_id"])
        assert late_call["livekit_room_sid"]
        wrongly_ended = sum(invitation(fdb, invs[p]["id"])["status"] != "accepted" for p in answered)
        sessions = fdb.execute(
            """select count(*) as n, count(*) filter (where left_at is not null) as closed
                 from public.call_participants p join public.call_invitations i on i.call_id = p.call_id
                where i.id = any(%s::uuid[])""", ([inv["id"] for inv in invs.values()],)).fetchone()
        assert sessions["n"] == 2 * len(answered) + len(unanswered) == sessions["closed"], sessions
        assert late_call["status"] == "missed"
        for p in callers.values():
            await p.leave()
        report("livekit_api_cut", length_s=restored - cut_at, load=f"{len(invs)} calls ringing, 3 answered by joining",
               ring_delay_during_cut_s=ring_delay_during_cut, wrongly_ended=wrongly_ended,
               missed_decided_late_by_s="10-15 (database)", left_in_ended_rooms=0,
               sessions_recorded=f"{sessions['n']}/{sessions['n']}", everyone_out_after_restore_s=emptied_after)

    asyncio.run(scenario())
    direct.close()


def test_livekit_api_slow_3s_a_call_rings_is_answered_and_ends(faults, fdb, fault_user):
    _start(faults)
    direct = _direct_rooms(faults)

    async def scenario():
        with faults.proxies["livekit"].toxic("latency", latency=3000):
            caller, callee = fault_user(), fault_user()
            inserted = time.monotonic()
            inv = insert_invitation(faults.database_url, caller, callee)
            await eventually(lambda: invitation(fdb, inv["id"])["status"] == "ringing", timeout=20, what="ringing")
            ring_delay = time.monotonic() - inserted
            a = await Participant(faults.livekit.url, caller, inv["room_name"]).join()
            b = await Participant(faults.livekit.url, callee, inv["room_name"]).join()
            await eventually(lambda: invitation(fdb, inv["id"])["status"] == "accepted", timeout=20, what="answered")
            await asyncio.sleep(RING_TIMEOUT + 1)  # the deadline passes while the callee is in: no miss
            call_id = invitation(fdb, inv["id"])["call_id"]
            assert _call(fdb, call_id)["status"] == "active"
            await b.leave()
            hung_up = time.monotonic()
            await eventually(lambda: _call(fdb, call_id)["status"] == "completed", timeout=30, what="hung up")
            await eventually(lambda: a.disconnected.is_set(), timeout=20, what="caller out of the ended call's room")
            out_after = time.monotonic() - hung_up
            assert invitation(fdb, inv["id"])["status"] == "accepted"
            assert not _people_left_in_ended_rooms(fdb, direct, [inv["room_name"]])
        report("livekit_api_slow", length_s="one call", load="1 call, every API call +3 s",
               ring_delay_s=ring_delay, wrongly_ended=0, caller_out_after_hangup_s=out_after, left_in_ended_rooms=0)

    asyncio.run(scenario())
    direct.close()


def test_room_actions_outlive_livekit_cut_and_the_worker_that_decided_them(faults, fdb, fault_user):
    """A call ends while LiveKit's API gives no answer; the worker that decided it is SIGKILLed.
    The room's deletion stays written down (visible in /metrics and `callflow doctor`), and once
    LiveKit answers again another worker's sweep deletes it: the caller is out within 10 s."""
    import signal
    import subprocess

    import httpx

    from tests.conftest import _wait_worker_ready
    from devstack import services
    from tests.support.calls import client_set_status

    _start(faults)

    async def scenario():
        # What an earlier test left owed (a release LiveKit answered slowly) is done first: this
        # test counts its own.
        await eventually(lambda: fdb.execute("select count(*) as n from public.callflow_room_actions")
                         .fetchone()["n"] == 0 or None, timeout=20, what="no room action left from before")
        caller, callee = fault_user(), fault_user()
        inv = insert_invitation(faults.database_url, caller, callee)
        await eventually(lambda: invitation(fdb, inv["id"])["status"] == "ringing", timeout=20, what="ringing")
        a = await Participant(faults.livekit.url, caller, inv["room_name"]).join()
        faults.proxies["livekit"].cut()
        cut_at = time.monotonic()
        client_set_status(faults.database_url, caller, inv["id"], "cancelled")  # the caller hangs up in the app
        cancelled = await eventually(lambda: (lambda r: r if r["status"] == "cancelled" and r["call_id"] else None)(
            invitation(fdb, inv["id"])), timeout=20, what="cancelled")
        call_id = cancelled["call_id"]
        action = await eventually(lambda: fdb.execute(
            "select * from public.callflow_room_actions where key = %s and attempts >= 1",
            (f"release:{call_id}",)).fetchone(), timeout=20, what="the release written down, LiveKit silent")
        assert action["room_name"] == inv["room_name"]
        assert a.connected, "nobody could have removed the caller: LiveKit's API gives no answer"

        def pending_in_metrics():
            text = httpx.get(f"{faults.web_url}/metrics", timeout=5).text
            return 'callflow_room_actions_pending{action="release"} 1.0' in text and \
                "callflow_room_actions_oldest_age_seconds" in text
        await eventually(pending_in_metrics, timeout=15, what="/metrics showing the pending release")
        doctor = subprocess.run([str(services.VENV_BIN / "callflow"), "doctor"], env=faults.env, capture_output=True,
                                text=True, timeout=60)
        line = next(line for line in doctor.stdout.splitlines() if "room actions" in line)
        assert "1 pending (1 release)" in line, line

        faults.processes.pop("worker").kill(signal.SIGKILL)
        faults.proxies["livekit"].restore()
        restored = time.monotonic()
        faults.start("worker", CALLFLOW_RING_TIMEOUT_SECONDS=RING_TIMEOUT)
        await eventually(lambda: a.disconnected.is_set(), timeout=10 + 10, what="the caller out once LiveKit answers")
        out_after = time.monotonic() - restored
        await eventually(lambda: fdb.execute("select count(*) as n from public.callflow_room_actions")
                         .fetchone()["n"] == 0 or None, timeout=10, what="the release struck off")
        assert _call(fdb, call_id)["status"] == "cancelled"
        report("livekit_api_cut_and_worker_killed", length_s=restored - cut_at,
               load="1 call cancelled while LiveKit's API was cut; its worker SIGKILLed",
               left_in_ended_rooms=0, caller_out_after_restore_s=out_after,
               note="includes starting a new worker (the sweep of the running beat retries)")

    asyncio.run(scenario())


def test_livekit_api_black_holed_an_invitation_rings_within_one_request_timeout(faults, fdb, fault_user):
    """LiveKit's API accepts connections and never answers (a black hole, not a refusal): ringing
    waits for one request's timeout at most, never for a series of retries."""
    _start(faults)

    def rings_after() -> float:
        inserted = time.monotonic()
        inv = insert_invitation(faults.database_url, fault_user(), fault_user())
        while time.monotonic() - inserted < 30:
            if invitation(fdb, inv["id"])["status"] == "ringing":
                return time.monotonic() - inserted
            time.sleep(0.05)
        raise AssertionError(f"not ringing after 30 s: {invitation(fdb, inv['id'])}")

    with faults.proxies["livekit"].toxic("timeout", timeout=0):
        started = time.monotonic()
        first = rings_after()
        # The sweeps meanwhile (each waiting on LiveKit too) must not take the worker from ringing.
        time.sleep(max(0.0, RING_TIMEOUT + 2 - (time.monotonic() - started)))
        later = rings_after()
        held = time.monotonic() - started
    report("livekit_api_black_hole", length_s=held, load="2 calls, one past its deadline while the second rings",
           ring_delay_s=first, ring_delay_with_sweeps_waiting_s=later)
    assert first < 8 and later < 8, (first, later)
