"""Ringing like a phone, on the fakes: which devices get which push, and each provider's rows queued
to its own channel.

An `apns_voip` device gets `incoming_call` only; `expo` and `fcm` devices every kind
(`domain.decision.push_goes_to`, held equal to `add_pushes`' SQL by
tests/integration/test_rules_match_sql.py). A decision's pending pushes become one `SendPushes`
grouped by provider, and the effect one `deliver` per provider that has rows
(`names.PUSH_CHANNELS`).
"""

from __future__ import annotations

from datetime import datetime, timezone

from orchestration import names
from orchestration.domain.decision import Decision, Push, SendPushes, push_goes_to
from orchestration.domain.model import InvitationStatus as S
from orchestration.ingest.mapping import Change
from orchestration.lifecycle.context import LifecycleConfig, Ports
from orchestration.lifecycle.effects import run_effects
from orchestration.lifecycle.invitation_changed import handle_invitation_changed
from orchestration.lifecycle.ring_timeout import handle_ring_timeout
from tests.support.fakes import FakeClock, FakeScheduler, FakeStore
from tests.unit.test_lifecycle_model import LiveKitSim

RING, GRACE = 30.0, 5.0
DEVICES = {"bo-iphone-voip": "apns_voip", "bo-pixel": "fcm", "bo-expo": "expo"}


def world():
    clock = FakeClock()
    store = FakeStore(clock)
    store.push_tokens = {"bo": list(DEVICES)}
    store.push_providers = dict(DEVICES)
    scheduler = FakeScheduler()
    ports = Ports(store, LiveKitSim(clock), scheduler, LifecycleConfig(ring_timeout=RING, grace=GRACE))
    return clock, store, scheduler, ports


def test_the_rule():
    for kind in ("incoming_call", "call_ended", "missed_call"):
        assert push_goes_to("expo", kind) and push_goes_to("fcm", kind)
    assert push_goes_to("apns_voip", "incoming_call")
    assert not push_goes_to("apns_voip", "call_ended") and not push_goes_to("apns_voip", "missed_call")


def test_send_pushes_groups_ids_by_provider_in_the_order_met():
    send = SendPushes.of([("m1", "expo"), ("m2", "apns_voip"), ("m3", "expo"), ("m4", "fcm")])
    assert send.by_provider == (("expo", ("m1", "m3")), ("apns_voip", ("m2",)), ("fcm", ("m4",)))
    assert send.message_ids == ("m1", "m3", "m2", "m4")
    assert SendPushes.of([]) is None


def test_the_effect_queues_each_providers_rows_to_its_channel():
    _, _, scheduler, ports = world()
    run_effects([SendPushes((("expo", ("m1", "m3")), ("apns_voip", ("m2",)), ("fcm", ("m4",))))], ports)
    assert scheduler.deliveries == [(names.PUSH_CHANNELS["expo"], ["m1", "m3"]),
                                    (names.PUSH_CHANNELS["apns_voip"], ["m2"]),
                                    (names.PUSH_CHANNELS["fcm"], ["m4"])]
    assert [c for c, _ in scheduler.deliveries] == [names.CHANNEL_EXPO, names.CHANNEL_APNS_VOIP, names.CHANNEL_FCM]


def test_a_missed_call_rings_every_device_and_tells_all_but_the_voip_one():
    clock, store, scheduler, ports = world()
    inv = store.insert_invitation("ana", "bo", "r1")
    handle_invitation_changed(Change(inv.id, "pending", "realtime", None, None, {}), ports)
    assert store.invitations[inv.id].status == S.RINGING
    # One deliver per provider: each channel gets its own device's incoming call.
    rang = [(channel, len(ids)) for channel, ids in scheduler.deliveries]
    assert sorted(rang) == sorted([(names.CHANNEL_APNS_VOIP, 1), (names.CHANNEL_FCM, 1), (names.CHANNEL_EXPO, 1)])
    scheduler.deliveries.clear()

    clock.advance(RING + 0.5)
    handle_ring_timeout(inv.id, "timer", ports)
    assert store.invitations[inv.id].status == S.MISSED
    got = {(kind, DEVICES[token]) for (kind, i, token), status in store.push_messages.items()
           if i == inv.id and status == "pending"}
    assert got == {("incoming_call", "apns_voip"), ("incoming_call", "fcm"), ("incoming_call", "expo"),
                   ("call_ended", "fcm"), ("call_ended", "expo"), ("missed_call", "fcm"), ("missed_call", "expo")}
    # call_ended and missed_call: to the Expo and FCM channels only, once each (both kinds together).
    assert sorted((channel, len(ids)) for channel, ids in scheduler.deliveries
                  if channel in names.PUSH_CHANNELS.values()) == [(names.CHANNEL_EXPO, 2), (names.CHANNEL_FCM, 2)]


def test_a_callee_with_only_a_voip_device_gets_no_delivery_after_the_ring():
    clock, store, scheduler, ports = world()
    store.push_tokens = {"bo": ["bo-iphone-voip"]}
    with store.transaction("r1") as uow:
        follow = uow.apply(Decision("test", outbox=[Push("call_ended", "inv-1", "ana", "bo"),
                                                    Push("missed_call", "inv-1", "ana", "bo")]))
    assert not [f for f in follow if isinstance(f, SendPushes)] and not store.push_messages
    with store.transaction("r1") as uow:
        follow = uow.apply(Decision("test", outbox=[Push("incoming_call", "inv-1", "ana", "bo",
                                                         datetime(2030, 1, 1, tzinfo=timezone.utc))]))
    sends = [f for f in follow if isinstance(f, SendPushes)]
    assert len(sends) == 1 and [p for p, _ in sends[0].by_provider] == ["apns_voip"]
    assert len(sends[0].message_ids) == 1
