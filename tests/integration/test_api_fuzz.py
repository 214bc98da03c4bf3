"""Fuzzing every `/api/` route against a real web process and Postgres, as a signed-in browser of
an allowed origin: no 5xx, every error the contract's JSON, CORS headers on every answer.

- a bounded schemathesis run of the OpenAPI document (`/openapi.json`), which must describe every
  `/api/` route: answers as documented (status, content type, body schema, headers);
- hypothesis, for what schemathesis does not send: invalid Unicode, hostile query values and
  access tokens whose header is any JSON.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.settings import build_settings
from devstack import services
from orchestration.auth import dev_access_token
from orchestration.db import connect
from tests.conftest import subprocess_env
from tests.integration.test_token_endpoint import invite
from workers.web.errors import CODES

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
CHECKS = Path(__file__).resolve().parents[1] / "support" / "api_fuzz_checks.py"
ORIGIN = "http://localhost:3000"  # in CALLFLOW_CORS_ORIGINS' development default
EXAMPLE_ROOM = "call-3f2a9c"  # the token route's example room
CHECK_NAMES = ("not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
               "response_headers_conformance,api_cors_headers,contract_error_shape")


def schemathesis_config(caller: str, callees: list[str], invitations: list[str]) -> str:
    """Real ids some of the time (schemathesis dictionaries), so the fuzzing gets past "no such
    user / invitation" to the database's rules and the 2xx answers; the event stream, which never
    ends by itself, is read up to its first event (the caller's live invitation, sent on connect)."""
    def words(values) -> str:
        return json.dumps(list(values))

    return f"""
[dictionaries.users]
values = {words([caller, *callees])}

[dictionaries.callees]
values = {words(callees)}

[dictionaries.invitations]
values = {words(invitations)}

[dictionaries.rooms]
values = {words([EXAMPLE_ROOM])}

[[operations]]
include-operation-id = "startCall"
parameters = {{ "body.callee_ids[*]" = {{ dictionary = "callees", probability = 0.9 }} }}

[[operations]]
include-operation-id = "moveInvitation"
parameters = {{ "path.invitation_id" = {{ dictionary = "invitations", probability = 0.6 }} }}

[[operations]]
include-operation-id = "devSession"
parameters = {{ "body.user_id" = {{ dictionary = "users", probability = 0.6 }} }}

[[operations]]
include-operation-id = "createLiveKitToken"
parameters = {{ "body.room_name" = {{ dictionary = "rooms", probability = 0.3 }}, "body.invitation_id" = {{ dictionary = "invitations", probability = 0.3 }} }}

[[operations]]
include-path = "/api/calls/events"
max-stream-events = 1
request-timeout = 3.0
"""


def api_routes() -> set[tuple[str, str]]:
    """(METHOD, path) of every `/api/` route the web app serves, from the route tables."""
    from workers.web import calls, dev, events, token

    return {(method, route.path) for module in (token, calls, events, dev) for route in module.routes
            if route.path.startswith("/api/") for method in route.methods - {"HEAD", "OPTIONS"}}


@pytest.fixture(scope="module")
def fuzz_stack(log_dir):
    """A web process on a database of its own (the run's worker never sees the fuzzer's calls),
    without the per-minute limits that would stop the fuzzing at its 30th call or token."""
    with services.scratch_database("callflow_fuzz", invite_rate_per_minute=100000) as url:
        port = services.free_port()
        proc = services.web_server(subprocess_env(DATABASE_URL=url, CALLFLOW_TOKEN_RATE_PER_MINUTE="100000"),
                                   log_dir, port)
        base = f"http://127.0.0.1:{port}"
        try:
            services.wait_for(lambda: httpx.get(f"{base}/openapi.json", timeout=1).status_code == 200
                              or not proc.alive(), timeout=30, what="web /openapi.json")
            assert proc.alive(), proc.log()[-4000:]
            with connect(url, autocommit=True) as db:
                yield proc, base, db
        finally:
            proc.stop()


def add_user(db, name: str) -> str:
    uid = str(uuid.uuid4())
    db.execute("insert into auth.users (id, email, raw_user_meta_data) values (%s, %s, %s)",
               (uid, f"{name.lower().replace(' ', '.')}-{uid[:6]}@example.test", json.dumps({"full_name": name})))
    return uid


def test_the_openapi_document_describes_every_api_route(fuzz_stack):
    _, base, _ = fuzz_stack
    paths = httpx.get(f"{base}/openapi.json", timeout=10).json()["paths"]
    documented = {(method.upper(), path) for path, operations in paths.items() for method in operations}
    assert api_routes() <= documented, api_routes() - documented
    assert api_routes() >= {(m, p) for m, p in documented if p.startswith("/api/")}


def test_fuzz_every_api_route_finds_no_server_error_and_answers_as_the_contract_says(fuzz_stack, tmp_path):
    proc, base, db = fuzz_stack
    caller = add_user(db, "Fuzz Caller")
    others = [add_user(db, f"Fuzz Callee {i}") for i in range(12)]
    invitations = [invite(db, caller, others[0], room=EXAMPLE_ROOM)["id"],  # the stream's first event
                   invite(db, others[1], caller)["id"],  # the caller may accept or decline these
                   invite(db, others[2], caller)["id"],
                   invite(db, caller, others[2])["id"]]  # and cancel this one
    token = dev_access_token(build_settings(), caller, ttl_seconds=600)
    (tmp_path / "schemathesis.toml").write_text(schemathesis_config(caller, others, invitations))
    env = subprocess_env(SCHEMATHESIS_HOOKS=str(CHECKS), PYTHONPATH=str(services.ROOT), CALLFLOW_FUZZ_ORIGIN=ORIGIN)
    result = subprocess.run(
        [str(SCHEMATHESIS), "run", f"{base}/openapi.json", "--include-path-regex", "^/api/", "--checks", CHECK_NAMES,
         # One worker: more run as threads that parse source at once (hypothesis describing its
         # lambdas), which CPython 3.11 can fail with "AST constructor recursion depth mismatch"
         # (gh-106905): a failure of the fuzzer, not of the routes.
         "--max-examples", "40", "--seed", str(uuid.uuid4().int % 100000), "--workers", "1",
         "--header", f"Authorization: Bearer {token}", "--header", f"Origin: {ORIGIN}",
         "--generation-database", "none", "--no-color", "--request-timeout", "10",
         "--report", "har", "--report-har-path", str(tmp_path / "run.har")],
        capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env,  # its caches stay out of the repo
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    entries = json.loads((tmp_path / "run.har").read_text())["log"]["entries"]
    statuses = Counter(e["response"]["status"] for e in entries)
    assert not any(status >= 500 for status in statuses), statuses
    # Every route was reached, and past its token: bodies, parameters and the database were fuzzed.
    by_route: dict[tuple[str, str], Counter] = {route: Counter() for route in api_routes()}
    for entry in entries:
        method, path = entry["request"]["method"], re.sub(r"^https?://[^/]+", "", entry["request"]["url"]).split("?")[0]
        for route_method, template in by_route:
            if method == route_method and re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path):
                by_route[(route_method, template)][entry["response"]["status"]] += 1
    for route, seen in by_route.items():
        # (a route without parameters or body has little to vary: GET /api/dev/users)
        assert sum(seen.values()) >= (2 if route == ("GET", "/api/dev/users") else 10), (route, seen)
        assert any(200 <= status < 300 for status in seen), (route, seen)  # some got all the way
    assert "Traceback" not in proc.log(), proc.log()[-4000:]


# ---- what schemathesis does not send ------------------------------------------------------------
# Its strings are valid Unicode and its documented parameters well typed; a client is not bound by
# either. Hypothesis sends, over HTTP, JSON with lone surrogates and NUL anywhere, non-ASCII digits
# and huge numbers as query values, and access tokens whose header is any JSON.

HOSTILE_CHARS = st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr),
                          st.sampled_from(["\x00", "\u00b2", "\u0663", "\ufeff", "\u2028", "9"]))
hostile_text = st.one_of(st.text(HOSTILE_CHARS, max_size=12), st.sampled_from(["1" * 5000, "١٠", "²"]))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | hostile_text | st.uuids().map(str),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3), max_leaves=8)


def _b64(value) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


@st.composite
def hostile_requests(draw, ids: dict):
    """(method, path, params, headers, body bytes) for one /api/ route."""
    headers = {"Origin": ORIGIN, "Authorization": f"Bearer {ids['token']}", "Content-Type": "application/json"}
    kind = draw(st.sampled_from(["body", "body", "limit", "token_header", "stream_token"]))
    if kind == "limit":
        return "GET", "/api/calls", {"limit": draw(hostile_text)}, headers, b""
    if kind == "stream_token":  # never a valid token: no stream is left open
        del headers["Authorization"]
        return "GET", "/api/calls/events", {"access_token": draw(hostile_text)}, headers, b""
    if kind == "token_header":
        header = draw(st.dictionaries(st.sampled_from(["alg", "typ", "kid", "crit"]) | hostile_text, json_values,
                                      max_size=4))
        token = f"{_b64(header)}.{_b64(draw(json_values))}.c2ln"
        path = draw(st.sampled_from(["/api/calls", "/api/livekit/token", "/api/calls/events"]))
        return ("GET" if path.endswith("events") else "POST"), path, {}, {**headers, "Authorization": f"Bearer {token}"}, b"{}"
    real = st.sampled_from(ids["callees"])
    field_values = {
        "callee_ids": st.lists(real | st.uuids().map(str) | hostile_text, min_size=1, max_size=3) | json_values,
        "call_type": st.sampled_from(["audio", "video"]) | json_values,
        "room_name": hostile_text | json_values,
        "user_id": real | hostile_text | json_values,
        "invitation_id": st.sampled_from(ids["invitations"]) | hostile_text | json_values,
    }
    body = draw(st.fixed_dictionaries({}, optional=field_values) | st.dictionaries(hostile_text, json_values, max_size=3)
                | json_values)
    path = draw(st.sampled_from(["/api/calls", "/api/calls", "/api/dev/session", "/api/livekit/token",
                                 f"/api/calls/{ids['invitations'][0]}/cancel"]))
    return "POST", path, {}, headers, json.dumps(body).encode()  # ASCII: a surrogate goes as its \\u escape


def test_hostile_text_parameters_and_tokens_are_4xx_never_5xx(fuzz_stack):
    proc, base, db = fuzz_stack
    caller = add_user(db, "Hostile Caller")
    callees = [add_user(db, f"Hostile Callee {i}") for i in range(3)]
    ids = {"token": dev_access_token(build_settings(), caller, ttl_seconds=600), "callees": callees,
           "invitations": [invite(db, caller, callees[0])["id"]]}
    seen: Counter = Counter()
    with httpx.Client(base_url=base, timeout=10) as client:
        @settings(max_examples=300, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(hostile_requests(ids))
        def send(request) -> None:
            method, path, params, headers, body = request
            # Query values as bytes: a surrogate goes as the (invalid) UTF-8 a careless client would send.
            query = "&".join(f"{k}={quote(v.encode('utf-8', 'surrogatepass'), safe='')}" for k, v in params.items())
            resp = client.request(method, f"{path}?{query}" if query else path, headers=headers, content=body or None)
            seen[resp.status_code] += 1
            where = (method, path, params, body[:300], resp.status_code, resp.text[:300])
            assert resp.status_code < 500, where
            assert resp.headers.get("access-control-allow-origin") == ORIGIN, where
            if resp.status_code >= 400:
                error = resp.json()["error"]
                assert error["code"] in CODES and isinstance(error["message"], str), where
                assert set(error) <= {"code", "message", "field"} and ("field" in error) == (resp.status_code == 422)

        send()
    assert seen[422] and seen[401] and (seen[200] or seen[201]), seen
    assert "Traceback" not in proc.log(), proc.log()[-4000:]
