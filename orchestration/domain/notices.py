"""Missed-call notices (the email and the `missed_call` push): who turned them off, and the repeat window.

The contract: a user whose `raw_user_meta_data.missed_call_emails` is `false` gets none, and within
`CALLFLOW_EMAIL_REPEAT_WINDOW_SECONDS` after the `created_at` of the pair's (caller, callee) last
`pending` or `sent` one, the next is `skipped` too (skipped and failed ones don't count). The push
follows the email's rules, each counting its own: emails count emails, `missed_call` pushes count
`missed_call` pushes. Whether an ended invitation earns a notice at all is
`model.deserves_missed_call_email`.

Who uses it: the outbox decides at insert, in one statement under the pair's lock
(`PostgresUnitOfWork.add_missed_call_notifications` and `add_pushes`, which take their reasons'
texts from here); the email's delivery asks `skip_reason` again before it sends (opt-out, address);
the fake store asks `notice_skip_reason` itself. `tests/integration/test_rules_match_sql.py` holds
the SQL equal to this on generated users and histories.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterable, Literal, Mapping

Channel = Literal["email", "push"]

MISSED_CALL = "missed_call"
# Notices of the pair that start its repeat window (the others, `skipped` and `failed`, don't).
COUNTING_STATUSES = frozenset({"pending", "sent"})

OPTED_OUT = {
    "email": "recipient turned missed-call emails off (raw_user_meta_data.missed_call_emails is false)",
    "push": "recipient turned missed-call notices off",
}
NO_ADDRESS = "recipient has no email address"


def repeat_reason(channel: Channel, window_seconds: float) -> str:
    seconds = f"{window_seconds:.6f}".rstrip("0").rstrip(".")  # 900, 0.5 (a timestamp's microseconds)
    return (f"a missed-call {channel} from this caller reached this recipient within {seconds} s "
            "(CALLFLOW_EMAIL_REPEAT_WINDOW_SECONDS)")


def opted_out(meta: object) -> bool:
    """`raw_user_meta_data.missed_call_emails` is false: JSON `false`, or the text "false" in any
    case (what a form may write); metadata that is no object turns nothing off."""
    if not isinstance(meta, Mapping):
        return False
    value = meta.get("missed_call_emails", True)
    return value is False or (isinstance(value, str) and value.lower() == "false")


def has_address(email: str | None) -> bool:
    """An address that is more than spaces (as the delivery reads it: `btrim`)."""
    return bool(email and email.strip(" "))


@dataclass(frozen=True)
class EarlierNotice:
    """A notice already in the outbox: an email, or one push message (one device's)."""

    caller_id: str       # the invitation's caller
    recipient_id: str    # the invitation's callee
    status: str          # pending | sent | failed | skipped
    created_at: datetime
    kind: str = MISSED_CALL


def within_repeat_window(earlier: Iterable[EarlierNotice], caller_id: str, recipient_id: str, now: datetime,
                         window: timedelta) -> bool:
    """Whether the pair had a counting notice created less than `window` before `now`."""
    since = now - window
    return any(n.kind == MISSED_CALL and n.caller_id == caller_id and n.recipient_id == recipient_id
               and n.status in COUNTING_STATUSES and n.created_at > since for n in earlier)


def notice_skip_reason(channel: Channel, *, caller_id: str, recipient_id: str, recipient_meta: object,
                       recipient_email: str | None, earlier: Iterable[EarlierNotice], now: datetime,
                       window: timedelta) -> str | None:
    """Why a new missed-call notice of `channel` is born `skipped`, or None: it is `pending`.

    `earlier`: the channel's notices already in the outbox (those of this same decision not among
    them: the outbox decides a batch against what was there before it). The first reason wins:
    opted out, then (emails) no address, then the repeat window."""
    if opted_out(recipient_meta):
        return OPTED_OUT[channel]
    if channel == "email" and not has_address(recipient_email):
        return NO_ADDRESS
    if within_repeat_window(earlier, caller_id, recipient_id, now, window):
        return repeat_reason(channel, window.total_seconds())
    return None
