"""structlog set-up: JSON lines in production, a readable console in development.

Every line passes through `redact`, so tokens, keys, Authorization headers and email addresses
never reach the output, whichever code path logged them. Work on a call binds `invitation_id`,
`room_name`, `event_id` and `task_id` with `bind_contextvars`, so every line of it carries them.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog

_SECRET_KEYS = re.compile(
    r"(authorization|token|secret|password|api[_-]?key|service[_-]?role|jwt|cookie|signature|email|recipient_email|basic_auth)",
    re.I,
)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
_RESEND_KEY = re.compile(r"\bre_[A-Za-z0-9_]{8,}")
_SUPABASE_SECRET_KEY = re.compile(r"\bsb_secret_[A-Za-z0-9_-]+")
# The user part may be empty (redis://:password@host); the password never holds / ? # unencoded.
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s/?#]+@")
# key=value / key: value / 'key': 'value' in free text (libpq conninfo, dict reprs, headers).
_KEY_VALUE = re.compile(
    r"""(?i)(\b[\w-]*(?:password|passwd|secret|token|api[_-]?key|service[_-]?role[_-]?key|authorization)[\w-]*"""
    r"""['"]?\s*[:=]\s*['"]?)([^\s'",;&)}]+)"""
)
REDACTED = "[redacted]"
# Each pattern above needs one of these (lower-cased) in the text: most values (ids, names,
# results) have none and skip the patterns.
_HINTS = ("@", "eyj", "bearer", "basic", "re_", "sb_secret_", "passw", "secret", "token", "apikey", "api_key",
          "api-key", "servicerole", "service_role", "service-role", "authorization")

_extra_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Values that must never appear in a log line, whatever key they sit under."""
    if value and len(value) >= 6:
        _extra_secrets.add(value)


def _scrub_text(text: str) -> str:
    for secret in _extra_secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    lower = text.lower()
    if not any(hint in lower for hint in _HINTS):
        return text
    text = _JWT.sub(REDACTED, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _RESEND_KEY.sub(REDACTED, text)
    text = _SUPABASE_SECRET_KEY.sub(REDACTED, text)
    text = _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    text = _KEY_VALUE.sub(lambda m: f"{m.group(1)}{REDACTED}", text)
    return _EMAIL.sub(REDACTED, text)


def _scrub(value: Any, depth: int = 0) -> Any:
    if depth > 6:
        return value
    if isinstance(value, str):
        return _scrub_text(value)
    if isinstance(value, dict):
        return {
            k: (REDACTED if isinstance(k, str) and _SECRET_KEYS.search(k) and v not in (None, "") else _scrub(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub(v, depth + 1) for v in value)
    if isinstance(value, BaseException):
        return _scrub_text(repr(value))
    if value is None or isinstance(value, (bool, int, float)):
        return value
    # Any other object is rendered by its repr (JSONRenderer's fallback, ConsoleRenderer): check it.
    text = repr(value)
    scrubbed = _scrub_text(text)
    return value if scrubbed == text else scrubbed


def redact(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in event_dict.items():
        if key in ("exc_info", "stack_info", "_record", "_from_structlog"):
            out[key] = value  # rendered later (format_exc_info), then scrubbed by _scrub_rendered_exception
        elif key in ("event", "exception", "stack"):
            out[key] = _scrub(value)
        elif _SECRET_KEYS.search(key) and value not in (None, ""):
            out[key] = REDACTED
        else:
            out[key] = _scrub(value)
    return out


def _scrub_rendered_exception(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    # format_exc_info renders tracebacks after redact ran: scrub the rendered text too.
    for key in ("exception", "stack"):
        if isinstance(event_dict.get(key), str):
            event_dict[key] = _scrub_text(event_dict[key])
    return event_dict


def _register_configured_secrets() -> None:
    """The configured secrets, whichever process configures logging. (URL passwords are caught
    in their URL; alone they may be common words, like the development `postgres`.)"""
    from config.settings import get_settings

    try:
        settings = get_settings()
    except Exception:  # noqa: BLE001 - invalid settings stop the process elsewhere
        return
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if hasattr(value, "get_secret_value"):
            secret = value.get_secret_value()
            register_secret(secret)
            if name == "livekit_webhook_keys":
                for pair in secret.split(","):
                    register_secret(pair.partition(":")[2].strip())


class QuietCeleryChatter(logging.Filter):
    """Drops Celery's per-task INFO lines (received, succeeded, retry) and beat's "Sending due task":
    with sweeps every second they were four lines a second that said nothing. Our own tasks log one
    line per step that did something; failures (WARNING and up) still pass."""

    _PREFIXES = ("Task %(name)s[%(id)s] received", "Task %(name)s[%(id)s] succeeded",
                 "Task %(name)s[%(id)s] retry", "Scheduler: Sending due task")

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and isinstance(record.msg, str)
                    and record.msg.startswith(self._PREFIXES))


_configured = False


def configure_logging(production: bool | None = None, level: str = "INFO", stream=None) -> None:
    global _configured
    if production is None:
        from config.settings import get_settings

        try:
            production = get_settings().is_production
        except Exception:  # noqa: BLE001 - logging must come up even before settings are valid
            production = False
    stream = stream or sys.stderr
    _register_configured_secrets()
    pre_chain = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if production
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    )
    tail = [redact, structlog.processors.format_exc_info, _scrub_rendered_exception, renderer]
    processors = pre_chain + tail
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # stdlib loggers (celery, kombu, uvicorn) go through the same chain: the same redaction, the
    # bound contextvars, and JSON lines in production.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*pre_chain, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_callflow", False):
            root.removeHandler(old)
    handler._callflow = True  # type: ignore[attr-defined]
    if level.upper() != "DEBUG":
        handler.addFilter(QuietCeleryChatter())
    root.addHandler(handler)
    # uvicorn installs its own handlers (propagate off): route its lines through ours instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        if name == "uvicorn.access" and not uvicorn_logger.handlers and not uvicorn_logger.propagate:
            continue  # `--no-access-log` (the Procfile's): one line per webhook is noise, keep it off
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    # One line per LiveKit API request says nothing the lifecycle's own line does not.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    root.setLevel(level)
    _configured = True


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
