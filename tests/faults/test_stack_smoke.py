"""The fault stack itself: an invitation rings through the listener, the worker and Toxiproxy."""

from __future__ import annotations

from tests.support.calls import insert_invitation, wait_invitation


def test_an_invitation_rings_through_the_proxies(faults, fdb, fault_user):
    faults.start("web", "worker", "beat", "listener")
    inv = insert_invitation(faults.database_url, fault_user(), fault_user())
    ringing = wait_invitation(fdb, inv["id"], "ringing", timeout=20)
    assert ringing["call_id"] is not None
