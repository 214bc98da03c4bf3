"""A dependency's retry loop shared by every worker (orchestration/shared_backoff.py), on real Redis."""

from __future__ import annotations

import time
import uuid

import pytest

from orchestration.shared_backoff import SharedBackoff


@pytest.fixture
def loop(redis_client):
    # base 0.4 s, cap 1.6 s, no jitter in the figures below beyond backoff_delay's [c/2, c]
    return SharedBackoff(redis_client, f"test-{uuid.uuid4().hex[:8]}", base=0.4, cap=1.6, probe_seconds=0.6)


def test_everyone_goes_while_the_dependency_answers(loop):
    assert loop.turn().wait == 0 and loop.turn().wait == 0
    loop.succeeded()
    assert loop.turn().wait == 0 and loop.failures == 0


def test_no_answer_backs_everyone_off_once_per_step(loop):
    in_flight = [loop.turn() for _ in range(3)]  # three requests under way, none answered
    first = loop.failed(in_flight[0])
    assert 0.2 <= first <= 0.4 and loop.failures == 1
    # The others were under way meanwhile: they say nothing new (same wait, same step).
    assert loop.failed(in_flight[1]) <= first and loop.failures == 1
    assert 0 < loop.turn().wait <= first
    time.sleep(first + 0.05)
    probe = loop.turn()  # the wait is over: one probe goes, the others wait for its lease
    assert probe.wait == 0
    assert 0.1 <= loop.turn().wait <= 0.6
    assert 0.1 <= loop.failed(in_flight[2]) <= 0.6  # a late old failure neither counts nor ends the probe
    assert loop.failures == 1 and loop.turn().wait > 0
    second = loop.failed(probe)  # the probe got no answer: the next step
    assert 0.4 <= second <= 0.8 and loop.failures == 2


def test_the_backoff_starts_again_from_its_first_step_after_a_success(loop):
    turn = loop.turn()
    for _ in range(4):  # up the backoff to its cap, one probe per step
        time.sleep(loop.failed(turn) + 0.05)
        turn = loop.turn()
        assert turn.wait == 0
    assert loop.failures == 4
    loop.succeeded()  # the probe got an answer
    assert loop.turn().wait == 0 and loop.turn().wait == 0  # everyone goes again
    assert 0.2 <= loop.failed(loop.turn()) <= 0.4 and loop.failures == 1  # and a new outage starts at step 1


def test_a_retry_after_is_the_wait(loop):
    assert 1.4 <= loop.failed(loop.turn(), retry_after=1.5) <= 1.5
    assert 1.3 <= loop.turn().wait <= 1.5


def test_a_probe_that_never_reports_hands_over_after_its_lease(loop):
    time.sleep(loop.failed(loop.turn()) + 0.05)
    assert loop.turn().wait == 0  # a probe whose worker then dies
    time.sleep(0.65)
    assert loop.turn().wait == 0  # another one goes


def test_a_probe_that_asks_nothing_hands_over_at_once(loop):
    time.sleep(loop.failed(loop.turn()) + 0.05)
    probe = loop.turn()
    assert probe.wait == 0 and probe.probe is not None  # the one probe after the wait
    assert loop.turn().wait > 0  # its lease holds the others back
    loop.release(probe)  # it asked nothing (its request waits for its rate)
    again = loop.turn()
    assert again.wait == 0 and again.probe is not None  # the next probe goes at once, not a lease later
    loop.release(probe)  # a stale token does not end another turn's lease
    assert loop.turn().wait > 0
    loop.release(loop.turn())  # nor does a turn that was no probe (it waited)
    assert loop.turn().wait > 0


def test_a_go_while_the_dependency_answers_is_no_probe(loop):
    turn = loop.turn()
    assert turn.wait == 0 and turn.probe is None
    loop.release(turn)  # nothing to end
    assert loop.turn().wait == 0
