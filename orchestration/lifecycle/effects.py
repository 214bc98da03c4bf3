"""Effects run after commit. Each is idempotent; a failed one is logged and left to the sweeps
and LiveKit's own timeouts, which make every one of them certain."""

from __future__ import annotations

import json
from typing import Iterable

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


def run_effects(effects: Iterable, ports: Ports) -> None:
    effects = list(effects)
    # Ring deadlines go together (one round trip for a batch's); the rest one by one.
    deadlines = [(e.invitation_id, e.at) for e in effects if isinstance(e, ScheduleRingTimeout)]
    if deadlines:
        ports.scheduler.ring_timeouts(deadlines)
    for effect in effects:
        if isinstance(effect, ScheduleRingTimeout):
            continue
        try:
            _run(effect, ports)
        except RoomError as exc:
            log.warning("effect failed", effect=type(effect).__name__, error=str(exc))


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
    elif isinstance(effect, ReleaseRoom):
        # Under the room's lock, so a redial's new call cannot be given the room in between;
        # a newer live call in the room keeps it (its strangers are removed one by one).
        with ports.store.transaction(effect.room_name) as uow:
            live = uow.live_call_id(effect.room_name)
            if live is None or live == effect.call_id:
                ports.rooms.delete_room(effect.room_name)
    elif isinstance(effect, EnsureRoom):
        info = create_room(ports, effect.room_name)
        with ports.store.transaction(effect.room_name) as uow:
            uow.set_room_sid(effect.call_id, info.sid)
    else:  # pragma: no cover - a new effect type without its runner is a bug
        raise TypeError(f"unknown effect {effect!r}")
