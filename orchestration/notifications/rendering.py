"""The missed-call email: subject, HTML and plain text, from the templates in the package.

Pure functions of the outbox row's data (no clock, no I/O besides reading the packaged templates),
so every attempt for one outbox row renders the very same body: Resend refuses a repeated
Idempotency-Key with a different body (409 invalid_idempotent_request).

Display names are user input (`raw_user_meta_data`): they are cleaned of control and bidi
characters, shortened, and HTML-escaped in the HTML part.
"""

from __future__ import annotations

import functools
import html
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from importlib import resources
from string import Template
from zoneinfo import ZoneInfo

MAX_NAME_LENGTH = 80
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    html: str
    text: str


@dataclass(frozen=True)
class MissedCall:
    """What the email says; built from the outbox row, the invitation and both users."""

    caller_name: str | None
    callee_name: str | None
    call_type: str  # audio | video
    outcome: str  # missed | busy | cancelled
    at: datetime  # when the call came in (aware)
    zone: tzinfo
    app_url: str


def display_name(meta: dict | None) -> str | None:
    """`full_name` or `name` of a user's metadata, cleaned for use in a subject and a body."""
    if not isinstance(meta, dict):
        return None
    for key in ("full_name", "name"):
        value = meta.get(key)
        if isinstance(value, str):
            cleaned = clean_text(value)
            if cleaned:
                return cleaned
    return None


def clean_text(value: str) -> str:
    # Control characters (CR/LF would break headers) and format characters (bidi overrides that
    # could disguise the name) go; runs of whitespace become one space.
    kept = "".join(" " if ch.isspace() else ch for ch in value
                   if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn"))
    kept = _SPACES.sub(" ", kept).strip()
    if len(kept) > MAX_NAME_LENGTH:
        kept = kept[: MAX_NAME_LENGTH - 1].rstrip() + "…"
    return kept


def recipient_zone(meta: dict | None) -> tzinfo:
    """The IANA zone of `raw_user_meta_data.timezone`; UTC when missing or unknown."""
    name = meta.get("timezone") if isinstance(meta, dict) else None
    if isinstance(name, str) and name.strip():
        try:
            return ZoneInfo(name.strip())
        except Exception:  # noqa: BLE001 - ZoneInfoNotFoundError, ValueError (bad key), OSError
            pass
    return timezone.utc


def format_when(at: datetime, zone: tzinfo) -> str:
    """'Wednesday, 25 November 2026 at 10:00 (Europe/Lisbon)': locale-independent."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    local = at.astimezone(zone)
    label = getattr(zone, "key", None) or "UTC"
    return f"{_WEEKDAYS[local.weekday()]}, {local.day} {_MONTHS[local.month - 1]} {local.year} at {local:%H:%M} ({label})"


def subject_for(call: MissedCall) -> str:
    kind = "audio" if call.call_type == "audio" else "video"
    return f"Missed {kind} call from {call.caller_name}" if call.caller_name else f"Missed {kind} call"


def _headline(call: MissedCall, kind: str) -> str:
    who = call.caller_name or "Someone"
    if call.outcome == "busy":
        return f"{who} tried to reach you on a{'n' if kind == 'audio' else ''} {kind} call while you were on another call."
    if call.outcome == "cancelled":
        return f"{who} tried to reach you on a{'n' if kind == 'audio' else ''} {kind} call but hung up before you could answer."
    if call.caller_name:
        return f"You missed a{'n' if kind == 'audio' else ''} {kind} call from {who}."
    return f"You missed a{'n' if kind == 'audio' else ''} {kind} call."


@functools.lru_cache(maxsize=None)
def _template(name: str) -> Template:
    return Template(resources.files("orchestration").joinpath("templates", name).read_text(encoding="utf-8"))


def render_missed_call(call: MissedCall) -> RenderedEmail:
    kind = "audio" if call.call_type == "audio" else "video"
    values = {
        "subject": subject_for(call),
        "greeting_name": call.callee_name or "there",
        "headline": _headline(call, kind),
        "when": format_when(call.at, call.zone),
        "call_kind": kind,
        "call_kind_title": kind.capitalize(),
        "app_url": call.app_url,
    }
    text = _template("missed_call.txt").substitute(values)
    html_body = _template("missed_call.html").substitute({k: html.escape(v, quote=True) for k, v in values.items()})
    return RenderedEmail(subject=values["subject"], html=html_body, text=text)
