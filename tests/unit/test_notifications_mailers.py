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


@pytest.mark.parametrize("sender, to", [
    ("Zoë <calls@example.test>", "zoe@example.test"),                  # a non-ASCII display name
    ("Calls <calls@example.test>", "zoë@example.test"),                # a UTF-8 local part (RFC 6531)
    ("Calls <calls@example.test>", "bob@bücher.example"),              # an IDN domain, as its user typed it
    ("Zoë Ünal <zoë@exämple.test>", "Ana Souza <anä@exämple.test>"),   # all of it at once
    ('"Doe, Jane" <calls@example.test>', "jane@example.test"),         # a display name that needs quoting
])
def test_outbox_writes_non_ascii_addresses_that_parse_back_the_same(tmp_path, sender, to):
    """The written file, read back by Python's email parser, gives the very same addresses, with no
    defect but the one Python notes on every non-ASCII local part (which RFC 6532 allows): no
    encoded-word inside an address, where RFC 2047 forbids one and readers keep the
    `=?utf-8?q?...?=` text as the address. The file is UTF-8 text (RFC 6532) when it must be."""
    from email.errors import NonASCIILocalPartDefect
    from email.utils import parseaddr

    msg = OutgoingEmail(**{**message().__dict__, "sender": sender, "to": to})
    mailer = OutboxMailer(tmp_path)
    mailer.send(msg)
    raw = mailer.path_for(msg.notification_id).read_bytes()
    parsed = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    for name, written in (("From", sender), ("To", to)):
        expected_name, expected_addr = parseaddr(written)
        header = parsed[name]
        (address,) = header.addresses
        assert (address.display_name, address.addr_spec) == (expected_name, expected_addr), (name, str(header))
        allowed = (NonASCIILocalPartDefect,) if not address.username.isascii() else ()
        assert all(isinstance(d, allowed) for d in header.defects), (name, header.defects, raw.split(b"\r\n\r\n")[0])
    assert parsed["Subject"] == msg.subject
    assert parsed.get_body(("plain",)).get_content().strip() == "Hi Bruno"
    if sender.isascii() and to.isascii():  # ASCII-only mail stays 7-bit, as before
        assert raw.isascii()
