"""Room actions: what callflow must do in a LiveKit room, done until LiveKit has answered.

Three kinds (the effects `EnsureRoom`, `ReleaseRoom`, `RemoveParticipant` of
`orchestration/domain/decision.py`): make the room of a live call that has none, delete the room of
an ended call (everyone out), remove someone with no right to be there. The decision that calls for one writes it down in the same
transaction (`callflow_room_actions`, under the effect's `key`); the worker runs it right after
commit and strikes it off once LiveKit answers. Until then it stays written down: a failure sets
its next attempt with backoff, and the sweep (`retry_due`) takes whatever is due, so an action
outlives a LiveKit outage and the death of the worker that decided it.

LiveKit giving no answer (`RoomUnanswered`) is retried; LiveKit refusing (`RoomRefused`) is an
answer: logged and struck off. Every action is checked again when it runs (the room may hold a
newer call, the stranger may have been invited since, the call may have ended).
"""

from __future__ import annotations

import json
from typing import Callable, Iterable

import structlog

from orchestration.backoff import backoff_delay
from orchestration.domain.decision import EnsureRoom, ReleaseRoom, RemoveParticipant
from orchestration.lifecycle.context import Ports
from orchestration.ports import RoomError, RoomInfo, RoomRefused

log = structlog.get_logger("callflow.lifecycle")

# Retries of one action: 0.5 s, 1 s, 2 s, 4 s, then every 5 s while LiveKit gives no answer (so
# once it answers again, a room is deleted within the cap plus a sweep interval: under 10 s).
RETRY_BASE_SECONDS = 0.5
RETRY_CAP_SECONDS = 5.0
# The sweep takes due actions for this long (another sweep leaves them alone meanwhile).
LEASE_SECONDS = 10.0
# How many due actions one sweep takes.
TAKE_AT_MOST = 200


def create_room(ports: Ports, room_name: str) -> RoomInfo:
    cfg = ports.config
    return ports.rooms.create_room(room_name, empty_timeout=cfg.empty_timeout,
                                   departure_timeout=cfg.departure_timeout,
                                   max_participants=cfg.max_participants,
                                   metadata=json.dumps({"callflow": True}))


def retry_delay(attempt: int) -> float:
    return backoff_delay(attempt, RETRY_BASE_SECONDS, RETRY_CAP_SECONDS, jitter=False)


class _Tally:
    """What became of each action of one run: struck off, or to be tried again (and why)."""

    def __init__(self, attempts: dict[str, int]) -> None:
        self.attempts = attempts
        self.done: list[str] = []
        self.failed: list[tuple[str, float, str]] = []

    def result(self, action, error: Exception | None) -> None:
        if error is None:
            self.done.append(action.key)
        elif isinstance(error, RoomRefused):
            log.error("LiveKit refused a room action", action=type(action).__name__, room_name=action.room_name,
                      error=str(error))
            self.done.append(action.key)
        else:
            attempt = self.attempts.get(action.key, 0) + 1
            log.warning("room action failed, will retry", action=type(action).__name__, room_name=action.room_name,
                        attempt=attempt, error=str(error))
            self.failed.append((action.key, retry_delay(attempt), str(error)[:500]))

    def write(self, uow) -> None:
        if self.done:
            uow.room_actions_done(self.done)
        if self.failed:
            uow.room_actions_failed(self.failed)
        self.done, self.failed = [], []


def run(actions: Iterable, ports: Ports, parallel_map: Callable = map, attempts: dict[str, int] | None = None) -> None:
    """Run these room actions now; strike off what LiveKit answered, re-time the rest."""
    actions = list(actions)
    tally = _Tally(attempts or {})
    releases = [a for a in actions if isinstance(a, ReleaseRoom)]
    if releases:
        _release(releases, ports, parallel_map, tally)
    others = [a for a in actions if not isinstance(a, ReleaseRoom)]
    if not others:
        return
    for action in others:
        try:
            if isinstance(action, RemoveParticipant):
                _remove(action, ports)
            else:
                _make(action, ports)
        except RoomError as exc:
            tally.result(action, exc)
        else:
            tally.result(action, None)
    with ports.store.transaction() as uow:
        tally.write(uow)


def _release(releases: list[ReleaseRoom], ports: Ports, parallel_map: Callable, tally: _Tally) -> None:
    """Delete the rooms of ended calls. Under the rooms' locks, so a redial's new call cannot be
    given a room in between; a newer live call in a room keeps it (its strangers are removed one
    by one by the sweep), and that release is done."""
    ended: dict[str, set[str]] = {}
    for e in releases:
        ended.setdefault(e.room_name, set()).add(e.call_id)
    with ports.store.transaction(*ended) as uow:
        live = uow.live_call_ids(ended)
        doomed = [room for room, calls in ended.items() if room not in live or live[room] in calls]

        def delete(room: str) -> Exception | None:
            try:
                ports.rooms.delete_room(room)
                return None
            except RoomError as exc:
                return exc

        errors = dict(zip(doomed, parallel_map(delete, doomed)))
        for e in releases:
            tally.result(e, errors.get(e.room_name))
        tally.write(uow)


def _remove(action: RemoveParticipant, ports: Ports) -> None:
    # Rights are checked again just before: they may have been invited since.
    with ports.store.transaction(action.room_name) as uow:
        if uow.is_party(action.room_name, action.identity):
            return
    ports.rooms.remove_participant(action.room_name, action.identity)


def _make(action: EnsureRoom, ports: Ports) -> None:
    # Only for a call still live in that room: an ended call's room would be made for nobody.
    with ports.store.transaction(action.room_name) as uow:
        if uow.live_call_ids([action.room_name]).get(action.room_name) != action.call_id:
            return
        info = create_room(ports, action.room_name)
        uow.set_room_sid(action.call_id, info.sid)


def from_row(row: dict):
    kind, room = row["action"], row["room_name"]
    if kind == "make":
        return EnsureRoom(room, str(row["call_id"]))
    if kind == "release":
        return ReleaseRoom(room, str(row["call_id"]))
    return RemoveParticipant(room, row["identity"], row["participant_sid"])


def retry_due(ports: Ports, parallel_map: Callable = map, limit: int = TAKE_AT_MOST) -> int:
    """The sweep's part: every action whose next attempt is due (a failed one, or one whose worker
    died before it ran), run again. Returns how many were taken."""
    with ports.store.transaction() as uow:
        rows = uow.take_due_room_actions(limit, LEASE_SECONDS)
    if not rows:
        return 0
    run([from_row(r) for r in rows], ports, parallel_map, {r["key"]: r["attempts"] for r in rows})
    return len(rows)

