"""`/api/dev/*` answer loopback clients only (the contract), whatever a forwarding header claims.

The routes run in-process under Starlette's TestClient, which sets the client address of each
request (`client=`), as uvicorn does from the socket. A malformed body (`user_id: "x"`) is
answered 422 by a route that let the request in, before any database work; a refused request
gets the same 404 as a missing route.
"""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from workers.web import dev
from workers.web.errors import EXCEPTION_HANDLERS

APP = Starlette(routes=dev.routes, exception_handlers=EXCEPTION_HANDLERS)


def session(host: str, headers: dict | None = None):
    with TestClient(APP, client=(host, 50000), raise_server_exceptions=False) as client:
        return client.post("/api/dev/session", json={"user_id": "x"}, headers=headers or {})


def assert_not_found(resp) -> None:
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"] == {"code": "not_found", "message": "no such route"}


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1"])
def test_loopback_clients_reach_the_dev_routes(host):
    resp = session(host)
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "user_id", resp.text


@pytest.mark.parametrize("host", ["192.0.2.2", "10.0.0.7", "172.17.0.1", "2001:db8::1", "::ffff:203.0.113.9",
                                  "0.0.0.0", "localhost", "testclient", ""])
def test_other_clients_get_404_as_if_there_were_no_route(host):
    assert_not_found(session(host))
    with TestClient(APP, client=(host, 50000), raise_server_exceptions=False) as client:
        assert_not_found(client.get("/api/dev/users"))


@pytest.mark.parametrize("headers", [
    {"X-Forwarded-For": "203.0.113.9"},
    {"X-Forwarded-For": "127.0.0.1, 203.0.113.9"},  # a local proxy appending the real client
    {"X-Forwarded-For": "203.0.113.9, 127.0.0.1"},
    {"X-Forwarded-For": "unknown"},
    {"X-Real-IP": "198.51.100.4"},
    {"Forwarded": 'for="[2001:db8::1]:4711";proto=https'},
    {"Forwarded": "for=127.0.0.1, for=198.51.100.4"},
    {"Forwarded": "for=_hidden"},
])
def test_a_loopback_request_forwarded_for_someone_else_gets_404(headers):
    """A proxy on the same machine makes every request look local: what it says it forwarded
    can only take access away, never grant it."""
    assert_not_found(session("127.0.0.1", headers))


@pytest.mark.parametrize("headers", [
    {"X-Forwarded-For": "127.0.0.1"},
    {"X-Forwarded-For": "::1, 127.0.0.1"},
    {"Forwarded": 'for="[::1]:5000"'},
])
def test_a_local_proxy_forwarding_a_local_client_is_let_in(headers):
    assert session("127.0.0.1", headers).status_code == 422


def test_a_forwarding_header_naming_loopback_does_not_let_a_remote_client_in():
    assert_not_found(session("203.0.113.9", {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"}))
