"""The ids callflow mints (orchestration/ids.py): RFC 9562 version 7, ordered by their milliseconds."""

import uuid

from orchestration.ids import time_ordered_id


def test_an_id_is_a_version_7_uuid_carrying_its_milliseconds():
    ms = 1_796_000_000_123
    made = uuid.UUID(time_ordered_id(ms))
    assert made.version == 7 and made.variant == uuid.RFC_4122
    assert made.int >> 80 == ms


def test_ids_of_later_milliseconds_sort_after_earlier_ones_whatever_their_random_bits():
    earlier = [time_ordered_id(1_796_000_000_000) for _ in range(200)]
    later = [time_ordered_id(1_796_000_000_001) for _ in range(200)]
    assert max(earlier) < min(later)  # as text, as Postgres's uuid order does: byte by byte
    assert len(set(earlier)) == 200  # 74 random bits: no two alike within a millisecond


def test_the_clock_is_read_when_no_time_is_given():
    import time
    before = time.time_ns() // 1_000_000
    made = uuid.UUID(time_ordered_id()).int >> 80
    assert before <= made <= time.time_ns() // 1_000_000
