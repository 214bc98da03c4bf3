"""Webhook bodies: what is a LiveKit `WebhookEvent` (protojson) and what is not; the Celery message."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timezone

import pytest
from celery.utils.time import utcoffset as celery_utcoffset

from orchestration.adapters.celery_messages import CeleryMessageBuilder, task_sent_channel
from orchestration.webhooks import LIVEKIT_EVENT_TYPES, InvalidEvent, livekit_event_args, parse_event


def event_body(kind: str, **extra) -> bytes:
    event = {"event": kind, "id": f"EV_{kind}", "createdAt": "1700000000",
             "room": {"sid": "RM_1", "name": "room-1", "creationTime": "1700000000"}}
    event.update(extra)
    return json.dumps(event).encode()


@pytest.mark.parametrize("kind", LIVEKIT_EVENT_TYPES)
def test_every_livekit_event_type_parses(kind):
    assert parse_event(event_body(kind))["event"] == kind


def test_fields_a_newer_server_adds_are_kept_not_refused():
    body = event_body("participant_joined", participant={"sid": "PA_1", "identity": "u", "futureThing": {"x": 1}},
                      brandNewEnvelopeField=[1, 2, 3])
    event = parse_event(body)
    assert event["brandNewEnvelopeField"] == [1, 2, 3]
    assert event["participant"]["futureThing"] == {"x": 1}


def test_an_event_name_this_version_does_not_know_is_accepted():
    assert parse_event(event_body("agent_dispatched"))["event"] == "agent_dispatched"


def test_createdat_as_number_is_accepted():
    assert parse_event(event_body("room_started", createdAt=1700000000))["createdAt"] == 1700000000


@pytest.mark.parametrize("body, why", [
    (b"", "not_json"),
    (b"not json", "not_json"),
    (b"\xff\xfe{}", "not_json"),
    (b'{"event": "room_started", "id": "EV_1", "x": NaN}', "not_json"),
    (b"[]", "bad_shape"),
    (b'"room_started"', "bad_shape"),
    (b"{}", "bad_shape"),
    (b'{"event": "room_started"}', "bad_shape"),
    (b'{"id": "EV_1"}', "bad_shape"),
    (b'{"event": "", "id": "EV_1"}', "bad_shape"),
    (b'{"event": "room_started", "id": 5}', "bad_shape"),
    (b'{"event": 1, "id": "EV_1"}', "bad_shape"),
    (b'{"event": "room_started", "id": "EV_1", "room": "r"}', "bad_shape"),
    (b'{"event": "room_started", "id": "EV_1", "participant": []}', "bad_shape"),
    (b'{"event": "room_started", "id": "EV_1", "createdAt": true}', "bad_shape"),
    (b'{"event": "room_started", "id": "' + b"x" * 300 + b'"}', "bad_shape"),
    (b"[" * 100000 + b"]" * 100000, "not_json"),
    (b'{"event": "room_started", "id": "EV_\\ud800"}', "not_json"),  # a lone surrogate: not storable as jsonb
])
def test_what_is_not_a_webhook_event(body, why):
    with pytest.raises(InvalidEvent) as info:
        parse_event(body)
    assert info.value.reason == why and info.value.status == 400 and info.value.code == "invalid_request"


def decode(message: bytes) -> tuple[dict, list]:
    envelope = json.loads(message)
    return envelope, json.loads(base64.b64decode(envelope["body"]))


def build_event_task(builder: CeleryMessageBuilder, body: bytes, received_at: str) -> bytes:
    """A `callflow.livekit_event(event, received_at)` message from the arguments the webhook lists."""
    event = parse_event(body)
    return builder.build_from_json(livekit_event_args(body, received_at),
                                   f"[{{'event': {event['event']!r}, 'id': {event['id']!r}, ...}}, {received_at!r}]")


def test_the_listed_arguments_carry_the_body_as_sent():
    body = b'{"event": "room_started",\n "id": "EV_1", "room": {"name": "r\u00fc", "x": 1.50}}'
    listed = livekit_event_args(body, "2030-01-01T00:00:00+00:00")
    assert listed == b"[" + body + b', "2030-01-01T00:00:00+00:00"]'
    assert json.loads(listed) == [json.loads(body), "2030-01-01T00:00:00+00:00"]


def test_celery_message_carries_the_body_as_sent_and_received_at():
    builder = CeleryMessageBuilder.for_task("callflow.livekit_event", "events")
    body = event_body("participant_joined", participant={"sid": "PA_1", "identity": "ü-ser", "joinedAt": "17"})
    envelope, (args, kwargs, embed) = decode(build_event_task(builder, body, "2030-01-01T00:00:00+00:00"))
    assert args == [json.loads(body), "2030-01-01T00:00:00+00:00"] and kwargs == {}
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    headers, props = envelope["headers"], envelope["properties"]
    assert headers["task"] == "callflow.livekit_event" and headers["lang"] == "py"
    assert headers["id"] == headers["root_id"] == props["correlation_id"] == props["delivery_tag"]
    assert props["delivery_info"] == {"exchange": "", "routing_key": "events"}
    assert props["body_encoding"] == "base64" and props["priority"] == 0 and props["delivery_mode"] == 2
    assert envelope["content-type"] == "application/json" and envelope["content-encoding"] == "utf-8"
    assert "EV_participant_joined" in headers["argsrepr"]


def test_each_message_has_its_own_task_id():
    builder = CeleryMessageBuilder.for_task("callflow.livekit_event", "events")
    body = event_body("room_started")
    ids = {json.loads(build_event_task(builder, body, "t"))["headers"]["id"] for _ in range(500)}
    other = CeleryMessageBuilder.for_task("callflow.livekit_event", "events")
    ids |= {json.loads(build_event_task(other, body, "t"))["headers"]["id"] for _ in range(500)}
    assert len(ids) == 1000
    assert all(uuid.UUID(i).version == 4 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)


def test_percent_signs_anywhere_are_kept():
    builder = CeleryMessageBuilder("callflow.livekit_event", "events", origin="gen1@host%name", reply_to="r%s")
    body = json.dumps({"event": "room_started", "id": "EV_%s%(ID)s", "room": {"name": "100%"}}).encode()
    envelope, (args, _kw, _embed) = decode(build_event_task(builder, body, "t"))
    assert envelope["headers"]["origin"] == "gen1@host%name" and envelope["properties"]["reply_to"] == "r%s"
    assert args[0]["id"] == "EV_%s%(ID)s" and args[0]["room"]["name"] == "100%"


def test_marker_like_text_in_the_event_is_not_substituted():
    builder = CeleryMessageBuilder.for_task("callflow.livekit_event", "events")
    body = json.dumps({"event": "room_started", "id": "@@BODY@@", "room": {"name": "@@ID@@ \"@@ARGSREPR@@\""}}).encode()
    envelope, (args, _kw, _embed) = decode(build_event_task(builder, body, "t"))
    assert args[0]["id"] == "@@BODY@@" and args[0]["room"]["name"] == '@@ID@@ "@@ARGSREPR@@"'
    assert "@@BODY@@" in envelope["headers"]["argsrepr"]


def test_generic_build_matches_args():
    builder = CeleryMessageBuilder.for_task("callflow.ping", "timers")
    envelope, (args, _kw, _embed) = decode(builder.build(["token-1"], task_id="abc"))
    assert args == ["token-1"] and envelope["headers"]["id"] == "abc"
    assert envelope["properties"]["delivery_info"]["routing_key"] == "timers"


def test_the_task_sent_event_names_its_message():
    builder = CeleryMessageBuilder("callflow.ring_timeouts_due", "timers", origin="gen1@host%name", reply_to="r")
    eta = datetime(2030, 1, 1, 0, 0, 0, 250000, tzinfo=timezone.utc)
    events = []
    for _ in range(2):
        message, sent_event = builder.prebuilt([1.25], eta=eta)
        headers = json.loads(message)["headers"]
        envelope, event = decode(sent_event)
        events.append(event)
        assert envelope["headers"] == {"hostname": "gen1@host%name"}
        assert envelope["properties"]["delivery_info"] == {"exchange": "celeryev", "routing_key": "task.sent"}
        assert event["type"] == "task-sent" and event["hostname"] == "gen1@host%name"
        assert event["uuid"] == event["root_id"] == headers["id"] and event["name"] == headers["task"]
        assert event["args"] == headers["argsrepr"] == "[1.25]" and event["kwargs"] == "{}"
        assert event["eta"] == headers["eta"] == "2030-01-01T00:00:00.250000+00:00"
        assert (event["queue"], event["exchange"], event["routing_key"]) == ("timers", "", "timers")
        assert event["utcoffset"] == celery_utcoffset()
    assert events[1]["clock"] > events[0]["clock"] and events[1]["timestamp"] >= events[0]["timestamp"]
    assert events[0]["uuid"] != events[1]["uuid"]
    nudge, nudge_event = CeleryMessageBuilder.for_task("callflow.livekit_events", "events").prebuilt()
    _, announced = decode(nudge_event)
    assert decode(nudge)[1][0] == [] and announced["args"] == "()" and announced["eta"] is None


def test_no_task_sent_event_when_they_are_off():
    message, sent_event = CeleryMessageBuilder.for_task("callflow.ping", "events", sent_events=False).prebuilt(["x"])
    assert sent_event == b"" and decode(message)[1][0] == ["x"]


def test_the_task_sent_channel_is_kombus_fanout_topic():
    assert task_sent_channel(None) == b"/0.celeryev/task.sent" and task_sent_channel(3) == b"/3.celeryev/task.sent"
