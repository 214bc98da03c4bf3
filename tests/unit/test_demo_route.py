"""`/demo` without its bundle answers the contract's 503, naming the build command."""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.testclient import TestClient

from workers.web import demo
from workers.web.errors import EXCEPTION_HANDLERS


def test_unbuilt_demo_is_a_json_503_naming_the_build(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(demo, "BUNDLE", tmp_path / "dist" / "demo.js")  # a checkout where nobody built it
    app = Starlette(routes=demo.routes, exception_handlers=EXCEPTION_HANDLERS)
    with TestClient(app) as client:
        for path in ("/demo", "/demo/demo.js"):
            resp = client.get(path)
            assert resp.status_code == 503
            error = resp.json()["error"]
            assert error["code"] == "unavailable" and "npm ci && npm run build" in error["message"]
