"""The month's usage arithmetic, pure (no clock, no I/O): the SQL in `store` computes the same
figures on big histories, and the unit tests pin both to these definitions.

- Months are UTC calendar months: [first instant of the month, first instant of the next).
- A participant session runs from its `joined_at` to its `left_at`, else its call's `ended_at`,
  else now (still connected). Sessions are half-open: one leaving and another joining at the same
  instant are never counted together.
- Participant-minutes: each session's time inside the month, rounded UP to a whole minute per
  session (LiveKit rounds every connection up to the minute before summing: 10 s bills 1 minute,
  70 s bills 2). A session crossing a month boundary is cut there and each part rounded up.
- Peak concurrency: the most sessions open at one instant in [month start, min(month end, now)),
  and the earliest instant it was reached (the month's first instant when the sessions already
  open at midnight were the peak).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Iterable

from orchestration.usage.plans import Plan

THRESHOLDS_PERCENT = (80, 100)
MEASURES = ("participant_minutes", "concurrent_participants")
_MICROS_PER_MINUTE = 60_000_000


@dataclass(frozen=True)
class Session:
    joined_at: datetime
    ended_at: datetime | None  # None: still connected


def session_end(left_at: datetime | None, call_ended_at: datetime | None) -> datetime | None:
    return left_at if left_at is not None else call_ended_at


def parse_month(text: str) -> date:
    """'YYYY-MM' -> the month's first day; ValueError otherwise."""
    try:
        parsed = datetime.strptime(text.strip(), "%Y-%m")
    except ValueError:
        raise ValueError(f"not a month (YYYY-MM): {text[:20]!r}") from None
    return parsed.date().replace(day=1)


def month_of(moment: datetime) -> date:
    return moment.astimezone(timezone.utc).date().replace(day=1)


def month_bounds(month: date) -> tuple[datetime, datetime]:
    start = datetime(month.year, month.month, 1, tzinfo=timezone.utc)
    end = datetime(month.year + (month.month == 12), month.month % 12 + 1, 1, tzinfo=timezone.utc)
    return start, end


def _micros(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _clip(session: Session, start: datetime, upto: datetime, now: datetime) -> tuple[datetime, datetime] | None:
    begin = max(session.joined_at, start)
    end = min(session.ended_at if session.ended_at is not None else now, upto)
    return (begin, end) if end > begin else None


def participant_minutes(sessions: Iterable[Session], month: date, now: datetime) -> int:
    start, end = month_bounds(month)
    upto = min(end, now)
    total = 0
    for session in sessions:
        clipped = _clip(session, start, upto, now)
        if clipped:
            total += -(-_micros(clipped[1] - clipped[0]) // _MICROS_PER_MINUTE)  # ceiling
    return total


def peak_concurrency(sessions: Iterable[Session], month: date, now: datetime) -> tuple[int, datetime | None]:
    """(peak, earliest instant of the peak); (0, None) for a month nobody was connected in."""
    start, end = month_bounds(month)
    upto = min(end, now)
    changes: dict[datetime, int] = defaultdict(int)
    for session in sessions:
        clipped = _clip(session, start, upto, now)
        if clipped:
            changes[clipped[0]] += 1
            changes[clipped[1]] -= 1  # at `upto` it is never read: harmless
    level, peak, peak_at = 0, 0, None
    for at in sorted(changes):
        level += changes[at]
        if level > peak:
            peak, peak_at = level, at
    return peak, peak_at


def elapsed_days(month: date, now: datetime) -> float:
    start, end = month_bounds(month)
    return (min(now, end) - start).total_seconds() / 86_400


def days_in_month(month: date) -> int:
    start, end = month_bounds(month)
    return (end - start).days


def projected_minutes(minutes: int, month: date, now: datetime) -> int:
    """Month-end minutes at the month's daily rate so far. The rate is taken over at least one
    day, so the first hours of a month don't extrapolate a single call into a wall. A finished
    month projects to what it used."""
    _, end = month_bounds(month)
    if now >= end:
        return minutes
    rate = minutes / max(elapsed_days(month, now), 1.0)
    return max(minutes, round(rate * days_in_month(month)))


def estimated_cost_usd(plan: Plan, minutes: int) -> Decimal:
    """Plan price + the per-minute connection fee on the minutes beyond the included ones (on the
    plans that bill overage). Bandwidth is not included: webhooks don't measure it."""
    cost = plan.monthly_price_usd
    if plan.overage_per_minute_usd is not None and plan.included_minutes is not None:
        cost += max(0, minutes - plan.included_minutes) * plan.overage_per_minute_usd
    return cost.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def percent_of(value: int, limit: int | None) -> float | None:
    return None if not limit else round(100.0 * value / limit, 1)


def limit_for(plan: Plan, measure: str) -> int | None:
    return plan.included_minutes if measure == "participant_minutes" else plan.concurrency_cap


def thresholds_crossed(plan: Plan, minutes: int, peak: int) -> list[tuple[str, int, int, int]]:
    """(measure, threshold %, value, limit) for every threshold the month's figures reached."""
    crossed = []
    for measure, value in zip(MEASURES, (minutes, peak)):
        limit = limit_for(plan, measure)
        if not limit:
            continue
        for threshold in THRESHOLDS_PERCENT:
            # Integer arithmetic: 80 % of 5,000 is reached at exactly 4,000.
            if value * 100 >= limit * threshold:
                crossed.append((measure, threshold, value, limit))
    return crossed
