"""Effects run after commit. Each is idempotent; a failed one is logged and left to the sweeps
and LiveKit's own timeouts, which make every one of them certain."""

from __future__ import annotations

import json
from typing import Callable, Iterable

import structlog

from orchestration.domain.model import WORKER_ONLY
from orchestration.lifecycle.context import Ports
from orchestration.lifecycle.state import (
    EnsureRoom,
    ReleaseRoom,
    RemoveParticipant,
    ScheduleGrace,
    ScheduleRingTimeout,
    SendNotification,
    SendPushes,
)
from orchestration.ports import RoomError, RoomInfo

log = structlog.get_logger("callflow.lifecycle")


def create_room(ports: Ports, room_name: str) -> RoomInfo:
    cfg = ports.config
    return ports.rooms.create_room(room_name, empty_timeout=cfg.empty_timeout,
                                   departure_timeout=cfg.departure_timeout,
                                   max_participants=cfg.max_participants,
                                   metadata=json.dumps({"callflow": True}))


def apply_decision(uow, decision, ports: Ports) -> list:
    """Write the decision in the open transaction; returns every effect to run after commit.

    Before the commit, the listener is told to expect the echo of each worker-only transition
    (its dedupe mark is set): the change would come back as a task that only records itself. Set
    early, a mark of a transaction that then rolls back suppresses an echo with no work in it.
    """
    echoes = [(inv.id, str(inv.status)) for inv in decision.invitations if inv.status in WORKER_ONLY]
    if echoes:
        ports.scheduler.expect_echoes(echoes)
    return decision.effects + uow.apply(decision)


def run_effects(effects: Iterable, ports: Ports, parallel_map: Callable = map) -> None:
    effects = list(effects)
    # Ring deadlines go together (one round trip for a batch's), rooms are released together
    # (LiveKit's DeleteRoom is its costliest call: side by side, under one transaction's locks);
    # the rest one by one.
    deadlines = [(e.invitation_id, e.at) for e in effects if isinstance(e, ScheduleRingTimeout)]
    if deadlines:
        ports.scheduler.ring_timeouts(deadlines)
    releases = [e for e in effects if isinstance(e, ReleaseRoom)]
    if releases:
        release_rooms(releases, ports, parallel_map)
    for effect in effects:
        if isinstance(effect, (ScheduleRingTimeout, ReleaseRoom)):
            continue
        try:
            _run(effect, ports)
        except RoomError as exc:
            log.warning("effect failed", effect=type(effect).__name__, error=str(exc))


def release_rooms(releases: list[ReleaseRoom], ports: Ports, parallel_map: Callable = map) -> None:
    """Delete the rooms of ended calls. Under the rooms' locks, so a redial's new call cannot be
    given a room in between; a newer live call in a room keeps it (its strangers are removed one
    by one). A room LiveKit fails to delete is left to its empty timeout."""
    ended: dict[str, set[str]] = {}
    for e in releases:
        ended.setdefault(e.room_name, set()).add(e.call_id)
    with ports.store.transaction(*ended) as uow:
        live = uow.live_call_ids(ended)
        doomed = [room for room, calls in ended.items() if room not in live or live[room] in calls]

        def delete(room: str) -> None:
            try:
                ports.rooms.delete_room(room)
            except RoomError as exc:
                log.warning("effect failed", effect="ReleaseRoom", room_name=room, error=str(exc))

        list(parallel_map(delete, doomed))


def _run(effect, ports: Ports) -> None:
    if isinstance(effect, ScheduleGrace):
        ports.scheduler.grace_expiry(effect.room_name, effect.participant_sid, effect.identity,
                                     effect.aborted, ports.config.grace)
    elif isinstance(effect, SendNotification):
        ports.scheduler.send_notification(effect.notification_id)
    elif isinstance(effect, SendPushes):
        ports.scheduler.send_pushes(list(effect.message_ids))
    elif isinstance(effect, RemoveParticipant):
        # Rights are checked again just before: they may have been invited since.
        with ports.store.transaction(effect.room_name) as uow:
            if uow.is_party(effect.room_name, effect.identity):
                return
        ports.rooms.remove_participant(effect.room_name, effect.identity)
    elif isinstance(effect, EnsureRoom):
        info = create_room(ports, effect.room_name)
        with ports.store.transaction(effect.room_name) as uow:
            uow.set_room_sid(effect.call_id, info.sid)
    else:  # pragma: no cover - a new effect type without its runner is a bug
        raise TypeError(f"unknown effect {effect!r}")
