"""Resend and Expo giving no answer: Toxiproxy between the fault stack's worker and their stand-ins.

    test (clients) ──► Postgres ──► listener ──► worker ──► Toxiproxy ──► Resend / Expo stand-ins

Calls ring and are missed through the real lifecycle (the fault stack's listener, worker and beat);
the worker sends missed-call emails with the real `resend` SDK and pushes with the real Expo client,
each through a proxy of its own. Faults are Toxiproxy's: `cut()` (every connection closed, new ones
refused) and a latency longer than the client's timeout. Each test prints its line of figures for
the faults table (`FAULT <scenario>: ...`, tests/faults/load.py): the fault and its length, the load
during it, what users saw (how late emails and pushes came), what was lost (nothing) and how long
after the fault things were whole.
"""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass

import pytest
import redis

from devstack.services import wait_for
from devstack.standins.expo_server import ExpoStandin
from devstack.standins.resend_server import ResendStandIn
from orchestration.backoff import backoff_delay
from orchestration.channels.expo_push import RETRY_BASE_SECONDS, RETRY_MAX_SECONDS
from orchestration.notifications.mailers import RETRY_BASE_SECONDS as BACKOFF_BASE_SECONDS
from orchestration.notifications.mailers import RETRY_MAX_SECONDS as RESEND_BACKOFF_MAX_SECONDS
from orchestration.shared_backoff import SharedBackoff
from orchestration.push.expo import TIMEOUT_SECONDS as EXPO_TIMEOUT
from tests.faults.load import report
from tests.support.calls import insert_invitation
from tests.support.toxiproxy import Proxy

pytestmark = pytest.mark.e2e

RING_SECONDS = 8  # long enough for some rings to outlast a short Expo outage
EMAIL_RATE = 2    # Resend's default account limit
API_KEY = "re_fault_tests_0001"


@dataclass
class Rig:
    resend: ResendStandIn
    expo: ExpoStandin
    resend_proxy: Proxy
    expo_proxy: Proxy


@pytest.fixture(scope="module")
def rig(fault_stack):
    resend = ResendStandIn().start()
    expo = ExpoStandin().start()
    resend_proxy = fault_stack.toxiproxy.proxy("resend", resend.url.removeprefix("http://"))
    expo_proxy = fault_stack.toxiproxy.proxy("expo", expo.url.removeprefix("http://"))
    # A worker of this module's own: the stack's `start` leaves a running one alone, whatever its env.
    fault_stack.stop("worker")
    fault_stack.start("worker", RESEND_API_KEY=API_KEY, RESEND_API_URL=f"http://{resend_proxy.listen}",
                      EXPO_PUSH_URL=f"http://{expo_proxy.listen}", CALLFLOW_EMAIL_FROM="Calls <calls@example.test>",
                      CALLFLOW_EMAIL_RATE_PER_SECOND=str(EMAIL_RATE), CALLFLOW_RING_TIMEOUT_SECONDS=str(RING_SECONDS))
    fault_stack.start("beat", "listener")
    try:
        yield Rig(resend, expo, resend_proxy, expo_proxy)
    finally:
        fault_stack.stop("worker")  # the next module starts one with its own env
        resend.stop()
        expo.stop()


@pytest.fixture
def delivery(rig):
    """The rig, both proxies whole again after the test whatever it did to them."""
    yield rig
    rig.resend_proxy.clear()
    rig.expo_proxy.clear()


# ---- acting and looking ---------------------------------------------------------------------------

def missed_call(database_url: str, make_user, fdb, with_phone: bool = False) -> dict:
    """A caller rings a new callee (with an Expo device when `with_phone`); nobody answers."""
    caller, callee = make_user("Ana Caller"), make_user("Bo Callee")
    token = None
    if with_phone:
        token = f"ExponentPushToken[{uuid.uuid4().hex[:22]}]"
        fdb.execute("insert into public.push_tokens (user_id, token, platform) values (%s, %s, 'ios')",
                    (callee, token))
    inv = insert_invitation(database_url, caller, callee)
    return {"id": inv["id"], "callee": callee, "token": token}


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.time()))


def epoch(ts) -> float:
    return ts.timestamp()


def invitations(fdb, calls: list[dict]) -> dict[str, dict]:
    return {str(r["id"]): r for r in fdb.execute(
        "select * from public.call_invitations where id = any(%s::uuid[])", ([c["id"] for c in calls],)).fetchall()}


def all_missed(fdb, calls: list[dict], timeout: float) -> dict[str, dict]:
    return wait_for(lambda: (rows := invitations(fdb, calls)) and len(rows) == len(calls)
                    and all(r["status"] == "missed" for r in rows.values()) and rows,
                    timeout=timeout, interval=0.2, what=f"{len(calls)} invitations missed")


def emails(fdb, calls: list[dict]) -> list[dict]:
    return fdb.execute("select * from public.notifications where invitation_id = any(%s::uuid[])",
                       ([c["id"] for c in calls],)).fetchall()


def pushes(fdb, calls: list[dict]) -> list[dict]:
    return fdb.execute(
        """select m.*, t.token, i.ring_deadline from public.push_messages m
             join public.push_tokens t on t.id = m.push_token_id
             join public.call_invitations i on i.id = m.invitation_id
            where m.invitation_id = any(%s::uuid[])""", ([c["id"] for c in calls],)).fetchall()


def settled(rows: list[dict], expected: int) -> bool:
    return len(rows) == expected and all(r["status"] != "pending" for r in rows)


def resend_arrivals(resend: ResendStandIn, notification_id: str) -> list:
    """Every request for one outbox row (its Idempotency-Key), as the stand-in saw them."""
    return [r for r in list(resend.requests) if r.idempotency_key == f"callflow-notification-{notification_id}"]


def expo_arrivals(expo: ExpoStandin, row: dict) -> list[float]:
    """When Expo answered a push with a ticket (its arrival), once per time it was sent."""
    return [record.at for record in list(expo.sends) if record.status == 200 for m in record.messages
            if m["to"] == row["token"] and m["data"]["kind"] == row["kind"]
            and m["data"]["invitation_id"] == str(row["invitation_id"])]


def most_tries(seconds: float, base: float, cap: float) -> int:
    """The most requests one retry loop makes within `seconds` when every wait is the shortest the
    backoff allows (its jitter's lower half): what "retried with backoff" bounds."""
    tries, elapsed = 1, 0.0
    while True:
        elapsed += backoff_delay(tries, base, cap, jitter=False) / 2
        if elapsed > seconds:
            return tries
        tries += 1


def shown(capsys, scenario: str, **figures) -> None:
    """The scenario's line of figures for the faults table (tests/faults/load.py's `report`), shown
    even when pytest captures output."""
    with capsys.disabled():
        print()
        report(scenario, **figures)


def spread(name: str, values: list[float]) -> dict[str, float | None]:
    return {f"{name}_median_s": statistics.median(values) if values else None,
            f"{name}_max_s": max(values) if values else None}


# ---- Resend ---------------------------------------------------------------------------------------

def test_resend_cut_20s_while_calls_are_missed(delivery, faults, fdb, fault_user, capsys):
    """Every missed call's email goes exactly once after Resend is back; none is `failed`."""
    delivery.resend_proxy.cut()
    cut_at = time.time()
    calls = []
    for i in range(8):  # one call every 1.25 s: each is missed 8 s later, well inside the cut
        sleep_until(cut_at + 1.25 * i)
        calls.append(missed_call(faults.database_url, fault_user, fdb))
    all_missed(fdb, calls, timeout=30)
    sleep_until(cut_at + 21)
    restored_at = time.time()  # before the proxy lets anything through
    delivery.resend_proxy.restore()

    rows = wait_for(lambda: (rows := emails(fdb, calls)) and settled(rows, len(calls)) and rows,
                    timeout=45, interval=0.25, what="every email settled")
    assert {r["status"] for r in rows} == {"sent"}, [(r["status"], r["last_error"]) for r in rows]
    delays = []
    for row in rows:
        requests = resend_arrivals(delivery.resend, row["id"])
        accepted = [r for r in requests if r.status == 200 and not r.replayed]
        assert len(accepted) == 1, f"{row['id']}: {len(accepted)} emails"  # exactly once
        assert row["provider_message_id"] == accepted[0].email_id
        assert accepted[0].at >= restored_at  # nothing got through the cut
        delays.append(accepted[0].at - epoch(row["created_at"]))
    # Requests that got no answer: Resend's loop (one for all workers) asks once per step, however
    # many emails wait; at most one more per worker process was under way as a step began.
    unanswered = sum(r["attempts"] for r in rows) - len(rows)
    assert 1 <= unanswered <= most_tries(restored_at - cut_at, BACKOFF_BASE_SECONDS, RESEND_BACKOFF_MAX_SECONDS) + 2
    recovered = max(r.at for row in rows for r in resend_arrivals(delivery.resend, row["id"])) - restored_at
    shown(capsys, "resend_cut", length_s=restored_at - cut_at,
          load=f"{len(calls)} missed calls 1 per 1.25 s, every email due in the cut, {EMAIL_RATE} emails/s",
          **spread("email_delay", delays), requests_without_answer=unanswered,
          most_tries_per_email=max(r["attempts"] for r in rows), emails_lost=0, failed=0, duplicates=0,
          all_sent_after_restore_s=recovered)


# ---- Expo -----------------------------------------------------------------------------------------

def check_pushes(rows: list[dict], expo: ExpoStandin) -> dict[str, list]:
    """The push rules after a fault, whatever the fault was: an incoming call goes before its
    deadline or is `skipped`, never late; `call_ended` and `missed_call` go, at least once; nothing
    is `failed`. Returns the arrivals of each row by id."""
    arrivals = {}
    for row in rows:
        times = expo_arrivals(expo, row)
        arrivals[row["id"]] = times
        assert row["status"] != "failed", (row["kind"], row["last_error"])
        if row["kind"] == "incoming_call":
            assert all(t < epoch(row["ring_deadline"]) for t in times), "an incoming call was pushed late"
            if row["status"] == "skipped":
                assert "deadline" in row["last_error"] or "stopped ringing" in row["last_error"], row["last_error"]
            else:
                assert row["status"] == "sent" and times
        else:
            assert row["status"] == "sent" and times, (row["kind"], row["status"], row["last_error"])
    return arrivals


def test_expo_cut_while_invitations_ring(delivery, faults, fdb, fault_user, capsys):
    """Rings that cannot go before their deadline are skipped; every call_ended and missed_call goes
    once Expo is back; each row is retried with backoff (not once per task that came by)."""
    delivery.expo_proxy.cut()
    cut_at = time.time()
    calls = []
    for i in range(8):  # one call every 1.5 s; the last ones still ring when Expo is back
        sleep_until(cut_at + 1.5 * i)
        calls.append(missed_call(faults.database_url, fault_user, fdb, with_phone=True))
    sleep_until(cut_at + 15)
    restored_at = time.time()  # before the proxy lets anything through
    delivery.expo_proxy.restore()
    all_missed(fdb, calls, timeout=30)

    rows = wait_for(lambda: (rows := pushes(fdb, calls)) and settled(rows, 3 * len(calls)) and rows,
                    timeout=40, interval=0.25, what="every push settled")
    arrivals = check_pushes(rows, delivery.expo)
    for row in rows:
        assert all(t >= restored_at for t in arrivals[row["id"]])  # nothing got through the cut
        assert len(arrivals[row["id"]]) <= 1  # refused connections: nothing went twice
        no_answer_for = max(0.0, restored_at - epoch(row["created_at"]))
        assert row["attempts"] <= most_tries(no_answer_for, RETRY_BASE_SECONDS, RETRY_MAX_SECONDS) + 1, \
            f"{row['kind']} tried {row['attempts']} times in {no_answer_for:.1f} s without an answer"
    rings = [r for r in rows if r["kind"] == "incoming_call"]
    skipped = [r for r in rings if r["status"] == "skipped"]
    assert len(skipped) >= 4  # those whose whole ring lay inside the cut
    later = [arrivals[r["id"]][0] - epoch(r["created_at"]) for r in rows if r["kind"] != "incoming_call"]
    late_rings = [arrivals[r["id"]][0] - epoch(r["created_at"]) for r in rings if r["status"] == "sent"]
    recovered = max(t for times in arrivals.values() for t in times) - restored_at
    shown(capsys, "expo_cut", length_s=restored_at - cut_at,
          load=f"{len(calls)} calls ringing {RING_SECONDS} s 1 per 1.5 s, one phone each ({len(rows)} pushes)",
          incoming_call_sent=len(rings) - len(skipped), incoming_call_skipped=len(skipped), incoming_call_late=0,
          **spread("sent_incoming_call_delay", late_rings), **spread("call_ended_missed_call_delay", later),
          most_tries_per_push=max(r["attempts"] for r in rows), pushes_lost=0, failed=0, duplicates=0,
          all_sent_after_restore_s=recovered)


def test_expo_slower_than_the_client_timeout(delivery, faults, fdb, fault_user, capsys):
    """Expo's answers come after the client gave up: no answer. Expo's retry loop (one for all
    workers) then lets one request at a time through, so the slowness holds one worker process, not
    every one a push task lands on; the pushes go again once Expo answers (each may reach a phone
    more than once: Expo has no idempotency key, the app drops repeats by kind and invitation id).
    Rings are never pushed late, nothing is failed or lost."""
    latency = EXPO_TIMEOUT + 2
    delivery.expo_proxy.add_toxic("latency", name="slow_expo", stream="downstream", latency=int(latency * 1000))
    slow_at = time.time()
    calls = []
    for i in range(6):
        sleep_until(slow_at + 3.0 * i)
        calls.append(missed_call(faults.database_url, fault_user, fdb, with_phone=True))
    sleep_until(slow_at + 30)
    healed_at = time.time()
    delivery.expo_proxy.remove_toxic("slow_expo")
    missed = all_missed(fdb, calls, timeout=30)

    rows = wait_for(lambda: (rows := pushes(fdb, calls)) and settled(rows, 3 * len(calls)) and rows,
                    timeout=40, interval=0.25, what="every push settled")
    arrivals = check_pushes(rows, delivery.expo)
    repeats = sum(max(0, len(times) - 1) for times in arrivals.values())
    # The toxic did hold answers past the client's timeout: requests were made that got no answer.
    # Counted from the rows, not their last error: a ring whose request timed out is `skipped` at its
    # deadline (its error replaced by the reason), a push that went again once Expo answered is `sent`.
    unanswered = sum(r["attempts"] for r in rows) - sum(r["status"] == "sent" for r in rows)
    assert unanswered >= 1, [(r["kind"], r["status"], r["attempts"], r["last_error"]) for r in rows]
    # While Expo was slow: the requests that were already under way when the first timed out (at
    # most one per worker process), then one probe per step of the loop, each taking a timeout.
    during = [r for r in list(delivery.expo.sends) if slow_at <= r.at < healed_at]
    most = 2 + int((healed_at - slow_at) // EXPO_TIMEOUT) + 1
    assert len(during) <= most, f"{len(during)} requests to a slow Expo in {healed_at - slow_at:.0f} s"
    rings = [r for r in rows if r["kind"] == "incoming_call"]
    first = [times[0] - epoch(r["created_at"]) for r in rows if r["kind"] != "incoming_call"
             if (times := arrivals[r["id"]])]
    ring_started = [epoch(inv["ringing_at"]) - epoch(inv["created_at"]) for inv in missed.values()]
    recovered = max(epoch(r["sent_at"]) for r in rows if r["sent_at"]) - healed_at
    shown(capsys, "expo_slow", length_s=healed_at - slow_at, latency_s=latency, client_timeout_s=EXPO_TIMEOUT,
          load=f"{len(calls)} calls ringing {RING_SECONDS} s 1 per 3 s, one phone each ({len(rows)} pushes)",
          requests_to_expo_while_slow=len(during),
          incoming_call_sent=sum(r["status"] == "sent" for r in rings),
          incoming_call_skipped=sum(r["status"] == "skipped" for r in rings),
          incoming_call_reached_phone=sum(1 for r in rings if arrivals[r["id"]]), incoming_call_late=0,
          **spread("call_ended_missed_call_reached_phone", first), repeats_on_phones=repeats,
          requests_without_answer=unanswered,
          **spread("ring_start_delay", ring_started), pushes_lost=0, failed=0,
          outbox_settled_after_heal_s=max(0.0, recovered))


# ---- backoff after a success ----------------------------------------------------------------------

def loop_steps(faults) -> dict[str, int]:
    """How far up its backoff each dependency's shared retry loop is (0: it answered last)."""
    client = redis.Redis.from_url(faults.redis.url)
    try:
        return {name: SharedBackoff(client, name, 1.0, 10.0, probe_seconds=1).failures for name in ("resend", "expo")}
    finally:
        client.close()


def test_backoff_starts_again_after_a_success(delivery, faults, fdb, fault_user, capsys):
    """A long outage drives Resend's and Expo's retry loops up their backoff; once they answer, the
    loops start from their first step again: the email and pushes of a call missed in a short second
    outage go within seconds of its end, not after the waits the first outage had reached."""
    both = (delivery.resend_proxy, delivery.expo_proxy)
    for proxy in both:
        proxy.cut()
    first_cut = time.time()
    long_one = missed_call(faults.database_url, fault_user, fdb, with_phone=True)
    sleep_until(first_cut + 24)  # missed at ~8 s: 16 s of no answer for its email and pushes
    climbed = loop_steps(faults)
    # Climbed at all (how far depends on when the tasks came back on a loaded machine: 1 to 7 steps
    # seen); what matters is that an answer takes each back to its first step, below.
    assert climbed["resend"] >= 1 and climbed["expo"] >= 1, climbed
    for proxy in both:
        proxy.restore()
    wait_for(lambda: settled(emails(fdb, [long_one]), 1) and settled(pushes(fdb, [long_one]), 3),
             timeout=45, interval=0.25, what="the first outage's email and pushes")
    first_email = emails(fdb, [long_one])[0]
    assert first_email["status"] == "sent" and first_email["attempts"] >= 4
    assert loop_steps(faults) == {"resend": 0, "expo": 0}  # an answer: both loops back at their first step

    short_one = missed_call(faults.database_url, fault_user, fdb, with_phone=True)
    ringing = wait_for(lambda: (inv := invitations(fdb, [short_one])[short_one["id"]])["ring_deadline"] and inv,
                       timeout=10, what="the second call rings")
    sleep_until(epoch(ringing["ring_deadline"]) - 1.5)
    for proxy in both:  # the second outage: its missed call's email and pushes fall due in it
        proxy.cut()
    second_cut = time.time()
    all_missed(fdb, [short_one], timeout=10)
    sleep_until(second_cut + 5)
    for proxy in both:
        proxy.restore()
    restored_at = time.time()
    wait_for(lambda: settled(emails(fdb, [short_one]), 1) and settled(pushes(fdb, [short_one]), 3),
             timeout=30, interval=0.1, what="the second outage's email and pushes")
    [email] = emails(fdb, [short_one])
    [accepted] = [r for r in resend_arrivals(delivery.resend, email["id"]) if r.status == 200]
    assert email["status"] == "sent" and email["attempts"] >= 2  # it was tried in the second outage
    after_rows = [r for r in pushes(fdb, [short_one]) if r["kind"] != "incoming_call"]
    check_pushes(after_rows, delivery.expo)
    push_after = [expo_arrivals(delivery.expo, r)[0] - restored_at for r in after_rows]
    email_after = accepted.at - restored_at
    # The second outage lasted 5 s: a loop started from its first step waits at most about as long
    # as it has already waited (plus the email's rate slot); had it gone on from where the first
    # outage left it, it would wait 8-30 s.
    assert email_after <= 5 + 1 / EMAIL_RATE + 1, email_after
    assert max(push_after) <= 5, push_after
    shown(capsys, "backoff_after_a_success", length_s="24, whole, then 5 (Resend and Expo cut together)",
          load="1 missed call in each outage, one phone each",
          steps_reached_resend=climbed["resend"], steps_reached_expo=climbed["expo"], steps_after_the_answer=0,
          first_email_tries=first_email["attempts"], second_outage_email_after_restore_s=email_after,
          second_outage_pushes_after_restore_s=max(push_after), lost=0)
