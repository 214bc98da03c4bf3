"""Capped exponential backoff: the one rule every retry loop of callflow waits by.

A loop counts its failures since its last success (`attempt` 1 after the first failure) and
starts again from 1 after a success (the contract: each retry loop's backoff starts again from
its first step after a success).
"""

from __future__ import annotations

import random


def backoff_delay(attempt: int, base: float, cap: float, *, jitter: bool = True,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `attempt` (1, 2, ...): c = min(cap, base * 2**(attempt-1));
    with `jitter`, "equal jitter" in [c/2, c] (so many waiters do not retry in step)."""
    ceiling = min(cap, base * (2 ** min(max(0, attempt - 1), 30)))
    return (rng or random).uniform(ceiling / 2, ceiling) if jitter else ceiling
