"""`POST /api/livekit/token` over HTTP against the real web process, Postgres and Redis.

The web process runs with SUPABASE_URL pointing at the JWKS stand-in (real ES256/RS256 keys) and
a legacy SUPABASE_JWT_SECRET, so both kinds of Supabase tokens are exercised end to end.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid

import httpx
import jwt
import pytest
from livekit.api import TokenVerifier

from devstack import services
from devstack.standins.jwks_server import JWKSServer, supabase_claims
from tests.conftest import subprocess_env

LEGACY_SECRET = "legacy-secret-legacy-secret-legacy-secret-0002"
LK_KEY, LK_SECRET = "devkey", "devsecret-devsecret-devsecret-0001"
PUBLIC_URL = "wss://livekit.public.example"
TTL = 300


@pytest.fixture(scope="module")
def auth():
    with JWKSServer() as server:
        server.es = server.add_key("ES256")
        server.rs = server.add_key("RS256")
        yield server


def start_web(log_dir, auth: JWKSServer, **env) -> tuple[services.Process, str]:
    port = services.free_port()
    settings = {"SUPABASE_URL": auth.url, "SUPABASE_JWT_SECRET": LEGACY_SECRET, "LIVEKIT_PUBLIC_URL": PUBLIC_URL,
                "CALLFLOW_TOKEN_TTL_SECONDS": str(TTL), **env}
    proc = services.web_server(subprocess_env(**settings), log_dir, port)
    base = f"http://127.0.0.1:{port}"
    try:
        services.wait_for(lambda: httpx.get(f"{base}/openapi.json", timeout=1).status_code == 200 or not proc.alive(),
                          timeout=30, what="web /openapi.json")
    except TimeoutError:
        proc.stop()
        raise
    if not proc.alive():
        raise RuntimeError(f"web died:\n{proc.log()[-4000:]}")
    return proc, base


@pytest.fixture(scope="module")
def api(log_dir, auth):
    proc, base = start_web(log_dir, auth, CALLFLOW_TOKEN_RATE_PER_MINUTE="10000")
    with httpx.Client(base_url=base, timeout=10) as client:
        client.proc = proc
        yield client
    proc.stop()


# ---- helpers --------------------------------------------------------------------------------------

def invite(db, caller: str, callee: str, *, room: str | None = None, call_type: str = "video",
           status: str = "ringing", call_status: str | None = None) -> dict:
    """An invitation as the product and the lifecycle would leave it (service connection)."""
    room = room or f"room-{uuid.uuid4().hex[:10]}"
    row = db.execute(
        "insert into public.call_invitations (room_name, caller_id, callee_id, call_type) values (%s, %s, %s, %s)"
        " returning id", (room, caller, callee, call_type)).fetchone()
    inv = str(row["id"])
    if call_status is not None:
        call = db.execute("insert into public.calls (room_name, call_type, caller_id, status) values (%s, %s, %s, %s)"
                          " returning id", (room, call_type, caller, call_status)).fetchone()
        db.execute("update public.call_invitations set call_id = %s where id = %s", (call["id"], inv))
    if status in ("ringing", "missed"):
        db.execute("update public.call_invitations set status = 'ringing', ringing_at = now() where id = %s", (inv,))
    if status not in ("pending", "ringing"):
        db.execute("update public.call_invitations set status = %s where id = %s", (status, inv))
    return {"id": inv, "room": room}


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def es_token(auth, user_id: str, **claims) -> str:
    return auth.sign(user_id, kid=auth.es.kid, **claims)


def ask(api, token: str, body) -> httpx.Response:
    return api.post("/api/livekit/token", headers=bearer(token), content=json.dumps(body),
                    )


def assert_error(resp: httpx.Response, status: int, code: str, field: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["cache-control"] == "no-store"
    error = resp.json()["error"]
    assert error["code"] == code and isinstance(error["message"], str) and error["message"]
    if field is None:
        assert "field" not in error
    else:
        assert error["field"] == field
    return error


def lk_claims(token: str):
    return TokenVerifier(LK_KEY, LK_SECRET).verify(token)


# ---- 401 ----------------------------------------------------------------------------------------

def test_no_or_wrong_authorization_is_401(api):
    for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"},
                    {"Authorization": "Token abc"}, {"Authorization": "bearer not.a.jwt"}):
        resp = api.post("/api/livekit/token", headers=headers, json={"room_name": "x"})
        assert_error(resp, 401, "unauthorized")
        assert resp.headers["www-authenticate"].startswith("Bearer")


def test_bad_tokens_are_401_and_never_echoed(api, auth, make_user):
    user = make_user()
    now = int(time.time())
    bad = [
        es_token(auth, user, exp=now - 10, iat=now - 100),
        es_token(auth, user, aud="anon"),
        es_token(auth, user, iss="https://other.supabase.co/auth/v1"),
        jwt.encode(supabase_claims(user, auth.issuer), "wrong-secret-wrong-secret-wrong-secret", algorithm="HS256"),
        jwt.encode(supabase_claims(user, auth.issuer), auth.es.private_key, algorithm="ES256", headers={"kid": "nope"}),
    ]
    for token in bad:
        resp = ask(api, token, {"room_name": "x"})
        assert_error(resp, 401, "unauthorized")
        assert token not in resp.text and token.split(".")[2] not in resp.text
    assert LEGACY_SECRET not in api.proc.log()


def test_bad_token_wins_over_bad_body(api):
    resp = api.post("/api/livekit/token", headers=bearer("garbage"), content=b"{not json")
    assert_error(resp, 401, "unauthorized")


# ---- 404 / 403 ----------------------------------------------------------------------------------

def test_unknown_room_and_invitation_are_404(api, auth, make_user):
    token = es_token(auth, make_user())
    assert_error(ask(api, token, {"room_name": f"nowhere-{uuid.uuid4().hex}"}), 404, "not_found")
    assert_error(ask(api, token, {"invitation_id": str(uuid.uuid4())}), 404, "not_found")


def test_stranger_gets_403_for_someone_elses_room(api, auth, db, make_user):
    caller, callee, stranger = make_user(), make_user(), make_user()
    inv = invite(db, caller, callee)
    token = es_token(auth, stranger)
    assert_error(ask(api, token, {"room_name": inv["room"]}), 403, "forbidden")
    assert_error(ask(api, token, {"invitation_id": inv["id"]}), 403, "forbidden")


@pytest.mark.parametrize("status,call_status", [
    ("declined", None), ("cancelled", None), ("missed", "ringing"), ("accepted", "completed"),
    ("busy", None), ("failed", None),
])
def test_no_token_once_the_invitation_is_over(api, auth, db, make_user, status, call_status):
    caller, callee = make_user(), make_user()
    inv = invite(db, caller, callee, status=status, call_status=call_status)
    # The caller of a call still live is one of its room's parties (the contract's definition).
    users = (callee,) if call_status in ("ringing", "active") else (caller, callee)
    for user in users:
        for body in ({"room_name": inv["room"]}, {"invitation_id": inv["id"]}):
            assert_error(ask(api, es_token(auth, user), body), 403, "forbidden")


def test_the_caller_of_a_live_call_gets_a_token_the_missed_callee_does_not(api, auth, db, make_user):
    caller, callee = make_user(), make_user()
    inv = invite(db, caller, callee, status="missed", call_status="ringing")
    assert ask(api, es_token(auth, caller), {"room_name": inv["room"]}).status_code == 200
    assert_error(ask(api, es_token(auth, callee), {"room_name": inv["room"]}), 403, "forbidden")


# ---- 200 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("status,call_status", [
    ("pending", None), ("ringing", None), ("ringing", "ringing"), ("accepted", "ringing"), ("accepted", "active"),
    ("accepted", None),  # answered before the worker linked it to a call
])
def test_caller_and_callee_of_a_live_invitation_get_a_token(api, auth, db, make_user, status, call_status):
    caller, callee = make_user("Grace Hopper"), make_user(name=None, email=None)
    db.execute("update auth.users set raw_user_meta_data = '{\"name\": \"Alan\"}' where id = %s", (callee,))
    inv = invite(db, caller, callee, status=status, call_status=call_status)
    for user, name, body in ((caller, "Grace Hopper", {"room_name": inv["room"]}),
                             (callee, "Alan", {"invitation_id": inv["id"]})):
        before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        resp = ask(api, es_token(auth, user), body)
        assert resp.status_code == 200, resp.text
        assert resp.headers["cache-control"] == "no-store"
        data = resp.json()
        assert set(data) == {"token", "server_url", "identity", "expires_at"}
        assert data["server_url"] == PUBLIC_URL and data["identity"] == user
        expires = dt.datetime.fromisoformat(data["expires_at"].replace("Z", "+00:00"))
        assert expires.tzinfo is not None and expires.utcoffset() == dt.timedelta(0)
        assert before + dt.timedelta(seconds=TTL - 2) <= expires <= before + dt.timedelta(seconds=TTL + 2)
        assert lk_claims(data["token"]).video.room == inv["room"]  # LiveKit's own verifier accepts it
        raw = jwt.decode(data["token"], LK_SECRET, algorithms=["HS256"], issuer=LK_KEY)
        assert raw["sub"] == user and raw["name"] == name and raw["exp"] == int(expires.timestamp())
        video = raw["video"]
        assert video["roomJoin"] is True and video["room"] == inv["room"]
        for admin in ("roomAdmin", "roomCreate", "roomList", "roomRecord", "ingressAdmin", "canUpdateOwnMetadata"):
            assert not video.get(admin)
        assert set(video["canPublishSources"]) == {"camera", "microphone", "screen_share", "screen_share_audio"}


def test_audio_call_token_may_publish_the_microphone_only(api, auth, db, make_user):
    caller, callee = make_user(), make_user()
    inv = invite(db, caller, callee, call_type="audio")
    for user in (caller, callee):
        resp = ask(api, es_token(auth, user), {"invitation_id": inv["id"]})
        assert resp.status_code == 200, resp.text
        video = jwt.decode(resp.json()["token"], options={"verify_signature": False})["video"]
        assert video["canPublishSources"] == ["microphone"]


def test_group_call_each_callee_and_the_caller(api, auth, db, make_user):
    caller, a, b, stranger = make_user(), make_user(), make_user(), make_user()
    room = f"group-{uuid.uuid4().hex[:8]}"
    ia = invite(db, caller, a, room=room, status="declined")
    invite(db, caller, b, room=room, status="ringing")
    assert ask(api, es_token(auth, caller), {"room_name": room}).status_code == 200
    # the caller's declined invitation to a still leads to the room, where b is still ringing
    assert ask(api, es_token(auth, caller), {"invitation_id": ia["id"]}).status_code == 200
    assert ask(api, es_token(auth, b), {"room_name": room}).status_code == 200
    assert_error(ask(api, es_token(auth, a), {"room_name": room}), 403, "forbidden")
    assert_error(ask(api, es_token(auth, stranger), {"invitation_id": ia["id"]}), 403, "forbidden")


def test_rs256_and_legacy_hs256_tokens_work(api, auth, db, make_user):
    caller, callee = make_user(), make_user()
    inv = invite(db, caller, callee)
    rs = auth.sign(caller, kid=auth.rs.kid)
    hs = jwt.encode(supabase_claims(callee, auth.issuer), LEGACY_SECRET, algorithm="HS256")
    assert ask(api, rs, {"room_name": inv["room"]}).status_code == 200
    assert ask(api, hs, {"room_name": inv["room"]}).status_code == 200


def test_rotated_key_is_accepted_at_once(api, auth, db, make_user):
    caller, callee = make_user(), make_user()
    inv = invite(db, caller, callee)
    assert ask(api, es_token(auth, caller), {"room_name": inv["room"]}).status_code == 200
    new = auth.add_key("ES256")
    try:
        token = auth.sign(caller, kid=new.kid)
        started = time.monotonic()
        assert ask(api, token, {"room_name": inv["room"]}).status_code == 200
        assert time.monotonic() - started < 3
    finally:
        auth.revoke(new.kid)


# ---- 422 / 413 ----------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,field", [
    (b"", "body"),
    (b"{not json", "body"),
    (b"\xff\xfe", "body"),
    (b"[]", "body"),
    (b'"room"', "body"),
    (b"null", "body"),
    (b"{}", "room_name"),
    (b'{"room_name": null, "invitation_id": null}', "room_name"),
    (b'{"room": "x"}', "room_name"),
    (b'{"room_name": 5}', "room_name"),
    (b'{"room_name": ["a"]}', "room_name"),
    (b'{"room_name": ""}', "room_name"),
    (b'{"room_name": "   "}', "room_name"),
    (b'{"room_name": "a\\u0000b"}', "room_name"),
    (b'{"room_name": "\\ud800"}', "room_name"),
    (json.dumps({"room_name": "r" * 257}).encode(), "room_name"),
    (b'{"invitation_id": "nope"}', "invitation_id"),
    (b'{"invitation_id": 12}', "invitation_id"),
    (b'{"invitation_id": "\\u0000"}', "invitation_id"),
    (b'{"room_name": "r", "invitation_id": "7d1e8a52-2c1f-4a4e-9a55-0b6f3f3c2b11"}', "invitation_id"),
])
def test_malformed_body_is_422_naming_the_field(api, auth, make_user, raw, field):
    resp = api.post("/api/livekit/token", headers={**bearer(es_token(auth, make_user())),
                                                    "Content-Type": "application/json"}, content=raw)
    assert_error(resp, 422, "invalid_request", field=field)


def test_oversized_body_is_413(api, auth, make_user):
    resp = ask(api, es_token(auth, make_user()), {"room_name": "r", "padding": "x" * 20000})
    assert_error(resp, 413, "payload_too_large")


def test_other_methods_are_not_allowed(api):
    assert api.get("/api/livekit/token").status_code == 405


# ---- 429 ----------------------------------------------------------------------------------------

def test_rate_limit_per_user_with_retry_after(log_dir, auth, make_user):
    proc, base = start_web(log_dir, auth, CALLFLOW_TOKEN_RATE_PER_MINUTE="3")
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            limited, other = make_user(), make_user()
            token = es_token(auth, limited)
            for _ in range(3):
                assert ask(client, token, {"room_name": "nowhere"}).status_code == 404
            resp = ask(client, token, {"room_name": "nowhere"})
            assert_error(resp, 429, "rate_limited")
            assert 1 <= int(resp.headers["retry-after"]) <= 60
            assert token not in resp.text
            # someone else is not affected, and bad tokens are not counted against anyone
            assert ask(client, es_token(auth, other), {"room_name": "nowhere"}).status_code == 404
    finally:
        proc.stop()


# ---- OpenAPI ------------------------------------------------------------------------------------

def test_openapi_describes_the_route_and_every_answer(api):
    doc = api.get("/openapi.json").json()
    op = doc["paths"]["/api/livekit/token"]["post"]
    assert set(op["responses"]) >= {"200", "401", "403", "404", "422", "429"}
    assert op["requestBody"]["required"] is True
    schema = doc["components"]["schemas"]["TokenRequest"]
    assert set(schema["properties"]) == {"room_name", "invitation_id"}
    assert doc["components"]["securitySchemes"]["supabaseAccessToken"]["scheme"] == "bearer"


# ---- CORS (browsers on the product's web app, CALLFLOW_APP_URL) --------------------------------

def test_cors_for_the_app_origin_only(api, auth, make_user):
    app_origin = "http://localhost:3000"  # CALLFLOW_APP_URL's development default
    pre = api.options("/api/livekit/token", headers={"Origin": app_origin, "Access-Control-Request-Method": "POST",
                                                      "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == app_origin
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    resp = api.post("/api/livekit/token", headers={**bearer(es_token(auth, make_user())), "Origin": app_origin},
                    json={"room_name": "nowhere"})
    assert resp.status_code == 404 and resp.headers["access-control-allow-origin"] == app_origin
    evil = api.options("/api/livekit/token", headers={"Origin": "https://evil.example",
                                                       "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in evil.headers


# ---- `callflow dev-token` -----------------------------------------------------------------------

def _callflow(*args: str, **env: str):
    import subprocess

    return subprocess.run([str(services.VENV_BIN / "callflow"), *args], env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=60, cwd=services.ROOT)


def test_dev_token_gets_a_join_token(api, auth, db, make_user):
    caller, callee = make_user("Dev Caller"), make_user()
    inv = invite(db, caller, callee, status="pending")
    out = _callflow("dev-token", "--user", caller, SUPABASE_URL=auth.url, SUPABASE_JWT_SECRET=LEGACY_SECRET)
    assert out.returncode == 0, out.stderr
    user_token = out.stdout.strip()
    claims = jwt.decode(user_token, LEGACY_SECRET, algorithms=["HS256"], audience="authenticated", issuer=auth.issuer)
    assert claims["sub"] == caller and claims["role"] == "authenticated"
    assert claims["user_metadata"]["full_name"] == "Dev Caller" and claims["email"].endswith("@example.test")
    resp = ask(api, user_token, {"room_name": inv["room"]})
    assert resp.status_code == 200, resp.text


def test_dev_token_is_refused_in_production(auth):
    out = _callflow(
        "dev-token", "--user", str(uuid.uuid4()), CALLFLOW_ENV="production", REDIS_URL="redis://127.0.0.1:1/0",
        LIVEKIT_URL="wss://lk.example", LIVEKIT_API_KEY="k", LIVEKIT_API_SECRET="s" * 32, RESEND_API_KEY="re_x",
        CALLFLOW_EMAIL_FROM="a@b.example", SUPABASE_URL=auth.url, SUPABASE_SERVICE_ROLE_KEY="srk",
        SUPABASE_JWT_SECRET=LEGACY_SECRET,
    )
    assert out.returncode != 0
    assert "refused in production" in out.stderr
    assert "eyJ" not in out.stdout + out.stderr


# ---- anonymous users ------------------------------------------------------------------------------

def test_an_anonymous_user_gets_no_token(api, auth, db, make_user):
    caller, callee = make_user(), make_user()
    inv = invite(db, caller, callee)
    resp = ask(api, es_token(auth, callee, is_anonymous=True), {"invitation_id": inv["id"]})
    assert "anonymous" in assert_error(resp, 403, "anonymous")["message"]


def test_anonymous_users_get_tokens_when_allowed(log_dir, auth, db, make_user):
    proc, base = start_web(log_dir, auth, CALLFLOW_ALLOW_ANONYMOUS="true")
    try:
        caller, callee = make_user(), make_user()
        inv = invite(db, caller, callee)
        with httpx.Client(base_url=base, timeout=10) as client:
            resp = ask(client, es_token(auth, callee, is_anonymous=True), {"invitation_id": inv["id"]})
        assert resp.status_code == 200, resp.text
    finally:
        proc.stop()
