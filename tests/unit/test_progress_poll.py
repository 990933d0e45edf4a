"""How often the migration runner reads a RAM stream's progress: rarely while much remains, often near the end."""

from __future__ import annotations

import pytest

from ferryman.controller.migrations import PROGRESS_POLL_MAX_S, PROGRESS_POLL_MIN_S, next_progress_poll_s

MIB = 1 << 20


@pytest.mark.parametrize(
    ("remaining_mib", "rate_mib_s", "expected"),
    [
        (1600, 200, PROGRESS_POLL_MAX_S),  # eight seconds to go: about once a second
        (80, 200, 0.2),  # 0.4 s to go: half of it
        (4, 200, PROGRESS_POLL_MIN_S),  # nearly done: as often as the floor allows
        (0, 200, PROGRESS_POLL_MIN_S),
        (100, 0, PROGRESS_POLL_MIN_S),  # no rate yet (setup, or stalled): no estimate, read often
    ],
)
def test_poll_interval_follows_the_time_left(remaining_mib: int, rate_mib_s: int, expected: float) -> None:
    progress = {"remaining_bytes": remaining_mib * MIB, "rate_bytes_per_s": rate_mib_s * MIB}
    assert next_progress_poll_s(progress) == pytest.approx(expected)


def test_poll_interval_copes_with_missing_fields() -> None:
    assert next_progress_poll_s({}) == PROGRESS_POLL_MIN_S
