"""The month's usage arithmetic (orchestration.usage.figures), without services."""

from __future__ import annotations

import typing
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from config.settings import ConfigurationError, Settings, build_settings
from orchestration.usage import figures
from orchestration.channels.usage_alert_email import compose
from orchestration.usage.figures import Session, participant_minutes, peak_concurrency, thresholds_crossed
from orchestration.usage.plans import PLAN_NAMES, PLANS, PLANS_AS_OF

UTC = timezone.utc
DEC = date(2026, 12, 1)
NOV = date(2026, 11, 1)
AFTER = datetime(2027, 1, 5, tzinfo=UTC)  # "now" after both months: they are complete


def at(day: int, hh: int = 0, mm: int = 0, ss: int = 0, month: int = 12, year: int = 2026) -> datetime:
    return datetime(year, month, day, hh, mm, ss, tzinfo=UTC)


# ---- months ------------------------------------------------------------------------------------

def test_month_bounds_and_parsing():
    assert figures.month_bounds(DEC) == (at(1), datetime(2027, 1, 1, tzinfo=UTC))
    assert figures.days_in_month(date(2028, 2, 1)) == 29
    assert figures.parse_month("2026-02") == date(2026, 2, 1)
    for bad in ("2026-13", "26-01", "2026/01", ""):
        with pytest.raises(ValueError):
            figures.parse_month(bad)
    assert figures.month_of(datetime(2026, 12, 31, 23, 30, tzinfo=timezone(timedelta(hours=-2)))) == date(2027, 1, 1)


# ---- minutes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("seconds, minutes", [(0, 0), (1, 1), (10, 1), (60, 1), (61, 2), (70, 2), (3600, 60)])
def test_each_session_rounds_up_to_the_minute(seconds, minutes):
    start = at(10, 12)
    assert participant_minutes([Session(start, start + timedelta(seconds=seconds))], DEC, AFTER) == minutes


def test_rounding_is_per_session_before_summing():
    start = at(10, 12)
    sessions = [Session(start, start + timedelta(seconds=10)) for _ in range(6)]
    assert participant_minutes(sessions, DEC, AFTER) == 6  # not ceil(60 s) = 1


def test_session_over_midnight_counts_whole():
    assert participant_minutes([Session(at(10, 23, 50), at(11, 0, 10))], DEC, AFTER) == 20


def test_session_over_the_month_end_is_cut_there():
    s = Session(datetime(2026, 11, 30, 23, 59, 30, tzinfo=UTC), at(1, 0, 0, 30))
    assert participant_minutes([s], NOV, AFTER) == 1
    assert participant_minutes([s], DEC, AFTER) == 1
    long = Session(datetime(2026, 11, 30, 22, 0, tzinfo=UTC), at(1, 2, 0))
    assert participant_minutes([long], NOV, AFTER) == 120 and participant_minutes([long], DEC, AFTER) == 120


def test_open_session_counts_up_to_now_or_the_month_end():
    now = at(10, 12, 30)
    open_session = Session(at(10, 12, 0), None)
    assert participant_minutes([open_session], DEC, now) == 30
    older = Session(datetime(2026, 11, 30, 23, 0, tzinfo=UTC), None)
    assert participant_minutes([older], NOV, now) == 60  # November is over: up to its end
    assert participant_minutes([older], DEC, now) == 9 * 1440 + 12 * 60 + 30


def test_session_end_is_left_at_else_the_calls_end():
    assert figures.session_end(at(2), at(3)) == at(2)
    assert figures.session_end(None, at(3)) == at(3)
    assert figures.session_end(None, None) is None


def test_sessions_outside_the_month_or_backwards_count_nothing():
    sessions = [Session(at(1, month=10), at(2, month=10)), Session(at(5), at(4)), Session(at(2, month=1, year=2027), None)]
    assert participant_minutes(sessions, DEC, AFTER) == 0


# ---- peak --------------------------------------------------------------------------------------

def test_peak_of_overlapping_calls_and_when():
    sessions = [
        Session(at(3, 10, 0), at(3, 10, 30)),   # call A
        Session(at(3, 10, 5), at(3, 10, 40)),   # call A
        Session(at(3, 10, 20), at(3, 11, 0)),   # call B overlaps both: 3 at 10:20
        Session(at(3, 10, 25), at(3, 10, 26)),  # call B: 4 at 10:25
        Session(at(4, 9), at(4, 10)),
    ]
    assert peak_concurrency(sessions, DEC, AFTER) == (4, at(3, 10, 25))


def test_back_to_back_sessions_do_not_overlap():
    sessions = [Session(at(3, 10), at(3, 11)), Session(at(3, 11), at(3, 12))]
    assert peak_concurrency(sessions, DEC, AFTER) == (1, at(3, 10))


def test_peak_ties_go_to_the_earliest_instant():
    sessions = [Session(at(3, 10), at(3, 11)), Session(at(3, 10, 30), at(3, 11)),
                Session(at(5, 10), at(5, 11)), Session(at(5, 10, 30), at(5, 11))]
    assert peak_concurrency(sessions, DEC, AFTER) == (2, at(3, 10, 30))


def test_sessions_open_at_the_month_start_peak_at_its_first_instant():
    sessions = [Session(datetime(2026, 11, 30, 23, tzinfo=UTC), at(1, 1)),
                Session(datetime(2026, 11, 30, 23, 30, tzinfo=UTC), None),
                Session(at(1, 2), at(1, 3))]
    assert peak_concurrency(sessions, DEC, AFTER) == (2, at(1))
    assert peak_concurrency(sessions, NOV, AFTER) == (2, datetime(2026, 11, 30, 23, 30, tzinfo=UTC))


def test_open_sessions_count_until_now():
    now = at(3, 12)
    sessions = [Session(at(3, 10), None), Session(at(3, 11), None), Session(at(3, 13), at(3, 14))]
    assert peak_concurrency(sessions, DEC, now) == (2, at(3, 11))


def test_empty_month():
    assert peak_concurrency([], DEC, AFTER) == (0, None)
    assert participant_minutes([], DEC, AFTER) == 0


# ---- projection, bill, thresholds ---------------------------------------------------------------

def test_projection_at_the_daily_rate():
    assert figures.projected_minutes(1000, DEC, at(11)) == 3100  # 10 days elapsed, 31 in December
    assert figures.projected_minutes(100, DEC, at(1, 2)) == 3100  # under a day: the rate is per one day
    assert figures.projected_minutes(1000, NOV, AFTER) == 1000  # a finished month projects to itself


def test_bill():
    ship, scale, build = PLANS["ship"], PLANS["scale"], PLANS["build"]
    assert figures.estimated_cost_usd(ship, 100_000) == Decimal("50.00")
    assert figures.estimated_cost_usd(ship, 250_000) == Decimal("100.00")  # 100,000 over at $0.0005
    assert figures.estimated_cost_usd(scale, 1_600_000) == Decimal("540.00")  # 100,000 over at $0.0004
    assert figures.estimated_cost_usd(build, 9_000) == Decimal("0.00")  # free: no overage billing
    assert figures.estimated_cost_usd(PLANS["self-hosted"], 10**9) == Decimal("0.00")


def test_thresholds_fire_at_exactly_80_and_100_percent():
    build = PLANS["build"]  # 5,000 minutes, 100 concurrent
    assert thresholds_crossed(build, 3_999, 79) == []
    assert thresholds_crossed(build, 4_000, 79) == [("participant_minutes", 80, 4_000, 5_000)]
    assert thresholds_crossed(build, 5_000, 100) == [
        ("participant_minutes", 80, 5_000, 5_000), ("participant_minutes", 100, 5_000, 5_000),
        ("concurrent_participants", 80, 100, 100), ("concurrent_participants", 100, 100, 100)]
    assert thresholds_crossed(PLANS["self-hosted"], 10**9, 10**6) == []


def test_plans_are_dated_data_and_the_setting_knows_them_all():
    assert PLANS_AS_OF == date(2026, 2, 1)
    literal = typing.get_args(Settings.model_fields["callflow_livekit_plan"].annotation)
    assert set(literal) == set(PLAN_NAMES)
    assert build_settings().callflow_livekit_plan == "build"
    assert build_settings(callflow_livekit_plan=" Scale ").callflow_livekit_plan == "scale"


@pytest.mark.parametrize("field, value", [("callflow_livekit_plan", "enterprise"),
                                          ("callflow_ops_email", "ops"), ("callflow_ops_email", "a@b.c, d@e.f")])
def test_bad_values_stop_with_one_line(field, value):
    with pytest.raises(ConfigurationError) as err:
        build_settings(**{field: value})
    assert str(err.value).startswith(field.upper()) and "\n" not in str(err.value)


def test_alert_email_is_a_function_of_its_row():
    row = {"id": "0b0b0b0b-0000-0000-0000-000000000001", "month": DEC, "measure": "concurrent_participants",
           "threshold_percent": 80, "plan": "build", "value": 80, "limit_value": 100,
           "recipient_email": "ops@example.test"}
    first, again = compose(row, "Calls <c@example.test>", "https://app"), compose(dict(row), "Calls <c@example.test>", "https://app")
    assert first == again
    assert first.idempotency_key == "callflow-usage-alert-" + row["id"]
    assert "80%" in first.subject and "build" in first.subject and "2026-12" in first.subject
    assert "80 of 100" in first.text
