"""config/settings.py: development needs no configuration; production refuses to start without
every required value, with one line naming the variable and never a secret."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from config.settings import (
    DEV_LIVEKIT_API_KEY,
    DEV_LIVEKIT_API_SECRET,
    DEV_SUPABASE_JWT_SECRET,
    ConfigurationError,
    Settings,
    build_settings,
)

ROOT = Path(__file__).resolve().parents[2]

# Values that must never be printed, whatever goes wrong.
SECRETS = {
    "LIVEKIT_API_SECRET": "lk-secret-0123456789-0123456789-abcdef",
    "SUPABASE_SERVICE_ROLE_KEY": "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.c2lnbmF0dXJlc2VjcmV0",
    "RESEND_API_KEY": "re_SeCrEt1234567890abcdef",
    "SUPABASE_JWT_SECRET": "prod-jwt-secret-with-at-least-32-characters-xyz",
    "FLOWER_BASIC_AUTH": "ops:flower-pass-s3cret",
    "LIVEKIT_WEBHOOK_KEYS": "oldkey:old-secret-value-0123456789",
}
DB_PASSWORD = "db-pa55word-s3cret"

PRODUCTION = {
    "CALLFLOW_ENV": "production",
    "DATABASE_URL": f"postgresql://postgres:{DB_PASSWORD}@db.example.supabase.co:5432/postgres",
    "REDIS_URL": "redis://:redis-pa55-s3cret@redis.internal:6379/0",
    "LIVEKIT_URL": "wss://example.livekit.cloud",
    "LIVEKIT_API_KEY": "APIprodkey",
    "LIVEKIT_API_SECRET": SECRETS["LIVEKIT_API_SECRET"],
    "SUPABASE_URL": "https://example.supabase.co",
    "SUPABASE_SERVICE_ROLE_KEY": SECRETS["SUPABASE_SERVICE_ROLE_KEY"],
    "RESEND_API_KEY": SECRETS["RESEND_API_KEY"],
    "CALLFLOW_EMAIL_FROM": "Calls <calls@example.com>",
    "FLOWER_BASIC_AUTH": SECRETS["FLOWER_BASIC_AUTH"],
    "LIVEKIT_WEBHOOK_KEYS": SECRETS["LIVEKIT_WEBHOOK_KEYS"],
}
ALL_SECRET_VALUES = [*SECRETS.values(), DB_PASSWORD, "redis-pa55-s3cret", "flower-pass-s3cret", "old-secret-value"]


@pytest.fixture
def clean_env(monkeypatch):
    """No contract variable from the outer environment (the test run sets several)."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def _run(env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k.lower() not in Settings.model_fields}
    code = "from config.settings import load_settings_or_exit; load_settings_or_exit(); print('started')"
    return subprocess.run([sys.executable, "-c", code], env={**base, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def _assert_refused(result: subprocess.CompletedProcess, variable: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0], lines[0]
    for secret in ALL_SECRET_VALUES:
        assert secret not in result.stderr
    return lines[0]


# ---- development ---------------------------------------------------------------------------------


def test_development_defaults_need_no_configuration(clean_env):
    s = build_settings()
    assert s.callflow_env == "development" and not s.is_production
    assert s.database_url == "postgresql://postgres:postgres@127.0.0.1:54322/postgres"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.port == 8000
    assert s.livekit_url == "ws://127.0.0.1:7880"
    assert s.livekit_public_url == s.livekit_url
    assert s.livekit_api_key == DEV_LIVEKIT_API_KEY == "devkey"
    assert s.livekit_api_secret.get_secret_value() == DEV_LIVEKIT_API_SECRET
    assert len(DEV_LIVEKIT_API_SECRET) >= 32
    assert s.jwt_secret() == DEV_SUPABASE_JWT_SECRET
    assert s.supabase_url is None and s.supabase_service_role_key is None
    assert s.listener_source == "postgres"
    assert s.resend_api_key is None and s.resend_api_url is None
    assert s.callflow_email_from
    assert s.callflow_email_rate_per_second == 2
    assert s.callflow_outbox_dir == Path(".local/outbox")
    assert s.callflow_app_url == "http://localhost:3000"
    assert s.callflow_ring_timeout_seconds == 30
    assert s.callflow_sweep_interval_seconds == 1
    assert s.callflow_grace_seconds == 5
    assert s.callflow_token_ttl_seconds == 600
    assert s.callflow_token_rate_per_minute == 30
    assert s.flower_basic_auth is None
    assert s.webhook_keys() == {"devkey": DEV_LIVEKIT_API_SECRET}
    assert s.livekit_http_url == "http://127.0.0.1:7880"


def test_development_process_starts_with_an_empty_environment():
    result = _run({})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "started"


def test_environment_variables_are_read_and_empty_ones_count_as_unset(clean_env):
    clean_env.setenv("LIVEKIT_URL", "wss://lk.example.com")
    clean_env.setenv("LIVEKIT_PUBLIC_URL", "wss://public.example.com")
    clean_env.setenv("REDIS_URL", "")
    clean_env.setenv("CALLFLOW_APP_URL", "  ")
    clean_env.setenv("CALLFLOW_RING_TIMEOUT_SECONDS", "12.5")
    clean_env.setenv("SUPABASE_URL", "https://x.supabase.co/")
    clean_env.setenv("SUPABASE_SERVICE_ROLE_KEY", "k" * 40)
    s = build_settings()
    assert s.livekit_url == "wss://lk.example.com"
    assert s.livekit_public_url == "wss://public.example.com"
    assert s.livekit_http_url == "https://lk.example.com"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.callflow_app_url == "http://localhost:3000"
    assert s.callflow_ring_timeout_seconds == 12.5
    assert s.supabase_url == "https://x.supabase.co"
    assert s.listener_source == "realtime"


def test_realtime_listener_needs_supabase(clean_env):
    with pytest.raises(ConfigurationError, match="SUPABASE_URL"):
        build_settings(callflow_listener_source="realtime")


def test_webhook_keys_add_rotation_pairs(clean_env):
    s = build_settings(livekit_webhook_keys=" old:old-secret , older:s:with:colons ,")
    assert s.webhook_keys() == {"devkey": DEV_LIVEKIT_API_SECRET, "old": "old-secret", "older": "s:with:colons"}


# ---- development defaults only against a local Supabase (the contract) --------------------------

LOCAL_SUPABASE_URLS = ["http://127.0.0.1:54321", "http://localhost:54321", "http://LOCALHOST", "http://[::1]:54321",
                       "http://127.10.20.30:8080/"]
REAL_SUPABASE_URLS = ["https://abc.supabase.co", "http://192.168.1.5:54321", "http://localhost.example.com",
                      "http://127.0.0.1.nip.io", "http://0.0.0.0:54321", "http://[2001:db8::1]:54321"]


@pytest.mark.parametrize("url", REAL_SUPABASE_URLS)
@pytest.mark.parametrize("env", [None, "development"])
def test_a_real_supabase_url_turns_the_development_jwt_secret_off(clean_env, url, env):
    """Forgetting CALLFLOW_ENV (or leaving it `development`) must not make the published
    Supabase CLI secret a key to a real project's users."""
    if env:
        clean_env.setenv("CALLFLOW_ENV", env)
    clean_env.setenv("SUPABASE_URL", url)
    clean_env.setenv("SUPABASE_SERVICE_ROLE_KEY", "k" * 40)
    s = build_settings()
    assert not s.is_production
    assert s.jwt_secret() is None
    assert not s.supabase_is_local and not s.development_defaults_allowed
    # An explicit secret (a project not yet moved to JWKS) is the project's own: kept.
    clean_env.setenv("SUPABASE_JWT_SECRET", SECRETS["SUPABASE_JWT_SECRET"])
    assert build_settings().jwt_secret() == SECRETS["SUPABASE_JWT_SECRET"]


@pytest.mark.parametrize("url", [None, *LOCAL_SUPABASE_URLS])
def test_a_local_supabase_url_keeps_the_development_defaults(clean_env, url):
    if url:
        clean_env.setenv("SUPABASE_URL", url)
        clean_env.setenv("SUPABASE_SERVICE_ROLE_KEY", "k" * 40)
    s = build_settings()
    assert s.supabase_is_local and s.development_defaults_allowed
    assert s.jwt_secret() == DEV_SUPABASE_JWT_SECRET


# ---- production ---------------------------------------------------------------------------------


def test_complete_production_configuration_starts(clean_env):
    result = _run(PRODUCTION)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "started"
    for name, value in PRODUCTION.items():
        clean_env.setenv(name, value)
    s = build_settings()
    assert s.is_production
    assert s.jwt_secret() is None  # no development secret in production
    assert s.livekit_public_url == "wss://example.livekit.cloud"


REQUIRED = ["DATABASE_URL", "REDIS_URL", "LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET",
            "RESEND_API_KEY", "CALLFLOW_EMAIL_FROM", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"]


@pytest.mark.parametrize("variable", REQUIRED)
@pytest.mark.parametrize("how", ["missing", "empty", "blank"])
def test_production_refuses_a_missing_required_variable(variable, how):
    env = dict(PRODUCTION)
    if how == "missing":
        del env[variable]
    else:
        env[variable] = "" if how == "empty" else "   "
    line = _assert_refused(_run(env), variable)
    assert "required" in line


def test_production_without_supabase_is_allowed_with_the_postgres_source_and_a_jwt_secret():
    env = {k: v for k, v in PRODUCTION.items() if not k.startswith("SUPABASE_")}
    _assert_refused(_run(env), "SUPABASE_URL")
    env["CALLFLOW_LISTENER_SOURCE"] = "postgres"
    _assert_refused(_run(env), "SUPABASE_URL")
    env["SUPABASE_JWT_SECRET"] = SECRETS["SUPABASE_JWT_SECRET"]
    result = _run(env)
    assert result.returncode == 0, result.stderr


MALFORMED = [
    ("DATABASE_URL", f"mysql://root:{DB_PASSWORD}@db/x"),
    ("DATABASE_URL", "not a url"),
    ("REDIS_URL", "http://redis:6379"),
    ("LIVEKIT_URL", "example.livekit.cloud"),
    ("LIVEKIT_PUBLIC_URL", "ftp://example.livekit.cloud"),
    ("SUPABASE_URL", "example.supabase.co"),
    ("RESEND_API_URL", "ws://resend"),
    ("CALLFLOW_APP_URL", "localhost:3000"),
    ("PORT", "0"),
    ("PORT", "eighty"),
    ("CALLFLOW_ENV", "staging"),
    ("CALLFLOW_LISTENER_SOURCE", "kafka"),
    ("CALLFLOW_RING_TIMEOUT_SECONDS", "-1"),
    ("CALLFLOW_RING_TIMEOUT_SECONDS", "0"),
    ("CALLFLOW_RING_TIMEOUT_SECONDS", "inf"),
    ("CALLFLOW_RING_TIMEOUT_SECONDS", "nan"),
    ("CALLFLOW_SWEEP_INTERVAL_SECONDS", "-0.5"),
    ("CALLFLOW_GRACE_SECONDS", "-5"),
    ("CALLFLOW_TOKEN_TTL_SECONDS", "-600"),
    ("CALLFLOW_TOKEN_RATE_PER_MINUTE", "0"),
    ("CALLFLOW_EMAIL_RATE_PER_SECOND", "-2"),
    ("LIVEKIT_WEBHOOK_KEYS", "old-secret-value-without-a-key"),
    ("LIVEKIT_WEBHOOK_KEYS", "key1:old-secret-value-1,key2"),
    ("LIVEKIT_WEBHOOK_KEYS", ":old-secret-value-no-key"),
    ("LIVEKIT_WEBHOOK_KEYS", "oldkey:"),
    ("FLOWER_BASIC_AUTH", "flower-pass-s3cret"),
    ("FLOWER_BASIC_AUTH", ":flower-pass-s3cret"),
    ("FLOWER_BASIC_AUTH", "ops:"),
]


@pytest.mark.parametrize("variable,value", MALFORMED)
def test_malformed_values_are_named_in_production(variable, value):
    line = _assert_refused(_run({**PRODUCTION, variable: value}), variable)
    assert value not in line or len(value) < 4


@pytest.mark.parametrize("variable,value", MALFORMED)
def test_malformed_values_are_named_in_development(clean_env, variable, value):
    clean_env.setenv(variable, value)
    with pytest.raises(ConfigurationError) as info:
        build_settings()
    message = str(info.value)
    assert variable in message and "\n" not in message
    for secret in ALL_SECRET_VALUES:
        assert secret not in message


# ---- secrets ------------------------------------------------------------------------------------


def test_secrets_are_secretstr_and_never_in_repr_or_str(clean_env):
    for name, value in PRODUCTION.items():
        clean_env.setenv(name, value)
    clean_env.setenv("SUPABASE_JWT_SECRET", SECRETS["SUPABASE_JWT_SECRET"])
    s = build_settings()
    for field in ("livekit_api_secret", "livekit_webhook_keys", "supabase_service_role_key",
                  "supabase_jwt_secret", "resend_api_key", "flower_basic_auth"):
        assert isinstance(getattr(s, field), SecretStr), field
    assert s.livekit_api_secret.get_secret_value() == SECRETS["LIVEKIT_API_SECRET"]
    for text in (repr(s), str(s), f"{s}", f"{s!r}"):
        for secret in ALL_SECRET_VALUES:
            assert secret not in text, (secret, text)
    # The URLs themselves stay usable.
    assert DB_PASSWORD in s.database_url
    assert "db.example.supabase.co" in repr(s)


def test_apns_variables_are_required_together(clean_env):
    assert not build_settings().apns_configured and not build_settings().fcm_configured
    with pytest.raises(ConfigurationError, match="APNS_TEAM_ID, APNS_PRIVATE_KEY, APNS_TOPIC required"):
        build_settings(apns_key_id="KEY123")
    s = build_settings(apns_key_id="KEY123", apns_team_id="TEAM123", apns_private_key="-----BEGIN PRIVATE KEY-----",
                       apns_topic="app.example.calls", apns_url="http://127.0.0.1:9/")
    assert s.apns_configured and s.apns_url == "http://127.0.0.1:9"
    with pytest.raises(ConfigurationError, match="APNS_URL"):
        build_settings(apns_url="ftp://apns.example")


def test_fcm_variables_are_required_together(clean_env):
    with pytest.raises(ConfigurationError, match="FCM_SERVICE_ACCOUNT_JSON is required"):
        build_settings(fcm_project_id="proj")
    with pytest.raises(ConfigurationError, match="FCM_PROJECT_ID is required"):
        build_settings(fcm_service_account_json="{}")
    assert build_settings(fcm_project_id="proj", fcm_service_account_json="{}").fcm_configured
