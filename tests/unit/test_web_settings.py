"""The browser-facing settings: CORS origins and the demo page, by environment."""

from __future__ import annotations

from config.settings import Settings, build_settings
from tests.unit.test_settings import PRODUCTION


def _clean(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def test_development_allows_the_local_app_and_serves_the_demo(monkeypatch):
    _clean(monkeypatch)
    s = build_settings()
    assert s.cors_origins == ["http://localhost:3000", "http://127.0.0.1:3000"]
    assert s.demo_enabled and s.supabase_anon_key is None


def test_production_allows_no_origin_and_no_demo_unless_set(monkeypatch):
    _clean(monkeypatch)
    for name, value in PRODUCTION.items():
        monkeypatch.setenv(name, value)
    s = build_settings()
    assert s.cors_origins == [] and not s.demo_enabled
    monkeypatch.setenv("CALLFLOW_CORS_ORIGINS", " https://app.example.com/ ,https://admin.example.com")
    monkeypatch.setenv("CALLFLOW_DEMO", "true")
    s = build_settings()
    assert s.cors_origins == ["https://app.example.com", "https://admin.example.com"] and s.demo_enabled


def test_the_demo_can_be_turned_off_in_development(monkeypatch):
    _clean(monkeypatch)
    monkeypatch.setenv("CALLFLOW_DEMO", "off")
    assert not build_settings().demo_enabled
