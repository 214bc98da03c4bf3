"""LiveKit's plans as data: the one place to edit when a price or a limit changes.

Numbers from LiveKit Cloud's pricing page as of PLANS_AS_OF (the guide the product follows). How
they are applied (see `figures.estimated_cost_usd`): the plan's price covers its included
connection minutes; minutes beyond them cost `overage_per_minute_usd` each (LiveKit's per-minute
connection fee) on the plans that bill overage; Build bills none (it is free, and LiveKit enforces
its quotas instead). Bandwidth is listed for reference only: webhooks do not carry it, so callflow
never estimates it. Enterprise is negotiated per contract and has no entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from decimal import Decimal

PLANS_AS_OF = date(2026, 2, 1)  # "as of Feb 2026"


@dataclass(frozen=True)
class Plan:
    name: str
    monthly_price_usd: Decimal
    included_minutes: int | None  # None: unmetered (self-hosted)
    concurrency_cap: int | None  # concurrent participants; None: no cap
    bandwidth_gb: int | None  # reference only (not measurable from webhooks)
    overage_per_minute_usd: Decimal | None  # None: no pay-as-you-go beyond the included minutes


PLANS: dict[str, Plan] = {
    plan.name: plan
    for plan in (
        Plan("build", Decimal("0"), 5_000, 100, 50, None),
        Plan("ship", Decimal("50"), 150_000, 1_000, 250, Decimal("0.0005")),
        Plan("scale", Decimal("500"), 1_500_000, 5_000, 3_000, Decimal("0.0004")),
        # Your own LiveKit servers: no per-minute cost and no plan limits (your hardware is the cap).
        Plan("self-hosted", Decimal("0"), None, None, None, None),
    )
}

PLAN_NAMES: tuple[str, ...] = tuple(PLANS)


def plan_named(name: str) -> Plan:
    return PLANS[name]
