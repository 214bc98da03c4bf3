"""Mailers: the Resend API (through the `resend` SDK) and the development `.eml` outbox.

Both take an `OutgoingEmail` and return the provider's message id, or raise:
- `RetryableSendError`: 429, 5xx, 409 `concurrent_idempotent_requests`, connection errors and
  timeouts; carries Resend's `retry-after` when it gave one;
- `PermanentSendError`: any other 4xx (invalid address, unverified domain, bad key, 409
  `invalid_idempotent_request`), never worth repeating as is.
"""

from __future__ import annotations

import email.policy
import os
import tempfile
import threading
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from datetime import datetime, timezone
from pathlib import Path

import resend
from resend.exceptions import ResendError
from resend.http_client_requests import RequestsClient

from orchestration import names
from orchestration.delivery.channel import Provider, Refused, Sent, Unavailable

DEFAULT_RESEND_API_URL = "https://api.resend.com"
# A request Resend has not answered by then is no answer (tried again with the same Idempotency-Key).
RESEND_TIMEOUT_SECONDS = 15


@dataclass(frozen=True)
class OutgoingEmail:
    notification_id: str
    idempotency_key: str
    sender: str
    to: str
    subject: str
    html: str
    text: str
    tags: tuple[tuple[str, str], ...] = field(default_factory=tuple)


class SendError(Exception):
    def __init__(self, message: str, status: int | None = None, error_type: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.retry_after = retry_after

    def describe(self) -> str:
        head = " ".join(str(p) for p in (self.status, self.error_type) if p)
        return f"{head}: {self}" if head else str(self)


class RetryableSendError(SendError):
    pass


class PermanentSendError(SendError):
    pass


def idempotency_key(notification_id: str) -> str:
    """One key per outbox row: every attempt for the row, from any worker, sends the same key."""
    return f"callflow-notification-{notification_id}"


def _retry_after(headers: dict | None) -> float | None:
    for name, value in (headers or {}).items():
        if str(name).lower() == "retry-after":
            try:
                return max(0.0, float(value))
            except (TypeError, ValueError):
                return None  # an HTTP date: rare; the caller's own backoff applies
    return None


def classify(exc: ResendError) -> SendError:
    """Sorts a Resend SDK error into retryable or permanent, after Resend's documented semantics."""
    try:
        status = int(exc.code)
    except (TypeError, ValueError):
        status = 500
    error_type = str(exc.error_type or "")
    message = str(exc.message or exc)[:500]
    retry_after = _retry_after(getattr(exc, "headers", None))
    if status == 429 or status >= 500 or (status == 409 and error_type == "concurrent_idempotent_requests"):
        return RetryableSendError(message, status, error_type, retry_after)
    if 400 <= status < 500:
        return PermanentSendError(message, status, error_type, retry_after)
    return RetryableSendError(message, status, error_type, retry_after)


class ResendMailer:
    """Sends through the `resend` SDK (its module-level api_key / api_url / http client)."""

    rate_limited = True
    _lock = threading.Lock()

    def __init__(self, api_key: str, api_url: str | None = None, timeout: int = RESEND_TIMEOUT_SECONDS,
                 configured_rate: float | None = None) -> None:
        self.api_key = api_key
        self.api_url = (api_url or DEFAULT_RESEND_API_URL).rstrip("/")
        self.timeout = timeout
        self.configured_rate = configured_rate
        self._warned_rate = False

    def _check_account_limit(self, headers: dict | None) -> None:
        """Resend's `ratelimit-limit` header says the account's real limit: say so, once per
        process, when CALLFLOW_EMAIL_RATE_PER_SECOND is above it (429s would follow)."""
        if self._warned_rate or not self.configured_rate or not headers:
            return
        for name, value in headers.items():
            if str(name).lower() == "ratelimit-limit":
                try:
                    limit = float(str(value).split(",")[0].split(";")[0])
                except ValueError:
                    return
                if limit < self.configured_rate:
                    from config.logging import get_logger

                    get_logger("callflow.notifications").warning(
                        "CALLFLOW_EMAIL_RATE_PER_SECOND is above the Resend account's limit",
                        configured=self.configured_rate, resend_limit=limit)
                    self._warned_rate = True
                return

    def _configure(self) -> None:
        # The SDK keeps its configuration in module globals; set them (idempotently) per send.
        with self._lock:
            resend.api_key = self.api_key
            resend.api_url = self.api_url
            if not isinstance(resend.default_http_client, RequestsClient) or \
                    getattr(resend.default_http_client, "_timeout", None) != self.timeout:
                resend.default_http_client = RequestsClient(timeout=self.timeout)

    def send(self, message: OutgoingEmail) -> str:
        self._configure()
        params: dict = {
            "from": message.sender,
            "to": [message.to],
            "subject": message.subject,
            "html": message.html,
            "text": message.text,
        }
        if message.tags:
            params["tags"] = [{"name": k, "value": v} for k, v in message.tags]
        try:
            response = resend.Emails.send(params, options={"idempotency_key": message.idempotency_key})
        except ResendError as exc:
            raise classify(exc) from None
        if hasattr(response, "get"):
            self._check_account_limit(response.get("http_headers"))
        message_id = response.get("id") if hasattr(response, "get") else None
        if not message_id:
            raise RetryableSendError("Resend answered without a message id", 200, "no_message_id")
        return str(message_id)


def _needs_utf8_headers(*addresses: str) -> bool:
    """Whether an address has a non-ASCII local part or domain: such an address has no 7-bit
    form in a header (RFC 2047 forbids encoded-words inside one), so the message is written as
    SMTPUTF8 mail (RFC 6532: headers in UTF-8), the way such a server receives it. Non-ASCII
    display names alone do not need it: they are encoded-words, valid in 7-bit headers."""
    for value in addresses:
        for address in email.policy.default.header_factory("To", value).addresses:
            if not address.addr_spec.isascii():
                return True
    return False


def build_mime(message: OutgoingEmail, when: datetime | None = None) -> EmailMessage:
    utf8 = _needs_utf8_headers(message.sender, message.to)
    mime = EmailMessage(policy=email.policy.SMTPUTF8 if utf8 else email.policy.SMTP)
    mime["From"] = message.sender
    mime["To"] = message.to
    mime["Subject"] = message.subject
    mime["Date"] = format_datetime(when or datetime.now(timezone.utc))
    mime["Message-ID"] = make_msgid(idstring=message.notification_id, domain="callflow.localhost")
    mime["Idempotency-Key"] = message.idempotency_key
    for name, value in message.tags:
        mime[f"X-Callflow-{name.replace('_', '-').title()}"] = value
    mime.set_content(message.text)
    mime.add_alternative(message.html, subtype="html")
    return mime


class OutboxMailer:
    """Development: writes the email as `<notification id>.eml` to CALLFLOW_OUTBOX_DIR.

    One file per outbox row (the file name is the row id, written atomically), so a repeated
    attempt rewrites the same file rather than adding a second email.
    """

    rate_limited = False

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def path_for(self, notification_id: str) -> Path:
        return self.directory / f"{notification_id}.eml"

    def send(self, message: OutgoingEmail) -> str:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            target = self.path_for(message.notification_id)
            data = build_mime(message).as_bytes()
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".eml")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, target)
            except BaseException:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
                raise
        except OSError as exc:
            raise RetryableSendError(f"cannot write the outbox: {exc.strerror or exc}", None, "outbox_error") from None
        return f"outbox:{target.name}"


# ---- Resend as a delivery provider (orchestration/delivery) ---------------------------------------

# Resend's loop asks once per step whatever the backlog waiting: a probe every 10 s at worst is
# nothing to a 2-requests-a-second account, and the emails go at most that long after Resend is back.
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 10.0


def resend_provider(settings):
    """One Resend account: one rate (CALLFLOW_EMAIL_RATE_PER_SECOND, every request spaced, with 0.1 s
    of margin a request) and one retry loop, for every channel that sends email."""
    return Provider(name="resend", rate_key=names.RATELIMIT_RESEND,
                    rate_per_second=settings.callflow_email_rate_per_second,
                    retry_base_seconds=RETRY_BASE_SECONDS, retry_max_seconds=RETRY_MAX_SECONDS,
                    probe_seconds=RESEND_TIMEOUT_SECONDS + 2, margin=0.1, spacing=True)


def send_email(mailer, message: OutgoingEmail):
    """One email through a mailer, as the delivery loop hears it: `Sent`, `Refused`, or
    `Unavailable` raised (no answer: 429, 5xx, a timeout — the email stays pending)."""
    try:
        return [Sent(mailer.send(message))]
    except PermanentSendError as exc:
        return [Refused(exc.describe())]
    except RetryableSendError as exc:
        raise Unavailable(exc.describe(), exc.retry_after, rate_limited=exc.status == 429) from None
