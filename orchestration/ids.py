"""The ids callflow mints for the rows it creates (calls): time-ordered, like the database's default.

RFC 9562's version 7: 48 bits of Unix milliseconds, then 74 random bits (the version and variant
take the other six). A new row's id sorts after the ids of older rows, so it lands on the same
few right-hand pages of every index keyed by it (the primary key, and the call id in invitations,
participants and parties) as the other new rows', instead of on a random leaf of an index that a
year of history has made larger than memory: a random leaf is a page read from disk, and after
every checkpoint a full-page image in the WAL. The database's default for the ids clients leave
out is the same (`public.callflow_uuid_v7()`, migration 20261208000010).
"""

from __future__ import annotations

import os
import time
import uuid

_VERSION_7 = 0x7 << 76
_VARIANT_RFC = 0b10 << 62


def time_ordered_id(now_ms: int | None = None) -> str:
    """A version 7 UUID for now (or for `now_ms`, Unix milliseconds), as text."""
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    random_bits = int.from_bytes(os.urandom(10), "big")  # 80 bits; 74 used
    rand_a = random_bits >> 68  # 12 bits
    rand_b = random_bits & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | _VERSION_7 | rand_a << 64 | _VARIANT_RFC | rand_b
    return str(uuid.UUID(int=value))
