"""The HTTP door of the contract (`/api/calls`, its event stream, the dev routes) against the real
web process and Postgres: rows written as the signed-in user, refusals with the contract's codes."""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid

import httpx
import pytest

from config.settings import build_settings
from orchestration.auth import dev_access_token
from tests.support.calls import hold_back_from_catch_up, invitation
from workers.web.events import HUB_APPLICATION_NAME


def token_for(user_id: str, **extra) -> str:
    return dev_access_token(build_settings(), user_id, ttl_seconds=600, **extra)


def bearer(user_id: str) -> dict:
    return {"Authorization": f"Bearer {token_for(user_id)}"}


@pytest.fixture
def api(web):
    with httpx.Client(base_url=web, timeout=10) as client:
        yield client


def start_call(api, caller, callees, **body):
    return api.post("/api/calls", headers=bearer(caller), json={"callee_ids": callees, **body})


# ---- POST /api/calls ----------------------------------------------------------------------------

def test_start_call_inserts_every_invitation_as_the_caller(api, db, make_user):
    alice, bob, cy = make_user("Alice"), make_user("Bob"), make_user("Cy")
    resp = start_call(api, alice, [bob, cy], call_type="audio")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["room_name"].startswith("call-") and len(body["room_name"]) >= 25  # 128 random bits
    assert [i["callee_id"] for i in body["invitations"]] == [bob, cy]
    for inv in body["invitations"]:
        assert inv["caller_id"] == alice and inv["call_type"] == "audio" and inv["room_name"] == body["room_name"]
        assert invitation(db, inv["id"])["status"] in ("pending", "ringing")
    # two calls never share a generated room
    assert start_call(api, alice, [make_user()]).json()["room_name"] != body["room_name"]


def test_start_call_is_all_or_none(api, db, make_user):
    alice, bob = make_user(), make_user()
    room = f"room-{uuid.uuid4().hex}"
    resp = start_call(api, alice, [bob, str(uuid.uuid4())], room_name=room)  # the second callee does not exist
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "callee_ids"
    assert db.execute("select count(*) n from call_invitations where room_name = %s", (room,)).fetchone()["n"] == 0


@pytest.mark.parametrize("body, field", [
    ({}, "callee_ids"), ({"callee_ids": []}, "callee_ids"), ({"callee_ids": ["nope"]}, "callee_ids"),
    ({"callee_ids": [str(uuid.uuid4())] * 2}, "callee_ids"), ({"callee_ids": [str(uuid.uuid4())], "call_type": "fax"},
                                                              "call_type"),
    ({"callee_ids": [str(uuid.uuid4())], "room_name": " "}, "room_name"), ([1, 2], "body"),
])
def test_malformed_bodies_name_the_field(api, make_user, body, field):
    resp = api.post("/api/calls", headers=bearer(make_user()), json=body)
    assert resp.status_code == 422 and resp.json()["error"] == {**resp.json()["error"], "code": "invalid_request",
                                                                "field": field}


def test_calling_yourself_and_unauthenticated_are_refused(api, make_user):
    alice = make_user()
    assert start_call(api, alice, [alice]).status_code == 422
    resp = api.post("/api/calls", json={"callee_ids": [alice]})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
    resp = api.post("/api/calls", headers={"Authorization": "Bearer not-a-jwt"}, json={"callee_ids": [alice]})
    assert resp.status_code == 401 and "not-a-jwt" not in resp.text


def test_database_rules_come_back_with_the_contracts_codes(api, db, make_user):
    alice, bob, mallory, friend = make_user(), make_user(), make_user(), make_user()
    room = start_call(api, alice, [bob]).json()["room_name"]
    again = start_call(api, alice, [bob], room_name=room)
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_invited"
    squat = start_call(api, mallory, [friend], room_name=room)
    assert squat.status_code == 409 and squat.json()["error"]["code"] == "room_in_use"
    assert db.execute("select count(*) n from call_invitations where room_name = %s", (room,)).fetchone()["n"] == 1
    # a party may add people (a group call)
    assert start_call(api, alice, [friend], room_name=room).status_code == 201


def test_anonymous_users_are_refused(api, make_user):
    anon = make_user()
    token = dev_access_token(build_settings(), anon, ttl_seconds=600)
    import jwt as pyjwt
    claims = pyjwt.decode(token, options={"verify_signature": False})
    claims["is_anonymous"] = True
    forged = pyjwt.encode(claims, build_settings().jwt_secret(), algorithm="HS256")
    resp = api.post("/api/calls", headers={"Authorization": f"Bearer {forged}"}, json={"callee_ids": [make_user()]})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "anonymous"


def test_the_invite_rate_is_the_databases(api, make_user):
    caller = make_user()
    codes = [start_call(api, caller, [make_user()]).status_code for _ in range(31)]
    assert codes[:30] == [201] * 30
    resp = start_call(api, caller, [make_user()])
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "rate_limited"


# ---- accept / decline / cancel ------------------------------------------------------------------

def test_callee_accepts_or_declines_caller_cancels(api, db, make_user):
    alice, bob, cy = make_user(), make_user(), make_user()
    invs = start_call(api, alice, [bob, cy]).json()["invitations"]
    to_bob, to_cy = invs[0]["id"], invs[1]["id"]
    stranger = make_user()
    resp = api.post(f"/api/calls/{to_bob}/accept", headers=bearer(stranger))
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden"
    resp = api.post(f"/api/calls/{to_bob}/accept", headers=bearer(alice))  # the caller cannot answer
    assert resp.status_code == 403
    resp = api.post(f"/api/calls/{to_bob}/cancel", headers=bearer(bob))  # the callee cannot cancel
    assert resp.status_code == 403
    resp = api.post(f"/api/calls/{to_bob}/accept", headers=bearer(bob))
    assert resp.status_code == 200 and resp.json()["status"] == "accepted" and resp.json()["answered_at"]
    resp = api.post(f"/api/calls/{to_bob}/decline", headers=bearer(bob))  # terminal: no more moves
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "conflict"
    resp = api.post(f"/api/calls/{to_cy}/cancel", headers=bearer(alice))
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    assert invitation(db, to_cy)["end_reason"] == "caller_cancelled"
    assert api.post(f"/api/calls/{uuid.uuid4()}/accept", headers=bearer(bob)).status_code == 404
    assert api.post(f"/api/calls/{to_bob}/hold", headers=bearer(bob)).status_code == 404
    assert api.post("/api/calls/not-a-uuid/accept", headers=bearer(bob)).status_code == 422


def test_history_lists_the_users_calls_with_their_invitations(api, db, make_user):
    alice, bob, eve = make_user(), make_user(), make_user()
    inv = start_call(api, alice, [bob]).json()["invitations"][0]
    call = db.execute("insert into calls (room_name, caller_id, status) values (%s, %s, 'completed') returning id",
                      (inv["room_name"], alice)).fetchone()
    db.execute("update call_invitations set call_id = %s where id = %s", (call["id"], inv["id"]))
    for user in (alice, bob):
        calls = api.get("/api/calls", headers=bearer(user)).json()["calls"]
        assert [c["id"] for c in calls] == [str(call["id"])]
        assert [i["id"] for i in calls[0]["invitations"]] == [inv["id"]]
    assert api.get("/api/calls", headers=bearer(eve)).json()["calls"] == []
    assert api.get("/api/calls?limit=101", headers=bearer(eve)).status_code == 422


# ---- the event stream ---------------------------------------------------------------------------

class EventStream:
    """A client of `GET /api/calls/events` on its own thread; events land in `.events`."""

    def __init__(self, base: str, user_id: str, headers: dict | None = None) -> None:
        self.events: queue.Queue = queue.Queue()
        self.response_headers: dict = {}
        self.opened = threading.Event()
        self._stop = False
        url = f"{base}/api/calls/events?access_token={token_for(user_id)}"
        self._thread = threading.Thread(target=self._run, args=(url, headers or {}), daemon=True)
        self._thread.start()
        assert self.opened.wait(10), "stream did not open"

    def _run(self, url, headers) -> None:
        with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(10, read=None)) as resp:
            self.status = resp.status_code
            self.response_headers = dict(resp.headers)
            self.opened.set()
            event = None
            for line in resp.iter_lines():
                if self._stop:
                    return
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    self.events.put((event, json.loads(line[6:]), time.monotonic()))

    def next(self, kind: str, match=lambda row: True, timeout: float = 5.0) -> tuple[dict, float]:
        deadline = time.monotonic() + timeout
        while True:
            event, row, at = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if event == kind and match(row):
                return row, at

    def close(self) -> None:
        self._stop = True


def test_stream_sends_a_snapshot_then_changes_then_calls(api, db, web, make_user):
    alice, bob = make_user(), make_user()
    first = start_call(api, alice, [bob]).json()["invitations"][0]
    # Its call is made by hand below: not rung meanwhile by a running beat's catch-up.
    hold_back_from_catch_up(first["id"], "pending")
    stream = EventStream(web, bob, headers={"Origin": "http://localhost:3000"})
    try:
        assert stream.status == 200 and stream.response_headers["content-type"].startswith("text/event-stream")
        assert stream.response_headers["access-control-allow-origin"] == "http://localhost:3000"
        row, _ = stream.next("invitation", lambda r: r["id"] == first["id"])  # the snapshot
        sent = time.monotonic()
        second = start_call(api, alice, [bob]).json()["invitations"][0]
        row, at = stream.next("invitation", lambda r: r["id"] == second["id"])
        assert row["caller_id"] == alice and at - sent < 1.0
        api.post(f"/api/calls/{second['id']}/decline", headers=bearer(bob))
        row, _ = stream.next("invitation", lambda r: r["id"] == second["id"] and r["status"] == "declined")
        assert row["end_reason"] == "declined"
        call = db.execute("insert into calls (room_name, caller_id, status) values (%s, %s, 'ringing') returning id",
                          (first["room_name"], alice)).fetchone()
        db.execute("update call_invitations set call_id = %s where id = %s", (call["id"], first["id"]))
        db.execute("update calls set status = 'active', started_at = now() where id = %s", (call["id"],))
        row, _ = stream.next("call", lambda r: r["id"] == str(call["id"]) and r["status"] == "active")
    finally:
        stream.close()


def test_streams_share_one_listen_connection_and_see_only_their_rows(api, db, web, make_user):
    alice, bob, eve = make_user(), make_user(), make_user()
    streams = [EventStream(web, eve) for _ in range(10)] + [EventStream(web, bob)]
    try:
        inv = start_call(api, alice, [bob]).json()["invitations"][0]
        streams[-1].next("invitation", lambda r: r["id"] == inv["id"])
        listening = db.execute("select count(*) n from pg_stat_activity where datname = current_database()"
                               " and application_name = %s", (HUB_APPLICATION_NAME,)).fetchone()["n"]
        assert listening == 1
        for s in streams[:-1]:
            with pytest.raises(queue.Empty):
                s.next("invitation", timeout=0.2)
    finally:
        for s in streams:
            s.close()


def test_a_burst_of_changes_reaches_each_party_once_per_change_each_row_in_order(api, db, web, make_user):
    """Sixty invitations made and cancelled at once (the hub reads them in batches): the callee's
    stream gets two events for each (its insert, its cancel), the last one `cancelled`; a caller's
    stream gets its own invitation's alone."""
    alice = make_user()
    callers = [make_user() for _ in range(60)]
    stream = EventStream(web, alice)
    theirs = EventStream(web, callers[0])
    try:
        ids = [str(db.execute(
            "insert into call_invitations (room_name, caller_id, callee_id) values (%s, %s, %s) returning id",
            (f"burst-{uuid.uuid4().hex[:8]}", caller, alice)).fetchone()["id"]) for caller in callers]
        db.execute("update call_invitations set status = 'cancelled', end_reason = 'caller_cancelled'"
                   " where id = any(%s::uuid[])", (ids,))
        seen: dict[str, list[str]] = {i: [] for i in ids}
        deadline = time.monotonic() + 10
        while sum(map(len, seen.values())) < 2 * len(ids) and time.monotonic() < deadline:
            row, _ = stream.next("invitation", lambda r: r["id"] in seen, timeout=max(0.01, deadline - time.monotonic()))
            seen[row["id"]].append(row["status"])
        assert all(len(statuses) == 2 and statuses[-1] == "cancelled" for statuses in seen.values()), seen
        with pytest.raises(queue.Empty):  # nothing more
            stream.next("invitation", lambda r: r["id"] in seen, timeout=0.5)
        got: list[str] = []
        while True:
            try:
                got.append(theirs.next("invitation", timeout=0.5)[0]["id"])
            except queue.Empty:
                break
        assert got == [ids[0], ids[0]]
    finally:
        stream.close()
        theirs.close()


def test_stream_needs_a_valid_token(api):
    resp = api.get("/api/calls/events")
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
    resp = api.get("/api/calls/events?access_token=bogus.token.here")
    assert resp.status_code == 401 and "bogus" not in resp.text


# ---- CORS and the dev routes --------------------------------------------------------------------

def test_cors_preflight_for_configured_origins_only(api):
    for path in ("/api/calls", "/api/calls/events", f"/api/calls/{uuid.uuid4()}/accept", "/api/dev/users"):
        pre = api.options(path, headers={"Origin": "http://127.0.0.1:3000", "Access-Control-Request-Method": "POST",
                                         "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == "http://127.0.0.1:3000"
        assert "authorization" in pre.headers["access-control-allow-headers"].lower()
        evil = api.options(path, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in evil.headers
    resp = api.post("/api/calls", headers={"Origin": "http://localhost:3000"}, json={})
    assert resp.status_code == 401 and resp.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_dev_session_gives_a_working_token(api, make_user):
    alice = make_user("Alice A", email=f"alice-{uuid.uuid4().hex[:6]}@example.test")
    users = api.get("/api/dev/users").json()["users"]
    assert any(u["id"] == alice and u["name"] == "Alice A" for u in users)
    token = api.post("/api/dev/session", json={"user_id": alice}).json()["access_token"]
    assert api.get("/api/calls", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert api.post("/api/dev/session", json={"user_id": str(uuid.uuid4())}).status_code == 404
    assert api.post("/api/dev/session", json={"user_id": "x"}).status_code == 422


def test_openapi_describes_the_api_routes(api):
    paths = api.get("/openapi.json").json()["paths"]
    for path in ("/api/calls", "/api/calls/{invitation_id}/{action}", "/api/calls/events", "/api/livekit/token"):
        assert path in paths


def test_streams_end_when_the_listen_connection_is_cut_and_a_reconnect_gets_what_was_missed(api, db, web, make_user):
    """The contract: when the database drops the hub's connection, open streams close so their
    clients reconnect (EventSource does by itself), and the new stream's snapshot has what changed."""
    alice, bob = make_user(), make_user()
    stream = EventStream(web, bob)
    try:
        first = start_call(api, alice, [bob]).json()["invitations"][0]
        stream.next("invitation", lambda r: r["id"] == first["id"])
        cut = db.execute("select pg_terminate_backend(pid) from pg_stat_activity where datname = current_database()"
                         " and application_name = %s", (HUB_APPLICATION_NAME,)).fetchall()
        assert len(cut) == 1
        stream._thread.join(10)
        assert not stream._thread.is_alive(), "the stream stayed open after the hub lost its connection"
        second = start_call(api, alice, [bob]).json()["invitations"][0]
    finally:
        stream.close()
    again = EventStream(web, bob)
    try:
        again.next("invitation", lambda r: r["id"] == second["id"], timeout=10)
    finally:
        again.close()


def test_web_stops_promptly_with_streams_open(log_dir, make_user):
    """uvicorn waits for open responses on shutdown: the streams must end, or Ctrl-C hangs."""
    import signal

    from tests.conftest import subprocess_env
    from devstack import services

    port = services.free_port()
    proc = services.web_server(subprocess_env(), log_dir, port)
    base = f"http://127.0.0.1:{port}"
    try:
        services.wait_for(lambda: httpx.get(f"{base}/healthz", timeout=1).status_code == 200, timeout=30,
                          what="web up")
        streams = [EventStream(base, make_user()) for _ in range(3)]
        proc.kill(signal.SIGTERM)
        started = time.monotonic()
        proc.proc.wait(10)
        assert time.monotonic() - started < 3
        for s in streams:
            s.close()
    finally:
        proc.stop()


def test_production_has_no_dev_routes_no_demo_and_no_default_origins(log_dir, make_user):
    from tests.conftest import subprocess_env
    from devstack import services

    port = services.free_port()
    env = subprocess_env(CALLFLOW_ENV="production", CALLFLOW_LISTENER_SOURCE="postgres",
                         SUPABASE_JWT_SECRET="prod-jwt-secret-with-at-least-32-characters-xyz",
                         RESEND_API_KEY="re_test_not_used", CALLFLOW_EMAIL_FROM="Calls <calls@example.com>",
                         FLOWER_BASIC_AUTH="ops:pass")
    proc = services.web_server(env, log_dir, port)
    base = f"http://127.0.0.1:{port}"
    try:
        services.wait_for(lambda: httpx.get(f"{base}/healthz", timeout=1).status_code == 200 or not proc.alive(),
                          timeout=30, what="production web up")
        assert proc.alive(), proc.log()[-2000:]
        for method, path in (("GET", "/api/dev/users"), ("POST", "/api/dev/session"), ("GET", "/demo"),
                             ("GET", "/demo/demo.js")):
            resp = httpx.request(method, f"{base}{path}", json={"user_id": make_user()})
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found", (path, resp.text)
        pre = httpx.options(f"{base}/api/calls", headers={"Origin": "http://localhost:3000",
                                                          "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers
    finally:
        proc.stop()


# ---- development defaults only against a local Supabase, for loopback clients ----------------------

REAL_PROJECT = "https://abc.supabase.co"


def _start_web(env: dict[str, str], log_dir, host: str = "127.0.0.1"):
    """A web process of its own (uvicorn as the Procfile runs it), bound on `host`."""
    from devstack import services

    port = services.free_port()
    argv = [str(services.VENV_BIN / "uvicorn"), "workers.web.app:app", "--host", host, "--port", str(port),
            "--log-level", "warning"]
    proc = services.Process("web", argv, {**env, "PORT": str(port)}, log_dir).start()
    base = f"http://{host}:{port}"
    try:
        services.wait_for(lambda: httpx.get(f"{base}/healthz", timeout=1).status_code == 200 or not proc.alive(),
                          timeout=30, what="web up")
        assert proc.alive(), proc.log()[-2000:]
    except BaseException:
        proc.stop()
        raise
    return proc, base


def test_a_real_supabase_url_refuses_dev_secret_tokens_and_dev_routes(api, log_dir, make_user):
    """CALLFLOW_ENV forgotten and SUPABASE_URL a real project: a token anyone can sign with the
    Supabase CLI's published secret is refused on every signed-in route, and /api/dev/* are gone."""
    import jwt as pyjwt

    from config.settings import DEV_SUPABASE_JWT_SECRET
    from tests.conftest import subprocess_env
    from devstack.standins.jwks_server import supabase_claims

    alice = make_user()
    forged = pyjwt.encode(supabase_claims(alice, f"{REAL_PROJECT}/auth/v1"), DEV_SUPABASE_JWT_SECRET,
                          algorithm="HS256", headers={"typ": "JWT"})
    forged_auth = {"Authorization": f"Bearer {forged}"}
    # Where the development defaults apply (the run's web: no SUPABASE_URL), the same token works.
    assert api.get("/api/calls", headers=forged_auth).status_code == 200

    env = subprocess_env(SUPABASE_URL=REAL_PROJECT, SUPABASE_SERVICE_ROLE_KEY="service-role-key-not-used-" + "k" * 20)
    for name in ("CALLFLOW_ENV", "SUPABASE_JWT_SECRET"):
        env.pop(name, None)
    proc, base = _start_web(env, log_dir)
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            resp = client.post("/api/livekit/token", headers=forged_auth, json={"room_name": "any-room"})
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized", resp.text
            resp = client.get("/api/calls", headers=forged_auth)
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized", resp.text
            assert client.post("/api/calls", headers=forged_auth, json={"callee_ids": [make_user()]}).status_code == 401
            assert client.get("/api/calls/events", params={"access_token": forged}).status_code == 401
            for method, path in (("GET", "/api/dev/users"), ("POST", "/api/dev/session")):
                resp = client.request(method, path, json={"user_id": alice})
                assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found", (path, resp.text)
            config = client.get("/demo/config.json")
            if config.status_code == 200:  # (503 when the demo bundle is not built)
                assert config.json()["development"] is False
        assert forged not in proc.log()
    finally:
        proc.stop()


def _non_loopback_address() -> str | None:
    """An address of this machine's own that is not loopback (the one its default route uses)."""
    import ipaddress
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.123", 9))  # UDP: picks a route and a source address, sends nothing
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if ipaddress.ip_address(address).is_loopback else address


def test_dev_routes_answer_only_loopback_clients(api, log_dir, make_user):
    """web bound on an address of the machine that is not loopback: a request to it comes from
    that address, so it is not a loopback client and gets the same 404 as a missing route."""
    from tests.conftest import subprocess_env

    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address (tests/unit/test_dev_routes.py covers the rule)")
    alice = make_user()
    assert api.post("/api/dev/session", json={"user_id": alice}).status_code == 200  # loopback: answered
    proc, base = _start_web(subprocess_env(), log_dir, host=address)
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            for method, path in (("GET", "/api/dev/users"), ("POST", "/api/dev/session")):
                resp = client.request(method, path, json={"user_id": alice})
                assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found", (path, resp.text)
            config = client.get("/demo/config.json")
            if config.status_code == 200:
                assert config.json()["development"] is False  # the page shows no development sign-in
    finally:
        proc.stop()
