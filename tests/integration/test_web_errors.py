"""Every error of `web` is the contract's JSON; `/readyz` cannot be turned into a connection flood."""

from __future__ import annotations

import concurrent.futures
import random
import string

import httpx
import psycopg
import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from workers.web.errors import CODES, EXCEPTION_HANDLERS

# Registered HTTP methods only: uvicorn's parser (httptools) itself refuses an unknown token such
# as `FOO` with a plain-text 400 before any application code runs.
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "CONNECT"]
ROUTES = ["/livekit/webhook", "/api/livekit/token", "/api/calls", f"/api/calls/{'0' * 8}-0000-0000-0000-{'0' * 12}/accept",
          "/api/calls/events", "/api/dev/users", "/api/dev/session", "/healthz", "/readyz", "/metrics",
          "/openapi.json", "/demo"]


@pytest.fixture
def api(web):
    with httpx.Client(base_url=web, timeout=10) as client:
        yield client


def assert_contract_error(resp: httpx.Response, status: int | None = None) -> dict:
    assert 400 <= resp.status_code < 500, (resp.request.method, resp.request.url, resp.status_code, resp.text[:200])
    if status is not None:
        assert resp.status_code == status
    if resp.request.method == "HEAD":
        return {}
    error = resp.json()["error"]
    assert error["code"] in CODES and isinstance(error["message"], str)
    assert set(error) <= {"code", "message", "field"} and ("field" in error) == (resp.status_code == 422)
    return error


def test_wrong_method_on_the_webhook_is_json_405(api):
    resp = api.get("/livekit/webhook")
    assert assert_contract_error(resp, 405)["code"] == "method_not_allowed"
    assert resp.headers["allow"] == "POST"
    assert resp.headers["content-type"] == "application/json"


def test_unknown_route_is_json_404(api):
    assert assert_contract_error(api.get("/nope"), 404)["code"] == "not_found"
    assert assert_contract_error(api.post("/api/nope", json={}), 404)["code"] == "not_found"


def test_floods_of_bad_routes_and_methods_are_json_4xx_never_5xx(api):
    rng = random.Random(13)

    def junk_path() -> str:
        parts = ["".join(rng.choices(string.ascii_letters + string.digits + "-._~%", k=rng.randint(1, 12)))
                 for _ in range(rng.randint(1, 4))]
        prefix = rng.choice(["", "api/", "api/calls/", "livekit/", "demo/", "api/dev/"])
        return "/" + prefix + "/".join(parts)

    requests = [(rng.choice(METHODS), junk_path()) for _ in range(300)]
    # every real route with every method it does not take
    requests += [(m, r) for r in ROUTES for m in METHODS]

    def send(method_path):
        method, path = method_path
        return api.request(method, path)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for resp in pool.map(send, requests):
            if resp.status_code < 400:
                continue  # a method the route takes (or a CORS-less OPTIONS)
            if resp.status_code == 503 and resp.request.url.path.startswith("/demo"):
                assert resp.request.method in ("GET", "HEAD")  # the contract's answer while unbuilt
                continue
            assert_contract_error(resp)


def test_unexpected_failures_are_json_500_without_a_trace():
    def boom(_request):
        raise RuntimeError("secret-value-in-an-exception Traceback")

    app = Starlette(routes=[Route("/boom", boom)], exception_handlers=EXCEPTION_HANDLERS)
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.get("/boom")
    assert resp.status_code == 500
    assert resp.json() == {"error": {"code": "internal", "message": "an unexpected error occurred"}}
    assert "secret-value" not in resp.text and "Traceback" not in resp.text


def test_readyz_answers_from_a_cache_of_one_second(api, database_url):
    def sessions() -> int:
        with psycopg.connect(database_url, autocommit=True) as conn:
            return conn.execute("select sessions from pg_stat_database where datname = current_database()").fetchone()[0]

    assert api.get("/readyz").status_code == 200
    before = sessions()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: api.get("/readyz").status_code, range(200)))
    opened = sessions() - before - 1  # our own sessions() connection counts once
    assert set(codes) == {200}
    # 200 requests in well under a few seconds: at most one check a second, not one per request
    assert opened <= 5, opened


def test_metrics_show_the_whole_deployment(web):
    """One scrape of any web process: queues and task outcomes (Redis), pushes and usage (Postgres)."""
    import httpx

    text = httpx.get(f"{web}/metrics", timeout=10).text
    for family in ("callflow_queue_depth", "callflow_queue_oldest_age_seconds", "callflow_pushes",
                   "callflow_deliveries_total", "callflow_usage_plan_concurrency_cap"):
        assert f"# TYPE {family} " in text, family
    assert 'callflow_queue_depth{queue="events"}' in text and 'callflow_queue_depth{queue="push"}' in text


# ---- 500s on the /api/ routes: still the contract's JSON, still readable by the browser -----------

ORIGIN = "http://localhost:3000"  # in CALLFLOW_CORS_ORIGINS' development default


@pytest.fixture
def unmigrated_web(log_dir):
    """A web process whose database was never migrated (deployed before `callflow migrate`): its
    /api/ routes fail where no handler expects it, a real unexpected failure (500)."""
    import uuid

    from tests.conftest import subprocess_env
    from devstack import services

    name = f"callflow_unmigrated_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(services.ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    url = f"{services.ADMIN_URL.rpartition('/')[0]}/{name}"
    port = services.free_port()
    proc = services.web_server(subprocess_env(DATABASE_URL=url), log_dir, port)
    base = f"http://127.0.0.1:{port}"
    try:
        services.wait_for(lambda: httpx.get(f"{base}/healthz", timeout=1).status_code == 200 or not proc.alive(),
                          timeout=30, what="web /healthz")
        assert proc.alive(), proc.log()[-4000:]
        with httpx.Client(base_url=base, timeout=10) as client:
            client.proc = proc
            yield client
    finally:
        proc.stop()
        services.drop_database(url)


def test_a_500_on_an_api_route_is_the_contracts_json_with_cors(unmigrated_web):
    import uuid

    from config.settings import build_settings
    from orchestration.auth import dev_access_token

    user = str(uuid.uuid4())
    auth = {"Authorization": f"Bearer {dev_access_token(build_settings(), user, ttl_seconds=600)}"}
    requests = [
        lambda: unmigrated_web.get("/api/calls", headers={**auth, "Origin": ORIGIN}),
        lambda: unmigrated_web.post("/api/calls", headers={**auth, "Origin": ORIGIN},
                                    json={"callee_ids": [str(uuid.uuid4())]}),
        lambda: unmigrated_web.get("/api/dev/users", headers={"Origin": ORIGIN}),
    ]
    for request in requests:  # one keep-alive connection: a 500 does not cost the client its connection
        resp = request()
        where = (resp.request.method, resp.request.url.path, resp.status_code, resp.text[:300])
        assert resp.status_code == 500, where
        assert resp.headers["content-type"] == "application/json", where
        assert resp.json() == {"error": {"code": "internal", "message": "an unexpected error occurred"}}, where
        assert resp.headers.get("access-control-allow-origin") == ORIGIN, (where, dict(resp.headers))
        assert "Origin" in resp.headers.get("vary", ""), where
    # Another origin gets the same JSON, and nothing that lets its page read it.
    other = unmigrated_web.get("/api/calls", headers={**auth, "Origin": "https://evil.example"})
    assert other.status_code == 500 and other.json()["error"]["code"] == "internal"
    assert "access-control-allow-origin" not in other.headers
    # The traceback went to the log (once a failure, not again by uvicorn), not to the client.
    log = unmigrated_web.proc.log()
    assert log.count("unexpected error") == 4 and "UndefinedTable" in log
    assert "Exception in ASGI application" not in log


# ---- bodies and parameters Postgres could not store: 422, never 500 -------------------------------

def _bearer(user_id: str) -> dict:
    from config.settings import build_settings
    from orchestration.auth import dev_access_token

    return {"Authorization": f"Bearer {dev_access_token(build_settings(), user_id, ttl_seconds=600)}"}


# Raw JSON texts: a lone surrogate is valid JSON (`\ud800`) but no UTF-8 text, so Postgres cannot
# take it; nor can it take NUL. `{callee}` is replaced by a real user's id.
UNSTORABLE_BODIES = [
    ("/api/calls", r'{"callee_ids": ["{callee}"], "room_name": "room-\ud800"}', "room_name"),
    ("/api/calls", r'{"callee_ids": ["{callee}"], "room_name": "\udfff"}', "room_name"),
    ("/api/calls", r'{"callee_ids": ["{callee}"], "call_type": "video", "extra": {"deep": ["\ud83d"]}}', "extra"),
    ("/api/calls", r'{"callee_ids": ["{callee}"], "\ud800": 1}', "body"),
    ("/api/calls", r'{"callee_ids": ["{callee}"], "room_name": "room\u0000x"}', "room_name"),
    ("/api/dev/session", r'{"user_id": "\ud800"}', "user_id"),
    ("/api/livekit/token", r'{"room_name": "\ud800"}', "room_name"),
]


@pytest.mark.parametrize("path, body, field", UNSTORABLE_BODIES)
def test_text_postgres_cannot_store_is_a_422_naming_the_field(api, make_user, path, body, field):
    caller, callee = make_user(), make_user()
    resp = api.post(path, headers={**_bearer(caller), "Content-Type": "application/json", "Origin": ORIGIN},
                    content=body.replace("{callee}", callee).encode())
    error = assert_contract_error(resp, 422)
    assert error["code"] == "invalid_request" and error["field"] == field, error
    assert resp.headers.get("access-control-allow-origin") == ORIGIN


def test_a_surrogate_pair_is_ordinary_text(api, db, make_user):
    caller, callee = make_user(), make_user()
    body = r'{"callee_ids": ["%s"], "room_name": "room-\ud83d\ude00-%s"}' % (callee, caller[:8])
    resp = api.post("/api/calls", headers={**_bearer(caller), "Content-Type": "application/json"},
                    content=body.encode())
    assert resp.status_code == 201, resp.text
    assert resp.json()["room_name"] == f"room-\U0001F600-{caller[:8]}"


@pytest.mark.parametrize("limit", ["\u00b2", "\u0663", "1" * 5000, "+5", " 5", "5.0", "-1", "0", "101"])
def test_a_history_limit_that_is_not_1_to_100_in_ascii_digits_is_422(api, make_user, limit):
    resp = api.get("/api/calls", params={"limit": limit}, headers=_bearer(make_user()))
    assert assert_contract_error(resp, 422)["field"] == "limit"


@pytest.mark.parametrize("alg", [["HS256"], {"a": 1}, 256, True])
@pytest.mark.parametrize("path", ["/api/calls", "/api/livekit/token"])
def test_a_token_whose_header_names_no_algorithm_string_is_401(api, path, alg):
    import base64
    import json

    def part(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    token = f"{part({'alg': alg, 'typ': 'JWT'})}.{part({'sub': 'x'})}.c2ln"
    resp = api.post(path, headers={"Authorization": f"Bearer {token}", "Origin": ORIGIN}, json={})
    assert assert_contract_error(resp, 401)["code"] == "unauthorized"
    assert token not in resp.text and resp.headers.get("access-control-allow-origin") == ORIGIN
