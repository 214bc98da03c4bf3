"""Effects run after commit. Each is idempotent. Room actions are written down with the decision
and retried until LiveKit answers (`room_actions.py`); timers and outbox rows have the sweeps
behind them."""

from __future__ import annotations

from typing import Callable, Iterable

import structlog

from orchestration.domain.decision import ROOM_ACTIONS, ScheduleGrace, ScheduleRingTimeout, SendNotification, SendPushes
from orchestration.domain.model import WORKER_ONLY
from orchestration.lifecycle import room_actions
from orchestration.lifecycle.context import Ports

log = structlog.get_logger("callflow.lifecycle")


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
    # Ring deadlines go together (one round trip for a batch's); room actions together (rooms are
    # released side by side, under one transaction's locks: DeleteRoom is LiveKit's costliest
    # call); the rest one by one.
    deadlines = [(e.invitation_id, e.at) for e in effects if isinstance(e, ScheduleRingTimeout)]
    if deadlines:
        ports.scheduler.ring_timeouts(deadlines)
    in_rooms = [e for e in effects if isinstance(e, ROOM_ACTIONS)]
    if in_rooms:
        room_actions.run(in_rooms, ports, parallel_map)
    for effect in effects:
        if isinstance(effect, ScheduleGrace):
            ports.scheduler.grace_expiry(effect.room_name, effect.participant_sid, effect.identity,
                                         effect.aborted, ports.config.grace)
        elif isinstance(effect, SendNotification):
            ports.scheduler.send_notification(effect.notification_id)
        elif isinstance(effect, SendPushes):
            ports.scheduler.send_pushes(list(effect.message_ids))
        elif not isinstance(effect, (ScheduleRingTimeout, *ROOM_ACTIONS)):  # pragma: no cover - a bug
            raise TypeError(f"unknown effect {effect!r}")
