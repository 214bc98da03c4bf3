"""Which ended invitations earn a missed-call email, and why an outbox row is skipped."""

from datetime import datetime, timedelta, timezone

import pytest

from orchestration.domain.model import deserves_missed_call_email
from orchestration.channels.missed_call_email import skip_reason

T0 = datetime(2026, 11, 25, 10, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("status, rang, expected", [
    ("missed", 30, True),
    ("busy", None, True),
    ("cancelled", 3, True),
    ("cancelled", 10, True),
    ("cancelled", 2.999, False),
    ("cancelled", 0.5, False),
    ("cancelled", None, False),  # cancelled before it rang
    ("declined", 10, False),
    ("accepted", 10, False),
    ("failed", None, False),
    ("ringing", 10, False),
    ("pending", None, False),
])
def test_deserves_missed_call_email(status, rang, expected):
    ringing_at = T0 if rang is not None else None
    ended_at = T0 + timedelta(seconds=rang) if rang is not None else T0
    assert deserves_missed_call_email(status, ringing_at, ended_at) is expected


def row(**kw) -> dict:
    base = {"invitation_status": "missed", "ringing_at": T0, "ended_at": T0 + timedelta(seconds=30),
            "callee_meta": {"full_name": "Bruno"}, "recipient_email": "bruno@example.test"}
    base.update(kw)
    return base


def test_an_email_goes_out_for_a_missed_call():
    assert skip_reason(row()) is None
    assert skip_reason(row(callee_meta={"missed_call_emails": True})) is None


@pytest.mark.parametrize("changes, why", [
    ({"callee_meta": {"missed_call_emails": False}}, "missed_call_emails is false"),
    ({"callee_meta": {"missed_call_emails": "false"}}, "missed_call_emails is false"),
    ({"recipient_email": None}, "no email address"),
    ({"invitation_status": "declined"}, "declined does not call for"),
    ({"invitation_status": "cancelled", "ended_at": T0 + timedelta(seconds=1)}, "cancelled does not call for"),
])
def test_skip_reasons(changes, why):
    assert why in skip_reason(row(**changes))
