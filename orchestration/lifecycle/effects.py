"""Effects run after commit. Each is idempotent. Room actions are written down with the decision
and retried until LiveKit answers (`room_actions.py`); timers and outbox rows have the sweeps
behind them."""

from __future__ import annotations

from typing import Callable, Iterable

import structlog

from orchestration import names
from orchestration.domain.decision import ROOM_ACTIONS, ScheduleGrace, ScheduleRingTimeout, SendNotification, SendPushes
from orchestration.lifecycle import room_actions
from orchestration.lifecycle.context import Ports

log = structlog.get_logger("callflow.lifecycle")


def apply_decision(uow, decision, ports: Ports) -> list:
    """Write the decision in the open transaction; returns every effect to run after commit.

    The store writes the decision's transitions as the worker's (the row's `status_by`, in this
    same transaction), so the listener drops their echoes where they arrive; nothing is said to
    the listener beforehand.
    """
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
            ports.scheduler.deliver(names.CHANNEL_EMAIL, [effect.notification_id])
        elif not isinstance(effect, (SendPushes, ScheduleRingTimeout, *ROOM_ACTIONS)):  # pragma: no cover - a bug
            raise TypeError(f"unknown effect {effect!r}")
    # Pushes last: a worker makes their first try itself (the scheduler's), and a provider's
    # request must not hold up a deadline, a room or a hand-off behind it. Each provider's rows go
    # to its own channel, the channels side by side: an Android phone does not wait for APNs.
    by_channel: dict[str, list[str]] = {}
    for effect in effects:
        if isinstance(effect, SendPushes):
            for provider, ids in effect.by_provider:
                by_channel.setdefault(names.PUSH_CHANNELS[provider], []).extend(ids)
    list(parallel_map(lambda item: ports.scheduler.deliver(*item), list(by_channel.items())))
