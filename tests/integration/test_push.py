"""Push to the callee's phones, against the Expo stand-in (devstack/standins/expo_server.py).

A worker of this module's own (its own Postgres database and Redis database, `EXPO_PUSH_URL` at
the stand-in) runs the real lifecycle (the real LiveKit server makes the rooms) and the push
tasks; invitations are inserted as clients and their changes put on its queue as the listener
would. Delivery details (batches, rate, outages, receipts) are also driven in-process.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import psycopg
import pytest
import redis as redis_lib
from celery import Celery

from devstack import services
from devstack.standins.expo_server import ExpoStandin
from orchestration import names
from orchestration.channels.expo_push import RETRY_BASE_SECONDS, RETRY_MAX_SECONDS, ExpoPushChannel, expo_provider
from orchestration.delivery.loop import Attempt, Deliverer
from orchestration.delivery.rate import Rate
from orchestration.push.expo import TIMEOUT_SECONDS, ExpoClient, OutboxClient
from orchestration.shared_backoff import SharedBackoff
from tests.conftest import subprocess_env
from tests.integration.test_notifications_delivery import redis_db_url, start_worker, user_maker
from tests.support.calls import as_client, change_event

RING_TIMEOUT = 3


@pytest.fixture(scope="module")
def push_database_url():
    with services.scratch_database("callflow_push") as url:
        yield url


@pytest.fixture
def db(push_database_url):
    from orchestration.db import connect

    with connect(push_database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def make_user(db):
    return user_maker(db)


@pytest.fixture(scope="module")
def expo():
    with ExpoStandin() as server:
        yield server


@pytest.fixture(scope="module")
def broker_url(redis_server):
    url = redis_db_url(redis_server, 11)
    redis_lib.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def push_worker(push_database_url, broker_url, expo, livekit, log_dir):
    env = subprocess_env(DATABASE_URL=push_database_url, REDIS_URL=broker_url, EXPO_PUSH_URL=expo.url,
                         CALLFLOW_RING_TIMEOUT_SECONDS=str(RING_TIMEOUT), CALLFLOW_PUSH_RATE_PER_SECOND="500")
    proc = start_worker(env, log_dir, "push", concurrency=3)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def producer(broker_url):
    return Celery("push-test", broker=broker_url)


def register(database_url: str, user: str, token: str, platform: str = "ios", device: str | None = None,
             provider: str | None = None) -> dict:
    """As the app: `register_push_token(token, platform, device_name)` for Expo, or with `provider`."""
    with psycopg.connect(database_url, row_factory=psycopg.rows.dict_row) as conn:
        as_client(conn, user)
        if provider is None:
            return conn.execute("select * from public.register_push_token(%s, %s, %s)",
                                (token, platform, device)).fetchone()
        return conn.execute("select * from public.register_push_token(%s, %s, %s, %s)",
                            (token, platform, device, provider)).fetchone()


def token() -> str:
    return f"ExponentPushToken[{uuid.uuid4().hex[:22]}]"


def invite(database_url: str, producer, caller: str, callee: str) -> str:
    room = f"push-{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url) as conn:
        as_client(conn, caller)
        inv = str(conn.execute("insert into public.call_invitations (room_name, caller_id, callee_id, call_type)"
                               " values (%s, %s, %s, 'video') returning id", (room, caller, callee)).fetchone()[0])
    changed(producer, inv, "pending")
    return inv


def changed(producer, invitation_id: str, status: str) -> None:
    producer.send_task(names.INVITATION_CHANGED, args=[change_event(invitation_id, status)], queue="events")


def pushes_to(expo: ExpoStandin, tok: str, kind: str) -> list[dict]:
    return [m for m in expo.delivered(kind) if m["to"] == tok]


def wait(predicate, what: str, timeout: float = 20.0):
    return services.wait_for(predicate, timeout=timeout, what=what)


# ---- through the lifecycle ---------------------------------------------------------------------

def test_every_device_rings_and_every_device_stops_when_one_answers(db, push_database_url, make_user, expo,
                                                                   push_worker, producer):
    caller, callee = make_user("Ana Souza"), make_user("Bo")
    phone, tablet = token(), token()
    register(push_database_url, callee, phone, "ios", "Bo's iPhone")
    register(push_database_url, callee, tablet, "android", "Bo's tablet")
    inv = invite(push_database_url, producer, caller, callee)
    wait(lambda: pushes_to(expo, phone, "incoming_call") and pushes_to(expo, tablet, "incoming_call"), "incoming calls")
    ring = pushes_to(expo, phone, "incoming_call")[0]
    assert ring["priority"] == "high" and 1 <= ring["ttl"] <= RING_TIMEOUT
    assert ring["data"]["invitation_id"] == inv and ring["data"]["kind"] == "incoming_call"
    assert ring["data"]["caller_name"] == "Ana Souza" and ring["data"]["call_type"] == "video"
    assert ring["data"]["room_name"].startswith("push-") and "Ana Souza" in ring["body"]

    with psycopg.connect(push_database_url) as conn:  # one device answers
        as_client(conn, callee)
        conn.execute("update public.call_invitations set status = 'accepted' where id = %s", (inv,))
    changed(producer, inv, "accepted")
    wait(lambda: pushes_to(expo, phone, "call_ended") and pushes_to(expo, tablet, "call_ended"), "call ended")
    time.sleep(RING_TIMEOUT + 1)  # nothing more comes: no missed_call, no second call_ended
    for tok in (phone, tablet):
        assert len(pushes_to(expo, tok, "incoming_call")) == 1 and len(pushes_to(expo, tok, "call_ended")) == 1
        assert not pushes_to(expo, tok, "missed_call")
        ended = pushes_to(expo, tok, "call_ended")[0]
        assert ended["data"] == {"kind": "call_ended", "invitation_id": inv, "room_name": ring["data"]["room_name"],
                                 "status": "accepted", "end_reason": "answered"}
    rows = db.execute("select status, ticket_id from public.push_messages where invitation_id = %s", (inv,)).fetchall()
    assert len(rows) == 4 and all(r["status"] == "sent" and r["ticket_id"] for r in rows)


def test_a_missed_call_stops_the_ringing_and_tells_the_callee(db, push_database_url, make_user, expo, push_worker,
                                                             producer):
    caller, callee = make_user("Cy"), make_user("Di")
    phone = token()
    register(push_database_url, callee, phone)
    inv = invite(push_database_url, producer, caller, callee)
    wait(lambda: pushes_to(expo, phone, "missed_call"), "missed call push", timeout=RING_TIMEOUT + 15)
    assert len(pushes_to(expo, phone, "incoming_call")) == 1
    assert [m["data"]["status"] for m in pushes_to(expo, phone, "call_ended")] == ["missed"]
    missed = pushes_to(expo, phone, "missed_call")[0]
    assert missed["data"]["invitation_id"] == inv and "Cy" in missed["body"]


def test_an_unregistered_device_is_turned_off_and_gets_nothing_more(db, push_database_url, make_user, expo,
                                                                    push_worker, producer):
    caller, callee = make_user(), make_user()
    gone, kept = token(), token()
    register(push_database_url, callee, gone)
    register(push_database_url, callee, kept)
    expo.unregister(gone)
    inv = invite(push_database_url, producer, caller, callee)
    wait(lambda: pushes_to(expo, kept, "incoming_call"), "the kept device rings")
    wait(lambda: db.execute("select disabled_at from public.push_tokens where token = %s", (gone,)).fetchone()["disabled_at"],
         "the gone device turned off")
    row = db.execute("""select m.status, m.last_error from public.push_messages m join public.push_tokens t
                          on t.id = m.push_token_id where t.token = %s and m.invitation_id = %s""", (gone, inv)).fetchone()
    assert row["status"] == "failed" and "DeviceNotRegistered" in row["last_error"]
    before = len([r for r in expo.sends for m in r.messages if m["to"] == gone])
    second = invite(push_database_url, producer, caller, make_user())  # another call, another callee: unrelated
    changed(producer, inv, "pending")
    with psycopg.connect(push_database_url) as conn:
        as_client(conn, caller)
        conn.execute("update public.call_invitations set status = 'cancelled' where id = %s", (inv,))
    changed(producer, inv, "cancelled")
    wait(lambda: pushes_to(expo, kept, "call_ended"), "call ended on the kept device")
    assert len([r for r in expo.sends for m in r.messages if m["to"] == gone]) == before
    assert second


def test_an_account_switch_moves_the_token(db, push_database_url, make_user):
    first, second = make_user(), make_user()
    tok = token()
    a = register(push_database_url, first, tok, "ios", "shared phone")
    b = register(push_database_url, second, tok, "ios", None)
    assert a["id"] == b["id"] and str(b["user_id"]) == second and b["device_name"] == "shared phone"
    rows = db.execute("select user_id from public.push_tokens where token = %s", (tok,)).fetchall()
    assert [str(r["user_id"]) for r in rows] == [second]
    with pytest.raises(psycopg.errors.CheckViolation):
        register(push_database_url, first, "not-a-token")


def test_a_user_manages_only_their_own_devices(db, push_database_url, make_user):
    owner, other = make_user(), make_user()
    tok = token()
    register(push_database_url, owner, tok)
    with psycopg.connect(push_database_url) as conn:
        as_client(conn, other)
        assert conn.execute("select count(*) from public.push_tokens").fetchone()[0] == 0
        assert conn.execute("delete from public.push_tokens where token = %s", (tok,)).rowcount == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("insert into public.push_tokens (user_id, token, platform) values (%s, %s, 'ios')",
                         (owner, token()))
    with psycopg.connect(push_database_url) as conn:
        as_client(conn, other)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select * from public.push_messages")


# ---- at most 10 enabled devices a user ---------------------------------------------------------

MAX_DEVICES = 10


def enabled_tokens(db, user: str) -> set[str]:
    return {r["token"] for r in db.execute(
        "select token from public.push_tokens where user_id = %s and disabled_at is null", (user,)).fetchall()}


def seen_minutes_ago(db, tok: str, minutes: float) -> None:
    db.execute("update public.push_tokens set last_seen_at = now() - make_interval(secs => %s) where token = %s",
               (minutes * 60, tok))


def test_the_11th_device_turns_off_the_least_recently_seen(db, push_database_url, make_user):
    user, bystander = make_user(), make_user()
    theirs = [token() for _ in range(MAX_DEVICES)]
    for tok in theirs:
        register(push_database_url, user, tok)
    kept_elsewhere = token()
    register(push_database_url, bystander, kept_elsewhere)
    seen_minutes_ago(db, kept_elsewhere, 600)  # another user's device, older than all: not theirs to turn off
    for i, tok in enumerate(theirs):  # the 4th is the least recently seen, then the 10th
        seen_minutes_ago(db, tok, 60 if i == 3 else i + 1)
    eleventh = token()
    register(push_database_url, user, eleventh)
    assert enabled_tokens(db, user) == set(theirs) - {theirs[3]} | {eleventh}
    assert db.execute("select disabled_at from public.push_tokens where token = %s", (theirs[3],)).fetchone()["disabled_at"]
    twelfth = token()
    register(push_database_url, user, twelfth)
    assert enabled_tokens(db, user) == set(theirs) - {theirs[3], theirs[9]} | {eleventh, twelfth}
    assert enabled_tokens(db, bystander) == {kept_elsewhere}
    # Seeing an enabled device again (the app's start) turns nothing off.
    register(push_database_url, user, theirs[5])
    assert len(enabled_tokens(db, user)) == MAX_DEVICES and theirs[5] in enabled_tokens(db, user)


def test_registering_a_turned_off_device_again_obeys_the_cap(db, push_database_url, make_user):
    user, previous_owner = make_user(), make_user()
    old = token()
    register(push_database_url, user, old)
    db.execute("update public.push_tokens set disabled_at = now() where token = %s", (old,))  # Expo said gone
    theirs = [token() for _ in range(MAX_DEVICES)]
    for i, tok in enumerate(theirs):
        register(push_database_url, user, tok)
        seen_minutes_ago(db, tok, 30 - i)  # the first is the least recently seen
    assert enabled_tokens(db, user) == set(theirs)
    register(push_database_url, user, old)  # the app registers it again: back on, and one more than 10
    assert enabled_tokens(db, user) == set(theirs) - {theirs[0]} | {old}
    # A device that moves here from another account (a phone's account switch) counts the same.
    moved = token()
    register(push_database_url, previous_owner, moved)
    register(push_database_url, user, moved)
    assert enabled_tokens(db, user) == set(theirs) - {theirs[0], theirs[1]} | {old, moved}
    assert enabled_tokens(db, previous_owner) == set()


def test_a_clients_direct_inserts_obey_the_cap(db, push_database_url, make_user):
    user = make_user()
    tokens = [token() for _ in range(MAX_DEVICES + 5)]
    with psycopg.connect(push_database_url) as conn:  # one statement of 15 rows, as a client under RLS
        as_client(conn, user)
        conn.execute("insert into public.push_tokens (user_id, token, platform)"
                     " select %s, t, 'android' from unnest(%s::text[]) as t", (user, tokens))
    assert len(enabled_tokens(db, user)) == MAX_DEVICES
    for tok in (token(), token()):  # and one at a time
        with psycopg.connect(push_database_url) as conn:
            as_client(conn, user)
            conn.execute("insert into public.push_tokens (user_id, token, platform) values (%s, %s, 'ios')",
                         (user, tok))
        assert tok in enabled_tokens(db, user) and len(enabled_tokens(db, user)) == MAX_DEVICES


def test_registrations_at_the_same_time_leave_at_most_10(db, push_database_url, make_user):
    user = make_user()
    for _ in range(MAX_DEVICES):
        register(push_database_url, user, token())
    for _ in range(3):  # rounds of 6 registrations at once, each holding its transaction open a while
        start = threading.Barrier(6)
        errors: list[BaseException] = []

        def one() -> None:
            try:
                with psycopg.connect(push_database_url) as conn:
                    as_client(conn, user)
                    start.wait(timeout=10)
                    conn.execute("select public.register_push_token(%s, 'ios', null)", (token(),))
                    time.sleep(0.2)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert len(enabled_tokens(db, user)) == MAX_DEVICES
    assert db.execute("select count(*) as n from public.push_tokens where user_id = %s", (user,)).fetchone()["n"] == 28


# ---- providers: Expo, APNs VoIP (PushKit), FCM ----------------------------------------------------

def apns_token() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex  # 64 hex characters


def fcm_token() -> str:
    return f"fcm-{uuid.uuid4().hex}:APA91b{uuid.uuid4().hex}"


def test_a_device_registers_with_its_provider(db, push_database_url, make_user):
    user = make_user()
    expo_row = register(push_database_url, user, token())  # three arguments: Expo
    assert expo_row["provider"] == "expo"
    voip = apns_token()
    voip_row = register(push_database_url, user, voip.upper(), "ios", "Bo's iPhone", provider="apns_voip")
    assert (voip_row["provider"], voip_row["token"], voip_row["device_name"]) == ("apns_voip", voip, "Bo's iPhone")
    fcm = fcm_token()
    fcm_row = register(push_database_url, user, fcm, "android", provider="fcm")
    assert (fcm_row["provider"], fcm_row["token"], fcm_row["platform"]) == ("fcm", fcm, "android")
    expo_again = register(push_database_url, user, expo_row["token"], provider="expo")  # the default, said
    assert expo_again["id"] == expo_row["id"]
    # Registering again (either case for APNs) refreshes the same device and turns it back on.
    db.execute("update public.push_tokens set disabled_at = now() where id = %s", (voip_row["id"],))
    again = register(push_database_url, user, voip, "ios", None, provider="apns_voip")
    assert again["id"] == voip_row["id"] and again["disabled_at"] is None and again["device_name"] == "Bo's iPhone"
    assert again["last_seen_at"] > voip_row["last_seen_at"]
    rows = db.execute("select provider, count(*) as n from public.push_tokens where user_id = %s group by provider",
                      (user,)).fetchall()
    assert {r["provider"]: r["n"] for r in rows} == {"expo": 1, "apns_voip": 1, "fcm": 1}


@pytest.mark.parametrize("provider, bad", [
    ("expo", "not-a-token"),
    ("expo", "a" * 64),                                   # an APNs token is not an Expo one
    ("apns_voip", "ExponentPushToken[abc]"),
    ("apns_voip", "ab" * 31),                             # 62 characters
    ("apns_voip", "ab" * 33),                             # 66
    ("apns_voip", "g" * 64),                              # not hex
    ("apns_voip", " " + "a" * 63),
    ("fcm", ""),
    ("fcm", "has whitespace"),
    ("fcm", "line\nbreak"),
    ("fcm", "x" * 4097),
])
def test_a_malformed_token_is_refused_saying_so(push_database_url, make_user, provider, bad):
    with pytest.raises(psycopg.errors.CheckViolation, match=f"not a well-formed {provider} token") as refused:
        register(push_database_url, make_user(), bad, provider=None if provider == "expo" else provider)
    assert refused.value.diag.constraint_name == "push_tokens_token_shape"
    assert refused.value.diag.message_hint


def test_the_longest_fcm_token_is_taken(push_database_url, make_user):
    assert register(push_database_url, make_user(), "x" * 4096, provider="fcm")["provider"] == "fcm"


@pytest.mark.parametrize("provider", ["gcm", "APNS_VOIP", "", None])
def test_an_unknown_provider_is_refused_saying_so(push_database_url, make_user, provider):
    with psycopg.connect(push_database_url) as conn:
        as_client(conn, make_user())
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="unknown provider") as refused:
            conn.execute("select public.register_push_token(%s, 'ios', null, %s)", (apns_token(), provider))
    assert "apns_voip" in refused.value.diag.message_hint


def test_an_unknown_platform_is_refused_saying_so(push_database_url, make_user):
    with pytest.raises(psycopg.errors.CheckViolation, match="unknown platform 'windows'"):
        register(push_database_url, make_user(), token(), "windows")


def test_the_same_token_under_two_providers_is_two_devices(db, push_database_url, make_user):
    user, other = make_user(), make_user()
    shared = apns_token()  # 64 hex characters: well formed for APNs and for FCM
    voip = register(push_database_url, user, shared, provider="apns_voip")
    fcm = register(push_database_url, other, shared, "android", provider="fcm")
    assert voip["id"] != fcm["id"]
    rows = db.execute("select provider, user_id from public.push_tokens where token = %s", (shared,)).fetchall()
    assert sorted((r["provider"], str(r["user_id"])) for r in rows) == sorted([("apns_voip", user), ("fcm", other)])
    # The account switch moves one provider's device only.
    moved = register(push_database_url, other, shared, provider="apns_voip")
    assert moved["id"] == voip["id"] and str(moved["user_id"]) == other
    assert db.execute("select count(*) as n from public.push_tokens where token = %s", (shared,)).fetchone()["n"] == 2


def test_the_cap_holds_across_providers(db, push_database_url, make_user):
    user = make_user()
    theirs = [register(push_database_url, user, tok, provider=provider)["token"] for tok, provider in
              [(token(), None) for _ in range(4)]
              + [(apns_token(), "apns_voip") for _ in range(3)] + [(fcm_token(), "fcm") for _ in range(3)]]
    for i, tok in enumerate(theirs):  # the first APNs device is the least recently seen
        seen_minutes_ago(db, tok, 60 if i == 4 else i + 1)
    eleventh = fcm_token()
    register(push_database_url, user, eleventh, "android", provider="fcm")
    assert enabled_tokens(db, user) == set(theirs) - {theirs[4]} | {eleventh}


def test_anon_cannot_register_a_device(push_database_url):
    for call in ("select public.register_push_token(%s, 'ios', null)",
                 "select public.register_push_token(%s, 'ios', null, 'apns_voip')"):
        with psycopg.connect(push_database_url) as conn:
            conn.execute("set local role anon")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(call, (apns_token(),))


def test_a_signed_out_caller_is_refused_by_the_function_itself(push_database_url):
    with psycopg.connect(push_database_url) as conn:  # authenticated, but no user in the claims
        conn.execute("set local role authenticated")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="sign in first"):
            conn.execute("select public.register_push_token(%s, 'ios', null, 'apns_voip')", (apns_token(),))


# ---- delivery in-process: batches, rate, outages, receipts ---------------------------------------
# On a database of their own: the module's worker takes any pending row it finds (a burst goes in
# full batches), and must not take these.

@pytest.fixture(scope="module")
def delivery_database_url():
    with services.scratch_database("callflow_pushd") as url:
        yield url


@pytest.fixture
def ddb(delivery_database_url):
    from orchestration.db import connect

    with connect(delivery_database_url, autocommit=True) as conn:
        yield conn


def ringing_rows(ddb, n: int, deadline_in: float = 30.0) -> tuple[list[str], list[str]]:
    """n ringing invitations, one device each, and their pending incoming_call rows."""
    make_user = user_maker(ddb)
    caller = make_user("Eve")
    ids, tokens = [], []
    for _ in range(n):
        callee, tok = make_user(), token()
        tokens.append(tok)
        t = ddb.execute("insert into public.push_tokens (user_id, token, platform) values (%s, %s, 'android') returning id",
                       (callee, tok)).fetchone()["id"]
        inv = ddb.execute("""insert into public.call_invitations (room_name, caller_id, callee_id) values (%s, %s, %s)
                            returning id""", (f"batch-{uuid.uuid4().hex[:8]}", caller, callee)).fetchone()["id"]
        ddb.execute("""update public.call_invitations set status = 'ringing', ringing_at = now(),
                          ring_deadline = now() + make_interval(secs => %s) where id = %s""", (deadline_in, inv))
        ids.append(str(ddb.execute("""insert into public.push_messages (kind, invitation_id, push_token_id)
                                     values ('incoming_call', %s, %s) returning id""", (inv, t)).fetchone()["id"]))
    return ids, tokens


def one_users_rings(ddb, calls: int, devices: int) -> tuple[list[str], list[str]]:
    """`calls` ringing invitations to one user with `devices` devices: their pending incoming_call
    rows (calls x devices), and the rows' tokens."""
    make_user = user_maker(ddb)
    caller, callee = make_user("Eve"), make_user()
    tokens = [token() for _ in range(devices)]
    token_ids = [ddb.execute("insert into public.push_tokens (user_id, token, platform) values (%s, %s, 'ios') returning id",
                             (callee, tok)).fetchone()["id"] for tok in tokens]
    ids, to = [], []
    for _ in range(calls):
        inv = ddb.execute("""insert into public.call_invitations (room_name, caller_id, callee_id) values (%s, %s, %s)
                            returning id""", (f"flood-{uuid.uuid4().hex[:8]}", caller, callee)).fetchone()["id"]
        ddb.execute("""update public.call_invitations set status = 'ringing', ringing_at = now(),
                          ring_deadline = now() + interval '30 seconds' where id = %s""", (inv,))
        for tok, tid in zip(tokens, token_ids):
            ids.append(str(ddb.execute("""insert into public.push_messages (kind, invitation_id, push_token_id)
                                         values ('incoming_call', %s, %s) returning id""", (inv, tid)).fetchone()["id"]))
            to.append(tok)
    return ids, to


class PushDelivery(Deliverer):
    """The push channel's real deliverer, with the task's arguments and the sweep's receipts."""

    def deliver(self, ids: list[str], **attempt):
        return self.run(ids, Attempt(**attempt))

    def check_receipts(self, older_than: float) -> int:
        return self.channel.check_receipts(self.loop, older_than=older_than)


class _Settings:
    def __init__(self, rate: float) -> None:
        self.callflow_push_rate_per_second = rate


def delivery_for(database_url: str, redis_server, base_url: str, rate: float, loop: str | None = None,
                 client=None) -> PushDelivery:
    """A delivery with a rate and an Expo retry loop of its own (`loop`: a name deliveries share),
    so no other test's outage or booking is in its way."""
    redis_client = redis_lib.Redis.from_url(redis_db_url(redis_server, 10))
    key = f"callflow:test:rate:{uuid.uuid4().hex[:6]}"
    backoff = SharedBackoff(redis_client, f"expo-test-{loop or uuid.uuid4().hex[:6]}", RETRY_BASE_SECONDS,
                            RETRY_MAX_SECONDS, probe_seconds=TIMEOUT_SECONDS + 2)
    channel = ExpoPushChannel(client or ExpoClient(base_url), expo_provider(_Settings(rate)), database_url)
    return PushDelivery(channel, database_url, redis_client, rate=Rate(redis_client, rate, key=key), loop=backoff)


def only_these_await_receipts(ddb, ids: list[str]) -> None:
    """The receipts of every other sent row of this database are taken as read: what the module's
    earlier tests sent becomes as old as `check_receipts` looks for (15 s) on a slow run, and must
    not be counted, nor asked for, beside this test's own rows."""
    ddb.execute("""update public.push_messages set receipt_status = 'ok'
                    where status = 'sent' and receipt_status is null and id <> all(%s::uuid[])""", (ids,))


def run_like_the_task(delivery: PushDelivery, ids: list[str]) -> None:
    """What `callflow.deliver` does, with its re-queues played in-process (a countdown is a sleep here)."""
    queue = [(0.0, ids, Attempt())]
    start = time.monotonic()
    while queue:
        queue.sort(key=lambda q: q[0])
        at, batch, attempt = queue.pop(0)
        time.sleep(max(0.0, at - (time.monotonic() - start)))
        out = delivery.run(batch, attempt)
        if out.others:
            queue.append((time.monotonic() - start, out.others, Attempt()))
        for deferral in out.deferred:
            queue.append((time.monotonic() - start + deferral.seconds, deferral.ids,
                          Attempt(shared=deferral.shared, back=True)))
        if out.come_back_in is not None and out.ids:
            queue.append((time.monotonic() - start + out.come_back_in, out.ids, out.again))


def test_250_ringing_at_once_go_in_batches_of_at_most_100_within_the_rate(ddb, delivery_database_url, expo,
                                                                        redis_server):
    ids, tokens = ringing_rows(ddb, 250)
    delivery = delivery_for(delivery_database_url, redis_server, expo.url, rate=200)
    first = len(expo.sends)
    run_like_the_task(delivery, ids)  # one task, as the lifecycle sends it for the first
    for i in ids[:3]:  # the tasks of the others find their rows sent already
        assert delivery.deliver([i]).sent == 0
    sends = [r for r in expo.sends[first:] if r.status == 200]
    assert all(len(r.messages) <= 100 for r in sends) and len(sends) == 3
    assert sorted(m["to"] for r in sends for m in r.messages) == sorted(tokens)
    # Within the rate: the n-th request starts no earlier than the messages before it allow.
    t0 = sends[0].at
    sent_before = 0
    for r in sends:
        assert r.at - t0 >= sent_before / 200 - 0.05, (r.at - t0, sent_before)
        sent_before += len(r.messages)
    rows = ddb.execute("select status from public.push_messages where id = any(%s::uuid[])", (ids,)).fetchall()
    assert {r["status"] for r in rows} == {"sent"}


def test_one_callees_pushes_beyond_its_share_wait_and_another_callees_go_now(ddb, delivery_database_url, expo,
                                                                           redis_server):
    # At 500/s a callee's share is 10/s after a burst of 40. Six calls ring one user's 10 devices
    # at once with one ring of another user's: the other's, and 40 of the first's, go in the first
    # request; the first's other 20 wait for their share and go at its pace, never before the other's.
    flooded, flooded_tokens = one_users_rings(ddb, calls=6, devices=10)
    other, other_tokens = ringing_rows(ddb, 1)
    delivery = delivery_for(delivery_database_url, redis_server, expo.url, rate=500)
    assert (delivery.shares.rate_per_second, delivery.shares.burst) == (10, 40)
    first = len(expo.sends)
    run_like_the_task(delivery, flooded + other)
    sends = [r for r in expo.sends[first:] if r.status == 200]
    assert len(sends[0].messages) == 41 and other_tokens[0] in [m["to"] for m in sends[0].messages]
    assert sorted(m["to"] for r in sends for m in r.messages) == sorted(flooded_tokens + other_tokens)
    assert 1.5 <= sends[-1].at - sends[0].at <= 5  # 20 more at 10/s, in half-second steps
    rows = ddb.execute("select status from public.push_messages where id = any(%s::uuid[])", (flooded,)).fetchall()
    assert [r["status"] for r in rows] == ["sent"] * 60


def test_a_500_then_a_200_gives_one_delivery(ddb, delivery_database_url, expo, redis_server):
    ids, tokens = ringing_rows(ddb, 1)
    expo.script(500)
    run_like_the_task(delivery_for(delivery_database_url, redis_server, expo.url, rate=500), ids)
    assert len(pushes_to(expo, tokens[0], "incoming_call")) == 1
    row = ddb.execute("select status, attempts from public.push_messages where id = %s", (ids[0],)).fetchone()
    assert row["status"] == "sent" and row["attempts"] == 2


def test_expo_down_sends_after_or_skips_what_is_past_its_deadline(ddb, delivery_database_url, expo,
                                                                 redis_server):
    soon, soon_tokens = ringing_rows(ddb, 1, deadline_in=3)
    later, later_tokens = ringing_rows(ddb, 1, deadline_in=120)
    expo.down_for(6)
    delivery = delivery_for(delivery_database_url, redis_server, expo.url, rate=500)
    run_like_the_task(delivery, soon + later)
    assert pushes_to(expo, later_tokens[0], "incoming_call") and not pushes_to(expo, soon_tokens[0], "incoming_call")
    skipped = ddb.execute("select status, last_error from public.push_messages where id = %s", (soon[0],)).fetchone()
    assert skipped["status"] == "skipped" and "deadline" in skipped["last_error"]


def test_an_incoming_call_that_stopped_ringing_is_not_pushed(ddb, delivery_database_url, expo, redis_server):
    ids, tokens = ringing_rows(ddb, 1)
    ddb.execute("""update public.call_invitations set status = 'cancelled'
                   where id = (select invitation_id from public.push_messages where id = %s)""", (ids[0],))
    delivery_for(delivery_database_url, redis_server, expo.url, rate=500).deliver(ids)
    assert not pushes_to(expo, tokens[0], "incoming_call")
    assert ddb.execute("select status from public.push_messages where id = %s", (ids[0],)).fetchone()["status"] == "skipped"


def test_receipts_are_read_later_and_an_unregistered_device_is_turned_off(ddb, delivery_database_url, expo,
                                                                        redis_server):
    ids, tokens = ringing_rows(ddb, 2)
    expo.unregister_later(tokens[1])
    delivery = delivery_for(delivery_database_url, redis_server, expo.url, rate=500)
    delivery.deliver(ids)
    ddb.execute("update public.push_messages set sent_at = now() - interval '1 minute' where id = any(%s::uuid[])", (ids,))
    only_these_await_receipts(ddb, ids)
    assert delivery.check_receipts(older_than=15) == 2
    rows = {str(r["id"]): r for r in ddb.execute(
        "select id, receipt_status, last_error from public.push_messages where id = any(%s::uuid[])", (ids,)).fetchall()}
    assert rows[ids[0]]["receipt_status"] == "ok"
    assert rows[ids[1]]["receipt_status"] == "error" and "DeviceNotRegistered" in rows[ids[1]]["last_error"]
    assert ddb.execute("select disabled_at from public.push_tokens where token = %s", (tokens[1],)).fetchone()["disabled_at"]
    assert ddb.execute("select disabled_at from public.push_tokens where token = %s", (tokens[0],)).fetchone()["disabled_at"] is None


def test_development_writes_pushes_as_json_files(ddb, delivery_database_url, redis_server, tmp_path):
    ids, tokens = ringing_rows(ddb, 1)
    delivery = delivery_for(delivery_database_url, redis_server, "", rate=500, client=OutboxClient(tmp_path / "push"))
    assert delivery.deliver(ids).sent == 1
    files = list((tmp_path / "push").glob("incoming_call-*.json"))
    assert len(files) == 1
    message = json.loads(files[0].read_text())
    assert message["to"] == tokens[0] and message["data"]["kind"] == "incoming_call"


def test_a_message_rate_exceeded_ticket_is_retried_not_failed(ddb, delivery_database_url, expo, redis_server):
    # Expo's 429 for one message (a ticket, in an answered request) is no answer for that message.
    ids, tokens = ringing_rows(ddb, 2)
    expo.rate_exceed(tokens[1], times=2)
    run_like_the_task(delivery_for(delivery_database_url, redis_server, expo.url, rate=500), ids)
    assert len(pushes_to(expo, tokens[0], "incoming_call")) == 1
    assert len(pushes_to(expo, tokens[1], "incoming_call")) == 1
    rows = {str(r["id"]): r for r in ddb.execute(
        "select id, status, attempts from public.push_messages where id = any(%s::uuid[])", (ids,)).fetchall()}
    assert rows[ids[0]]["status"] == "sent" and rows[ids[0]]["attempts"] == 1
    assert rows[ids[1]]["status"] == "sent" and rows[ids[1]]["attempts"] == 3


def test_receipts_while_expo_gives_no_answer_are_asked_later(ddb, delivery_database_url, expo, redis_server):
    ids, _ = ringing_rows(ddb, 1)
    loop = uuid.uuid4().hex[:6]  # one retry loop for the three, as every worker shares Expo's
    delivery_for(delivery_database_url, redis_server, expo.url, rate=500, loop=loop).deliver(ids)
    ddb.execute("update public.push_messages set sent_at = now() - interval '1 minute' where id = any(%s::uuid[])",
                (ids,))
    only_these_await_receipts(ddb, ids)
    unreachable = f"http://127.0.0.1:{services.free_port()}"
    nobody = delivery_for(delivery_database_url, redis_server, unreachable, rate=500, loop=loop)
    assert nobody.check_receipts(older_than=15) == 0
    assert nobody.loop.failures == 1  # it asked, and got no answer
    # Expo's loop now waits a first step before anyone asks again; then the receipts are read.
    answering = delivery_for(delivery_database_url, redis_server, expo.url, rate=500, loop=loop)
    services.wait_for(lambda: answering.check_receipts(older_than=15) == 1, timeout=5, what="the receipt read")
    row = ddb.execute("select receipt_status from public.push_messages where id = %s", (ids[0],)).fetchone()
    assert row["receipt_status"] == "ok"
