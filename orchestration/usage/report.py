"""A month's usage against the plan: what `callflow usage` prints and the beat's check acts on."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

import psycopg

from orchestration.usage import figures, store
from orchestration.usage.plans import PLANS_AS_OF, Plan

ROUNDING_RULE = ("each session's connected time in the month is rounded up to a whole minute "
                 "(LiveKit rounds every connection up before summing); a session crossing a month "
                 "boundary is cut there")
BANDWIDTH_NOTE = "not measurable from LiveKit webhooks: see the LiveKit Cloud dashboard"


@dataclass(frozen=True)
class MonthUsage:
    month: date
    plan: Plan
    computed_at: datetime
    participant_minutes: int
    peak_concurrent_participants: int
    peak_at: datetime | None
    calls: int
    completed_calls: int

    @property
    def complete(self) -> bool:
        return self.computed_at >= figures.month_bounds(self.month)[1]

    @property
    def projected_minutes(self) -> int:
        return figures.projected_minutes(self.participant_minutes, self.month, self.computed_at)

    @property
    def estimated_cost_usd(self) -> Decimal:
        """The month's bill at the projected month-end minutes (the final one for a past month)."""
        return figures.estimated_cost_usd(self.plan, self.projected_minutes)

    @property
    def cost_to_date_usd(self) -> Decimal:
        return figures.estimated_cost_usd(self.plan, self.participant_minutes)

    def as_dict(self) -> dict:
        plan = self.plan
        return {
            "month": self.month.strftime("%Y-%m"),
            "plan": plan.name,
            "plan_prices_as_of": PLANS_AS_OF.isoformat(),
            "computed_at": _iso(self.computed_at),
            "month_complete": self.complete,
            "participant_minutes": self.participant_minutes,
            "minutes_rounding": ROUNDING_RULE,
            "included_minutes": plan.included_minutes,
            "minutes_percent_of_included": figures.percent_of(self.participant_minutes, plan.included_minutes),
            "projected_participant_minutes": self.projected_minutes,
            "peak_concurrent_participants": self.peak_concurrent_participants,
            "peak_at": _iso(self.peak_at),
            "concurrency_cap": plan.concurrency_cap,
            "concurrency_percent_of_cap": figures.percent_of(self.peak_concurrent_participants, plan.concurrency_cap),
            "calls": self.calls,
            "completed_calls": self.completed_calls,
            "plan_price_usd": float(plan.monthly_price_usd),
            "overage_per_minute_usd": None if plan.overage_per_minute_usd is None else float(plan.overage_per_minute_usd),
            "estimated_cost_usd": float(self.estimated_cost_usd),
            "cost_to_date_usd": float(self.cost_to_date_usd),
            "bandwidth": None,
            "bandwidth_note": BANDWIDTH_NOTE,
        }

    def lines(self) -> list[str]:
        plan, d = self.plan, self.as_dict()
        included = f"{plan.included_minutes:,}" if plan.included_minutes is not None else "unmetered"
        cap = f"{plan.concurrency_cap:,}" if plan.concurrency_cap is not None else "no cap"
        pct = lambda p: f" ({p}%)" if p is not None else ""  # noqa: E731
        state = "complete" if self.complete else f"to {_iso(self.computed_at)}"
        overage = (f"${plan.overage_per_minute_usd}/min beyond the included minutes"
                   if plan.overage_per_minute_usd is not None else "no overage billing")
        return [
            f"LiveKit usage for {d['month']} (UTC, {state}), plan {plan.name} (prices as of {d['plan_prices_as_of']})",
            f"  participant-minutes       {self.participant_minutes:,} of {included}{pct(d['minutes_percent_of_included'])}",
            f"  projected at month end    {self.projected_minutes:,}",
            f"  peak concurrent           {self.peak_concurrent_participants:,} of {cap}"
            f"{pct(d['concurrency_percent_of_cap'])}" + (f" at {_iso(self.peak_at)}" if self.peak_at else ""),
            f"  calls                     {self.calls:,} ({self.completed_calls:,} completed)",
            f"  estimated bill            ${self.estimated_cost_usd} (to date ${self.cost_to_date_usd}; "
            f"plan ${plan.monthly_price_usd}, {overage})",
            f"  bandwidth                 {BANDWIDTH_NOTE}",
            f"  rounding: {ROUNDING_RULE}",
        ]


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def month_usage(conn: psycopg.Connection, plan: Plan, month: date, now: datetime) -> MonthUsage:
    """Refreshes the rollup, then reads the month's figures as of `now`."""
    store.refresh(conn)
    minutes = store.participant_minutes(conn, month, now)
    peak, peak_at = store.peak(conn, month, now)
    calls, completed = store.calls(conn, month)
    conn.commit()
    return MonthUsage(month=month, plan=plan, computed_at=now, participant_minutes=minutes,
                      peak_concurrent_participants=peak, peak_at=peak_at, calls=calls, completed_calls=completed)
