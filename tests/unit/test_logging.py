"""config/logging.py: secrets fed through every code path never reach the output; the ordinary
fields of a call's work do, bound through contextvars; JSON lines in production, console in dev."""

from __future__ import annotations

import io
import json
import logging

import jwt
import pytest
import structlog

import config.logging as callflow_logging
from config.logging import configure_logging, get_logger, register_secret
from config.settings import DEV_LIVEKIT_API_SECRET

LIVEKIT_SECRET = "lkS3cr3t-Sx9f8Qm2vT7pL4nR6wZ1yB3cD5eF"
USER_JWT = jwt.encode({"sub": "8c1d4f0e-0000-4000-8000-000000000001", "role": "authenticated",
                       "email": "alice@example.org"}, "k" * 32, algorithm="HS256")
SERVICE_ROLE_KEY = jwt.encode({"role": "service_role", "iss": "supabase"}, "s" * 32, algorithm="HS256")
SB_SECRET_KEY = "sb_secret_N7UND0UgjKTVK-Uodkm0Hg_xSvEMPvz"
RESEND_KEY = "re_AbCdEf12_3456789XyZ"
EMAIL = "alice.smith+calls@example.org"
DB_PASSWORD = "Pg-pa55w0rd-x9"
REDIS_PASSWORD = "r3dis-pa55-Q7"
OPAQUE_TOKEN = "opaqueTOKEN.value-123_abc"
BASIC = "b3BzOmZsb3dlci1wYXNz"  # base64 of user:password

SECRETS = [LIVEKIT_SECRET, USER_JWT, SERVICE_ROLE_KEY, SB_SECRET_KEY, RESEND_KEY, EMAIL, DB_PASSWORD,
           REDIS_PASSWORD, OPAQUE_TOKEN, BASIC,
           # the parts of a JWT are secrets on their own too (a signature is enough to replay)
           USER_JWT.split(".")[2], SERVICE_ROLE_KEY.split(".")[2], "alice@example.org", "calls@example.org"]

FIELDS = {
    "invitation_id": "3f1c2a9e-1b7d-4c55-9a51-7d0f1e2b3c4d",
    "room_name": "room-7f3a9c",
    "event_id": "EV_k2j3h4g5f6d7",
    "task_id": "c0ffee00-1234-4abc-8def-000000000042",
}


@pytest.fixture(params=[True, False], ids=["production", "development"])
def output(request, monkeypatch):
    """configure_logging into a buffer; returns (production, read())."""
    monkeypatch.setattr(callflow_logging, "_extra_secrets", set())
    buf = io.StringIO()
    configure_logging(request.param, level="DEBUG", stream=buf)
    register_secret(LIVEKIT_SECRET)
    structlog.contextvars.clear_contextvars()
    yield request.param, buf.getvalue
    structlog.contextvars.clear_contextvars()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_callflow", False):
            root.removeHandler(handler)
    structlog.reset_defaults()


def _check(production: bool, text: str) -> list:
    assert text.strip(), "nothing was logged"
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked:\n{text}"
    if production:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return []


def _fail_with_secrets():
    headers = {"Authorization": f"Bearer {USER_JWT}"}
    raise RuntimeError(f"Resend refused {RESEND_KEY} for {EMAIL} with headers {headers}; "
                       f"db postgresql://postgres:{DB_PASSWORD}@db.example.co:5432/postgres")


def test_structlog_fields_and_messages_are_redacted(output):
    production, read = output
    log = get_logger("callflow.test")
    structlog.contextvars.bind_contextvars(**FIELDS)
    log.info("calling livekit", api_secret=LIVEKIT_SECRET, livekit_secret=LIVEKIT_SECRET)
    log.info(f"token issued {USER_JWT}", token=USER_JWT, access=USER_JWT, ttl=600)
    log.info("request", headers={"Authorization": f"Bearer {OPAQUE_TOKEN}", "Content-Type": "application/json"},
             raw_header=f"Authorization: Bearer {OPAQUE_TOKEN}", basic=f"Authorization: Basic {BASIC}")
    log.info("webhook", header=USER_JWT, note=f"bare Authorization header {USER_JWT}")
    log.info("sending email", recipient_email=EMAIL, to=EMAIL, note=f"to {EMAIL} via {RESEND_KEY}",
             resend=RESEND_KEY, api_key=RESEND_KEY)
    log.info("db", url=f"postgresql://postgres:{DB_PASSWORD}@db.example.co:5432/postgres",
             conninfo=f"host=db port=5432 user=postgres password={DB_PASSWORD}",
             redis=f"redis://:{REDIS_PASSWORD}@127.0.0.1:6379/0")
    log.info("supabase", supabase_service_role_key=SERVICE_ROLE_KEY, key=SERVICE_ROLE_KEY, new_key=SB_SECRET_KEY,
             apikey_param=f"/realtime/v1/websocket?apikey={SERVICE_ROLE_KEY}&vsn=1.0.0")
    log.info("nested", payload={"participant": {"identity": "u1", "metadata": {"email": EMAIL}},
                                "list": [USER_JWT, {"secret": LIVEKIT_SECRET}, ("x", RESEND_KEY)]})
    log.info("embedded", blob=f"prefix{LIVEKIT_SECRET}suffix", obj=type("Obj", (), {
        "__repr__": lambda self: f"Obj(secret={LIVEKIT_SECRET}, user={EMAIL})"})())
    log.warning("positional %s %s", EMAIL, RESEND_KEY)
    log.info("ordinary", status="ringing", count=3, ok=True, ratio=0.5)

    lines = _check(production, read())
    text = read()
    for value in FIELDS.values():
        assert text.count(value) >= 10, value  # on every line, through contextvars
    if production:
        assert len(lines) == 11
        assert all(line[k] == v for line in lines for k, v in FIELDS.items())
        ordinary = lines[-1]
        assert (ordinary["status"], ordinary["count"], ordinary["ok"], ordinary["ratio"]) == ("ringing", 3, True, 0.5)
        assert ordinary["level"] == "info" and ordinary["event"] == "ordinary" and "timestamp" in ordinary
        assert lines[1]["ttl"] == 600
        assert lines[2]["headers"]["Content-Type"] == "application/json"
        assert "db.example.co" in lines[5]["url"]
    else:
        assert "[info" in text and "ordinary" in text and "status=ringing" in text
        assert "room_name=room-7f3a9c" in text


def test_exceptions_and_tracebacks_are_redacted(output):
    production, read = output
    log = get_logger("callflow.test")
    structlog.contextvars.bind_contextvars(invitation_id=FIELDS["invitation_id"], task_id=FIELDS["task_id"])
    try:
        _fail_with_secrets()
    except RuntimeError as exc:
        log.exception("send failed", error=exc)
        caught = exc
    log.error("later, with the exception object", exc_info=caught)
    log.error("as a field", error=caught, error_text=str(caught))

    lines = _check(production, read())
    text = read()
    assert text.count("Traceback (most recent call last)") == 2
    assert "_fail_with_secrets" in text and "RuntimeError" in text and "db.example.co" in text
    assert text.count(FIELDS["invitation_id"]) >= 3
    if production:
        assert len(lines) == 3
        assert "Traceback" in lines[0]["exception"] and "Traceback" in lines[1]["exception"]
        assert lines[0]["task_id"] == FIELDS["task_id"]


def test_stdlib_loggers_like_celery_are_redacted_and_carry_the_context(output):
    production, read = output
    structlog.contextvars.bind_contextvars(**FIELDS)
    logging.getLogger("kombu.connection").info("Connected to redis://:%s@127.0.0.1:6379/0", REDIS_PASSWORD)
    logging.getLogger("celery.worker.strategy").info(
        "Task callflow.send_notification[%s] received: %r", FIELDS["task_id"],
        {"to": EMAIL, "api_key": RESEND_KEY, "headers": {"Authorization": f"Bearer {OPAQUE_TOKEN}"}})
    logging.getLogger("uvicorn.error").warning("bad request Authorization: %s", USER_JWT)
    logging.getLogger("httpx").warning("POST https://api.resend.com/emails %s", f"Bearer {RESEND_KEY}")  # INFO is quiet
    try:
        _fail_with_secrets()
    except RuntimeError:
        logging.getLogger("celery.app.trace").exception("Task callflow.send_notification[%s] raised", FIELDS["task_id"])
    logging.getLogger("celery").warning("livekit secret %s in a message", LIVEKIT_SECRET)

    lines = _check(production, read())
    text = read()
    assert "Traceback (most recent call last)" in text and "_fail_with_secrets" in text
    assert "celery.app.trace" in text and "kombu.connection" in text
    if production:
        assert len(lines) == 6
        for line in lines:
            for key, value in FIELDS.items():
                assert line[key] == value
        assert lines[0]["logger"] == "kombu.connection" and lines[0]["level"] == "info"
        assert "127.0.0.1:6379" in lines[0]["event"]
        assert lines[4]["level"] == "error" and "Traceback" in lines[4]["exception"]
    else:
        assert text.count(FIELDS["room_name"]) >= 6


def test_uvicorn_lines_go_through_the_same_chain(monkeypatch):
    """uvicorn sets up its own handlers (propagate off) before the app configures logging."""
    import logging.config

    from uvicorn.config import LOGGING_CONFIG

    monkeypatch.setattr(callflow_logging, "_extra_secrets", set())
    logging.config.dictConfig(LOGGING_CONFIG)
    buf = io.StringIO()
    try:
        configure_logging(True, stream=buf)
        try:
            _fail_with_secrets()
        except RuntimeError:
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
        logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "POST",
                                                 f"/api/livekit/token?access_token={USER_JWT}", "1.1", 401)
    finally:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if getattr(handler, "_callflow", False):
                root.removeHandler(handler)
        structlog.reset_defaults()
    lines = _check(True, buf.getvalue())
    assert [line["logger"] for line in lines] == ["uvicorn.error", "uvicorn.access"]
    assert "Traceback" in lines[0]["exception"] and "401" in lines[1]["event"]


def test_configured_secrets_are_registered_by_configure_logging(monkeypatch):
    """Whichever process configures logging (web, worker, listener), its configured secrets are
    redacted wherever they show up, without each process registering them itself."""
    monkeypatch.setattr(callflow_logging, "_extra_secrets", set())
    buf = io.StringIO()
    try:
        configure_logging(True, stream=buf)
        get_logger().info(f"signing with {DEV_LIVEKIT_API_SECRET}")
        logging.getLogger("livekit").warning("secret:%s", DEV_LIVEKIT_API_SECRET)
    finally:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if getattr(handler, "_callflow", False):
                root.removeHandler(handler)
        structlog.reset_defaults()
    assert buf.getvalue().count("signing with") == 1
    assert DEV_LIVEKIT_API_SECRET not in buf.getvalue()


def test_contextvars_are_per_task_and_unbound_after():
    buf = io.StringIO()
    try:
        configure_logging(True, stream=buf)
        log = get_logger()
        with structlog.contextvars.bound_contextvars(task_id="task-one", invitation_id=FIELDS["invitation_id"]):
            log.info("inside")
        log.info("outside")
    finally:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if getattr(handler, "_callflow", False):
                root.removeHandler(handler)
        structlog.reset_defaults()
    inside, outside = (json.loads(line) for line in buf.getvalue().splitlines())
    assert inside["task_id"] == "task-one" and inside["invitation_id"] == FIELDS["invitation_id"]
    assert "task_id" not in outside and "invitation_id" not in outside


def test_ordinary_values_are_not_mangled():
    from config.logging import _scrub

    for value in ("room-7f3a9c", "realtime:3f1c2a9e-1b7d-4c55-9a51-7d0f1e2b3c4d:ringing", "EV_k2j3h4g5f6d7",
                  "timeout:3f1c2a9e", "ws://127.0.0.1:7880", "http://127.0.0.1:8000/livekit/webhook",
                  "postgresql://127.0.0.1:54322/postgres", "participant_joined", "ring_timeout"):
        assert _scrub(value) == value
