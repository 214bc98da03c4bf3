"""LiveKit webhook events parsed into typed values at the edge (orchestration/ingest/livekit.py)."""

from datetime import datetime, timezone

from orchestration.ingest.livekit import parse_room_event, parse_time


def test_times_in_seconds_milliseconds_and_iso():
    t = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
    assert parse_time(str(int(t.timestamp()))) == t
    assert parse_time(int(t.timestamp() * 1000)) == t
    assert parse_time("2026-12-01T12:00:00Z") == t
    assert parse_time("0") is None and parse_time(None) is None and parse_time("") is None


def test_a_time_out_of_range_is_none_not_an_error():
    for bad in ("99999999999999999999", "-5", "not a time", 10**30, "2026-13-45T99:00:00Z"):
        assert parse_time(bad) is None


def test_a_participant_event_with_a_joined_at_out_of_range_still_parses():
    ev = parse_room_event({
        "id": "EV_1", "event": "participant_joined", "createdAt": "1800000000",
        "room": {"name": "r", "sid": "RM_1", "someNewField": {"x": 1}},
        "participant": {"sid": "PA_1", "identity": "u", "joinedAt": "99999999999999999999", "kind": "STANDARD"},
        "aFieldFromANewerServer": True,
    })
    assert ev.kind == "participant_joined" and ev.room_name == "r" and ev.room_sid == "RM_1"
    assert ev.participant.identity == "u" and ev.participant.sid == "PA_1" and ev.participant.joined_at is None
    assert ev.occurred_at == datetime.fromtimestamp(1800000000, tz=timezone.utc) and ev.affects_lifecycle


def test_events_of_no_room_do_not_touch_the_lifecycle():
    ev = parse_room_event({"id": "EV_2", "event": "egress_started", "egressInfo": {"roomName": "r"}})
    assert ev.room_name == "r" and not ev.affects_lifecycle
    assert not parse_room_event({"id": "EV_3", "event": "participant_joined"}).affects_lifecycle
