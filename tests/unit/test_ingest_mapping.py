"""The pure mapping of invitation changes to lifecycle tasks, the backoff, and the token provider."""

import json
import random
import time
import uuid
from datetime import datetime, timezone

import jwt
import pytest
from realtime.types import RealtimePostgresChangesListenEvent

from config.settings import ConfigurationError
from orchestration.ingest.mapping import (
    Change, MalformedChange, dedupe_key, event_id, from_notify, from_realtime, from_row, iso,
)
from workers.listener.core import backoff_delay
from workers.listener.tokens import TokenProvider

INV = str(uuid.uuid4())
SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"


def realtime_payload(kind="INSERT", **record):
    rec = {"id": INV, "status": "pending", "room_name": "room-1", "caller_id": str(uuid.uuid4()),
           "callee_id": str(uuid.uuid4()), "call_type": "video", "metadata": {"big": "x" * 100},
           "updated_at": "2026-11-25T10:00:00.123456+00:00"}
    rec.update(record)
    data = {"schema": "public", "table": "call_invitations", "commit_timestamp": "2026-11-25T10:00:00.200Z",
            "type": getattr(RealtimePostgresChangesListenEvent, kind.capitalize()), "record": rec,
            "columns": [{"name": "id", "type": "uuid"}], "errors": None}
    if kind == "UPDATE":
        data["old_record"] = {"id": INV}
    return {"ids": [12345678], "data": data}


def test_realtime_insert_maps_to_the_contract_change():
    change = from_realtime(realtime_payload()).to_wire()
    assert change["event_id"] == f"realtime:{INV}:pending"
    assert change["source"] == "realtime" and change["type"] == "invitation_pending"
    assert change["invitation_id"] == INV and change["status"] == "pending" and change["room_name"] == "room-1"
    assert change["occurred_at"] == "2026-11-25T10:00:00.123456+00:00"
    assert change["payload"]["op"] == "INSERT"
    assert "metadata" not in change["payload"]  # free-form product data stays out of the queue
    json.dumps(change)  # a Celery JSON argument


def test_realtime_update_enum_type_and_status():
    change = from_realtime(realtime_payload("UPDATE", status="accepted"))
    assert change.status == "accepted" and change.payload["op"] == "UPDATE"
    assert change.event_id == event_id(INV, "accepted")


def test_realtime_ignores_other_tables_and_deletes():
    p = realtime_payload()
    p["data"]["table"] = "calls"
    assert from_realtime(p) is None
    d = realtime_payload()
    d["data"]["type"] = RealtimePostgresChangesListenEvent.Delete
    assert from_realtime(d) is None


@pytest.mark.parametrize("mutate", [
    lambda p: p["data"].update(record={"id": "not-a-uuid", "status": "pending"}),
    lambda p: p["data"]["record"].update(status="exploded"),
    lambda p: p["data"].pop("record"),
    lambda p: p["data"].update(errors=["Error 413: Payload Too Large"]),
    lambda p: p["data"].update(type="TRUNCATE"),
    lambda p: p.update(data="nonsense"),
    lambda p: p["data"]["record"].update(room_name=17),
])
def test_realtime_malformed(mutate):
    p = realtime_payload()
    mutate(p)
    with pytest.raises(MalformedChange):
        from_realtime(p)


def test_notify_payload_as_the_trigger_sends_it():
    raw = json.dumps({"op": "UPDATE", "id": INV, "status": "declined", "room_name": "r",
                      "updated_at": "2026-11-25T10:00:00.5+00:00"})
    change = from_notify(raw).to_wire()
    assert change["event_id"] == f"realtime:{INV}:declined" and change["source"] == "postgres"
    assert change["occurred_at"] == "2026-11-25T10:00:00.500000+00:00"


@pytest.mark.parametrize("raw", ["garbage", "[]", json.dumps({"op": "INSERT", "id": "x", "status": "pending"}),
                                 json.dumps({"op": "DELETE", "id": INV, "status": "pending"}),
                                 json.dumps({"op": "INSERT", "id": INV, "status": "pending", "updated_at": "yesterday"})])
def test_notify_malformed(raw):
    with pytest.raises(MalformedChange):
        from_notify(raw)


def test_row_for_catch_up():
    row = {"id": uuid.UUID(INV), "status": "ringing", "room_name": "r", "caller_id": uuid.uuid4(),
           "callee_id": uuid.uuid4(), "call_type": "audio", "created_at": datetime(2026, 11, 25, tzinfo=timezone.utc),
           "updated_at": datetime(2026, 11, 25, 0, 0, 1, tzinfo=timezone.utc)}
    change = from_row(row).to_wire()
    assert change["event_id"] == f"realtime:{INV}:ringing" and change["payload"]["op"] == "CATCH_UP"
    json.dumps(change)


def test_one_dedupe_key_per_transition():
    assert dedupe_key(INV, "pending") != dedupe_key(INV, "ringing")
    assert dedupe_key(INV, "pending").endswith(f"realtime:{INV}:pending")


@pytest.mark.parametrize("text,expected", [
    ("2026-11-25 10:00:00.1+00", "2026-11-25T10:00:00.100000+00:00"),
    ("2026-11-25T10:00:00Z", "2026-11-25T10:00:00+00:00"),
    ("2026-11-25T11:00:00+01:00", "2026-11-25T10:00:00+00:00"),
])
def test_iso(text, expected):
    assert iso(text) == expected


def test_backoff_is_capped_exponential_with_jitter():
    rng = random.Random(1)
    delays = [backoff_delay(a, 0.5, 30, rng=rng) for a in range(1, 40)]
    assert all(0 < d <= 30 for d in delays)
    assert 0.25 <= delays[0] <= 0.5 and delays[-1] >= 15
    assert len({round(d, 6) for d in delays[10:]}) > 1  # jittered, not lock-step


def _key(exp_in: float, secret: str = SECRET) -> str:
    return jwt.encode({"role": "service_role", "iss": "supabase-demo", "exp": int(time.time() + exp_in)}, secret,
                      algorithm="HS256")


def test_tokens_minted_and_refreshed_when_the_secret_signs_the_key():
    tokens = TokenProvider(_key(10 * 365 * 86400), SECRET, ttl_seconds=60)
    first = tokens.current()
    claims = jwt.decode(first, SECRET, algorithms=["HS256"])
    assert claims["role"] == "service_role" and claims["exp"] - time.time() <= 61
    assert 1 <= tokens.refresh_in() <= 60 * 0.7 + 1
    tokens._exp = time.time() + 5  # near the end of its life
    again = tokens.current()
    assert tokens._exp > time.time() + 50  # a fresh token with a full lifetime
    assert jwt.decode(again, SECRET, algorithms=["HS256"])["role"] == "service_role"


def test_a_short_lived_token_is_replaced_well_before_its_own_exp():
    # `exp` is whole seconds: the refresh must be timed from it, not from the unrounded mint time
    # plus the lifetime (up to a second later: with a 3 s lifetime the token expired first).
    tokens = TokenProvider(_key(10 * 365 * 86400), SECRET, ttl_seconds=3)
    exp = jwt.decode(tokens.current(), SECRET, algorithms=["HS256"])["exp"]
    assert time.time() + tokens.refresh_in() <= exp - 0.3 * 3 + 0.05


def test_key_used_as_is_without_its_secret():
    key = _key(3600, secret="another-secret-another-secret-another-secret")
    tokens = TokenProvider(key, SECRET)
    assert tokens.current() == key and tokens.refresh_in() is None and tokens.key_expires_soon
    assert TokenProvider("sb_secret_opaque", SECRET).current() == "sb_secret_opaque"


def test_expired_key_is_a_configuration_error_that_names_the_variable():
    with pytest.raises(ConfigurationError, match="SUPABASE_SERVICE_ROLE_KEY"):
        TokenProvider(_key(-10, secret="another-secret-another-secret-another-secret"), SECRET)


# ---- the one codec of a change, and the worker's own echoes (issue 24) ----------------------------
def _catch_up_row(**row):
    base = {"id": uuid.UUID(INV), "status": "ringing", "room_name": "r", "caller_id": uuid.uuid4(),
            "callee_id": uuid.uuid4(), "call_type": "audio", "created_at": datetime(2026, 11, 25, tzinfo=timezone.utc),
            "updated_at": datetime(2026, 11, 25, 0, 0, 1, tzinfo=timezone.utc), "status_by": "client"}
    base.update(row)
    return base


def _all_kinds_of_change():
    notify = {"op": "UPDATE", "id": INV, "status": "missed", "room_name": "r",
              "updated_at": "2026-11-25T10:00:00.5+00:00", "status_by": "worker"}
    return [
        from_realtime(realtime_payload()),
        from_realtime(realtime_payload("UPDATE", status="ringing", status_by="worker")),
        from_notify(json.dumps(notify)),
        from_notify(json.dumps({**notify, "status": "accepted", "status_by": "client"})),
        from_row(_catch_up_row()),
        Change(INV, "pending", "sweep", "r", "2026-11-25T10:00:00+00:00", {"reason": "stale pending"}),
        Change(INV, "accepted", "sweep", "r", "2026-11-25T10:00:00+00:00", {"reason": "no change of accepted was taken"},
               event_id=f"transition_recovered:{INV}:accepted", type="transition_recovered"),
    ]


@pytest.mark.parametrize("change", _all_kinds_of_change(), ids=lambda c: f"{c.source}-{c.status}-{c.by_worker}")
def test_a_change_crosses_redis_and_comes_back_the_same(change):
    wire = json.loads(json.dumps(change.to_wire()))  # the backlog's JSON, or Celery's
    assert Change.from_wire(wire) == change
    assert Change.from_wire(wire).to_wire() == wire


def test_the_wire_keeps_the_shape_the_workers_were_always_sent():
    wire = from_realtime(realtime_payload("UPDATE", status="accepted")).to_wire()
    assert set(wire) == {"event_id", "source", "type", "invitation_id", "status", "room_name", "occurred_at", "payload"}
    recovered = Change(INV, "declined", "sweep", "r", None, {}, event_id=f"transition_recovered:{INV}:declined",
                       type="transition_recovered").to_wire()
    assert recovered["event_id"] == f"transition_recovered:{INV}:declined" and recovered["type"] == "transition_recovered"
    assert recovered["source"] == "sweep"


def test_a_wire_dict_of_an_older_sender_is_read_as_the_use_case_always_read_it():
    change = Change.from_wire({"invitation_id": INV, "status": "pending", "source": "elsewhere"})
    assert change.event_id == f"realtime:{INV}:pending" and change.type == "invitation_pending"
    assert change.source == "realtime" and change.payload == {} and not change.by_worker


def test_the_event_a_change_records_keeps_its_own_id():
    from orchestration.lifecycle.invitation_changed import change_event

    change = Change(INV, "cancelled", "sweep", "r", "2026-11-25T10:00:00+00:00", {"reason": "x"},
                    event_id=f"transition_recovered:{INV}:cancelled", type="transition_recovered")
    event = change_event(Change.from_wire(json.loads(json.dumps(change.to_wire()))))
    assert (event.event_id, event.type, event.source) == (f"transition_recovered:{INV}:cancelled",
                                                          "transition_recovered", "sweep")
    assert event.invitation_id == INV and event.occurred_at == datetime(2026, 11, 25, 10, tzinfo=timezone.utc)


@pytest.mark.parametrize("status,status_by,echo", [
    ("ringing", "worker", True), ("missed", "worker", True), ("busy", "worker", True), ("failed", "worker", True),
    ("ringing", "client", False), ("missed", None, False),
    # a worker's accepted or cancelled still reaches the workers: the sweep looks for those never seen
    ("accepted", "worker", False), ("cancelled", "worker", False), ("pending", "worker", False),
])
def test_only_the_echo_of_the_workers_own_transition_is_marked(status, status_by, echo):
    record = {"status": status, **({"status_by": status_by} if status_by else {})}
    assert from_realtime(realtime_payload("UPDATE", **record)).worker_echo is echo
    notify = {"op": "UPDATE", "id": INV, "status": status, "room_name": "r", "updated_at": None}
    assert from_notify(json.dumps({**notify, **({"status_by": status_by} if status_by else {})})).worker_echo is echo
    assert from_row(_catch_up_row(status=status, status_by=status_by)).worker_echo is echo


def test_the_sink_drops_the_workers_echo_without_touching_redis():
    from orchestration.ingest.sink import IngestSink

    class NoRedis:
        connection_kwargs = {"db": 0}

        def register_script(self, script):
            def call(*args, **kwargs):
                raise AssertionError("an echo must not reach Redis")
            return call

    sink = IngestSink(NoRedis())
    echo = from_realtime(realtime_payload("UPDATE", status="missed", status_by="worker"))
    result = sink.submit([echo, echo])
    assert result.echoes == 2 and not result.enqueued and result.duplicates == 0
