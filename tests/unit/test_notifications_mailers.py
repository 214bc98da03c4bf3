"""Sorting Resend's answers into retry or fail, and the development `.eml` outbox."""

import email
import email.policy

import pytest
from resend.exceptions import ResendError, raise_for_code_and_type

from orchestration.notifications.mailers import (
    OutboxMailer,
    OutgoingEmail,
    PermanentSendError,
    RetryableSendError,
    classify,
    idempotency_key,
)


def sdk_error(code, name, headers=None) -> ResendError:
    try:
        raise_for_code_and_type(code=code, error_type=name, message="m", headers=headers or {})
    except ResendError as exc:
        return exc


@pytest.mark.parametrize("code, name", [
    (429, "rate_limit_exceeded"), (500, "application_error"), (502, "application_error"),
    (503, "x"), (409, "concurrent_idempotent_requests"), (500, "HttpClientError"),
])
def test_retryable(code, name):
    assert isinstance(classify(sdk_error(code, name)), RetryableSendError)


@pytest.mark.parametrize("code, name", [
    (422, "validation_error"), (400, "validation_error"), (401, "missing_api_key"), (403, "invalid_api_key"),
    (403, "validation_error"), (409, "invalid_idempotent_request"), (404, "not_found"),
])
def test_permanent(code, name):
    assert isinstance(classify(sdk_error(code, name)), PermanentSendError)


def test_retry_after_is_read_whatever_its_case():
    assert classify(sdk_error(429, "rate_limit_exceeded", {"Retry-After": "3"})).retry_after == 3.0
    assert classify(sdk_error(429, "rate_limit_exceeded", {"retry-after": "0.5"})).retry_after == 0.5
    assert classify(sdk_error(429, "rate_limit_exceeded", {})).retry_after is None


def test_idempotency_key_is_derived_from_the_row_only():
    assert idempotency_key("abc") == idempotency_key("abc") == "callflow-notification-abc"


def message(nid="11111111-1111-1111-1111-111111111111") -> OutgoingEmail:
    return OutgoingEmail(notification_id=nid, idempotency_key=idempotency_key(nid), sender="Calls <calls@example.test>",
                         to="bruno@example.test", subject="Missed video call from Ana Souza – ç",
                         html="<p>Hi Bruno</p>", text="Hi Bruno", tags=(("kind", "missed_call"),))


def test_outbox_writes_one_eml_per_row(tmp_path):
    mailer = OutboxMailer(tmp_path / "outbox")
    first = mailer.send(message())
    again = mailer.send(message())
    assert first == again == "outbox:11111111-1111-1111-1111-111111111111.eml"
    files = list((tmp_path / "outbox").iterdir())
    assert [f.name for f in files] == ["11111111-1111-1111-1111-111111111111.eml"]
    parsed = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert parsed["Subject"] == "Missed video call from Ana Souza – ç"
    assert parsed["To"] == "bruno@example.test"
    assert parsed["Idempotency-Key"] == "callflow-notification-11111111-1111-1111-1111-111111111111"
    assert parsed.get_body(("plain",)).get_content().strip() == "Hi Bruno"
    assert parsed.get_body(("html",)).get_content().strip() == "<p>Hi Bruno</p>"


def test_outbox_write_error_is_retryable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RetryableSendError):
        OutboxMailer(blocker / "outbox").send(message())
