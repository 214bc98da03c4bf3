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
    MalformedChange, dedupe_key, event_id, from_notify, from_realtime, from_row, iso,
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
    change = from_realtime(realtime_payload()).as_task_arg()
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
    change = from_notify(raw).as_task_arg()
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
    change = from_row(row).as_task_arg()
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
