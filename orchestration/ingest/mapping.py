"""Pure mapping of an invitation change to the `callflow.invitation_changed` task payload.

Three shapes come in, one shape goes out:

- a Supabase Realtime `postgres_changes` payload (`{"ids": [...], "data": {"type", "record",
  "old_record", "commit_timestamp", ...}}`; in the Python callback `data["type"]` is an enum);
- a Postgres NOTIFY payload of channel `callflow_invitations` (`{"op", "id", "status",
  "room_name", "updated_at", "status_by"}`, sent by the `call_invitations_notify` trigger);
- a `call_invitations` row read by the catch-up query.

The change (see docs/INTERNALS.md) is keyed by the contract's dedupe key
`realtime:<invitation id>:<status>`: one key per transition, whichever source saw it first.

A change that is the echo of a transition callflow's lifecycle worker made itself (`status_by`
is 'worker' in the row, the Realtime record or the notification, and the status is one only the
workers make: ringing, missed, busy, failed) is marked `worker_echo`: its effects were committed
with it, and the ingest sink drops it instead of handing it on.

`Change.to_wire()` / `Change.from_wire()` are the one codec of a change on its way to the workers:
the sink lists `to_wire()` (as JSON) on the changes backlog, a failed batch sends each on alone as
`callflow.invitation_changed` args `[to_wire()]`, the sweeps hand theirs on the same way, and the
tasks decode with `from_wire()` before the use case sees them. No I/O here.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from orchestration import names
from orchestration.domain.model import WORKER_ONLY

TASK_NAME = names.INVITATIONS_CHANGED
TASK_QUEUE = names.Q_EVENTS
STATUSES = frozenset({"pending", "ringing", "accepted", "declined", "cancelled", "missed", "busy", "failed"})
SOURCES = frozenset({"realtime", "postgres"})
# Who makes changes: the ingest sources above, and the sweeps (handed on through the same codec).
WIRE_SOURCES = SOURCES | {"sweep"}
# `status_by` of a transition the lifecycle worker made (the database writes it: 20_invitations.sql).
BY_WORKER = "worker"
# Record columns copied into the change payload (small, no free-form metadata).
_PAYLOAD_COLUMNS = ("caller_id", "callee_id", "call_type", "created_at", "updated_at")


class MalformedChange(ValueError):
    """The input is not a usable invitation change; the message says why (never secrets)."""


@dataclass(frozen=True, slots=True)
class Change:
    """"Look at this invitation now", as it travels from the listener, a catch-up or a sweep to the
    workers. `event_id` and `type` default to the transition's (`realtime:<id>:<status>`,
    `invitation_<status>`); a sweep names its own. `by_worker`: the status was made by the
    lifecycle worker (the row's `status_by`)."""

    invitation_id: str
    status: str
    source: str
    room_name: str | None
    occurred_at: str | None
    payload: dict[str, Any]
    event_id: str = ""
    type: str = ""
    by_worker: bool = False

    def __post_init__(self) -> None:
        if not self.event_id:
            object.__setattr__(self, "event_id", event_id(self.invitation_id, self.status))
        if not self.type:
            object.__setattr__(self, "type", f"invitation_{self.status}")

    @property
    def worker_echo(self) -> bool:
        return is_worker_echo(self.status, BY_WORKER if self.by_worker else None)

    def to_wire(self) -> dict[str, Any]:
        """The change as a JSON-able dict: the changes backlog's item and `invitation_changed`'s argument."""
        wire = {
            "event_id": self.event_id,
            "source": self.source,
            "type": self.type,
            "invitation_id": self.invitation_id,
            "status": self.status,
            "room_name": self.room_name,
            "occurred_at": self.occurred_at,
            "payload": self.payload,
        }
        if self.by_worker:  # absent: not the worker's (an echo is dropped before it is listed anyway)
            wire["status_by"] = BY_WORKER
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> "Change":
        """`to_wire()`'s dict back (after JSON). Lenient as the use case always was with what it
        was handed (a task kept for `callflow tasks retry` may be older than this code): a missing
        event id or type is the transition's, an unknown source is `realtime`; the invitation is
        re-read anyway, and one that does not exist is recorded as such."""
        if not isinstance(wire, Mapping):
            raise MalformedChange("a change is not an object")
        source = wire.get("source")
        payload = wire.get("payload")
        occurred_at = wire.get("occurred_at")
        return cls(
            invitation_id=str(wire.get("invitation_id") or ""),
            status=str(wire.get("status") or ""),
            source=source if source in WIRE_SOURCES else "realtime",
            room_name=wire.get("room_name"),
            occurred_at=str(occurred_at) if occurred_at else None,
            payload=dict(payload) if isinstance(payload, Mapping) else {},
            event_id=str(wire.get("event_id") or ""),
            type=str(wire.get("type") or ""),
            by_worker=wire.get("status_by") == BY_WORKER,
        )


def is_worker_echo(status: str, status_by: str | None) -> bool:
    """The echo of a transition only workers make (ringing, missed, busy, failed), made by the
    lifecycle worker itself: its effects were committed with it, nothing to hand on. (A worker's
    accepted or cancelled is handed on as before: the sweep looks for those it never saw.)"""
    return status_by == BY_WORKER and status in WORKER_ONLY


def event_id(invitation_id: str, status: str) -> str:
    return f"realtime:{invitation_id}:{status}"


def dedupe_key(invitation_id: str, status: str) -> str:
    """The Redis key that makes one transition enqueue once (across listeners and catch-ups)."""
    return names.ingest_seen_key(event_id(invitation_id, status))


def _uuid(value: Any) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except (ValueError, TypeError, AttributeError):
        raise MalformedChange(f"invitation id is not a uuid: {str(value)[:60]!r}") from None


def _status(value: Any) -> str:
    if not isinstance(value, str) or value not in STATUSES:
        raise MalformedChange(f"unknown invitation status {str(value)[:40]!r}")
    return value


def _room(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedChange("room_name is not a string")
    return value


def iso(value: Any) -> str | None:
    """ISO 8601 (UTC) of a datetime or of a timestamp string as Postgres/Realtime print them."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        text = value.strip().replace(" ", "T", 1)
        if text.endswith("Z"):
            text = text[:-1] + "+00:00"
        elif len(text) >= 3 and text[-3] in "+-" and text[-2:].isdigit() and ":" not in text[-3:]:
            text = text + ":00"  # Postgres prints "+00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise MalformedChange(f"timestamp is malformed: {value[:40]!r}") from None
    else:
        raise MalformedChange("timestamp is not a string")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat()


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def _enum_text(value: Any) -> str:
    # realtime-py hands an enum whose str() is not its value.
    return str(getattr(value, "value", value)).upper()


def from_realtime(message: Mapping[str, Any]) -> Change | None:
    """A `postgres_changes` payload (`{"ids", "data"}`, or just its `data`) to a change.

    Returns None for what is not an invitation insert/update (other tables, DELETE);
    raises MalformedChange for what cannot be understood.
    """
    if not isinstance(message, Mapping):
        raise MalformedChange("postgres_changes payload is not an object")
    data = message.get("data", message)
    if not isinstance(data, Mapping):
        raise MalformedChange("postgres_changes data is not an object")
    errors = data.get("errors")
    if errors:
        raise MalformedChange(f"server reported errors: {str(errors)[:120]}")
    if data.get("table") not in (None, "call_invitations") or data.get("schema") not in (None, "public"):
        return None
    kind = _enum_text(data.get("type"))
    if kind == "DELETE":
        return None
    if kind not in ("INSERT", "UPDATE"):
        raise MalformedChange(f"unknown change type {kind[:20]!r}")
    record = data.get("record")
    if not isinstance(record, Mapping):
        raise MalformedChange("change has no record")
    invitation_id = _uuid(record.get("id"))
    status = _status(record.get("status"))
    commit_ts = iso(data.get("commit_timestamp")) if data.get("commit_timestamp") else None
    updated_at = iso(record.get("updated_at")) if record.get("updated_at") else None
    payload = {"op": kind, "commit_timestamp": commit_ts}
    payload.update({c: _jsonable(record.get(c)) for c in _PAYLOAD_COLUMNS if c in record})
    return Change(invitation_id, status, "realtime", _room(record.get("room_name")), updated_at or commit_ts, payload,
                  by_worker=record.get("status_by") == BY_WORKER)


def from_notify(raw: str | bytes | Mapping[str, Any]) -> Change:
    """A NOTIFY payload of channel `callflow_invitations` to a change."""
    if isinstance(raw, (str, bytes)):
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise MalformedChange("notification payload is not JSON") from None
    else:
        data = raw
    if not isinstance(data, Mapping):
        raise MalformedChange("notification payload is not an object")
    op = str(data.get("op", "")).upper()
    if op not in ("INSERT", "UPDATE"):
        raise MalformedChange(f"unknown op {op[:20]!r}")
    updated_at = iso(data.get("updated_at"))
    return Change(_uuid(data.get("id")), _status(data.get("status")), "postgres", _room(data.get("room_name")),
                  updated_at, {"op": op, "updated_at": updated_at}, by_worker=data.get("status_by") == BY_WORKER)


def from_row(row: Mapping[str, Any], source: str = "postgres") -> Change:
    """A `call_invitations` row (catch-up) to a change: "look at this invitation now"."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}")
    updated_at = iso(row.get("updated_at"))
    payload = {"op": "CATCH_UP"}
    payload.update({c: _jsonable(row.get(c)) for c in _PAYLOAD_COLUMNS if c in row})
    return Change(_uuid(row.get("id")), _status(row.get("status")), source, _room(row.get("room_name")),
                  updated_at, payload, by_worker=row.get("status_by") == BY_WORKER)
