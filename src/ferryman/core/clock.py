"""The injected clock: logic asks a :class:`Clock` for the time, never the system directly."""

from __future__ import annotations

import datetime as dt
from typing import Protocol


class Clock(Protocol):
    """Source of wall-clock time (UTC, timezone-aware)."""

    def now(self) -> dt.datetime: ...


class SystemClock:
    """The real clock."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


def parse_time(text: str, clock: Clock) -> dt.datetime:
    """Parse an ISO-8601 time, ``now``, or a relative ``-5m``/``-2h``/``-1d``/``-30s`` into an aware UTC time."""
    from ferryman.core.errors import InvalidInput

    text = text.strip()
    if text == "now":
        return clock.now()
    if text.startswith("-") and text[-1:] in {"s", "m", "h", "d"}:
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        try:
            amount = float(text[1:-1])
        except ValueError as err:
            raise InvalidInput(f"bad relative time {text!r}: use e.g. -30s, -5m, -2h, -1d") from err
        return clock.now() - dt.timedelta(seconds=amount * units[text[-1]])
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError as err:
        raise InvalidInput(f"bad time {text!r}: use ISO-8601 (2026-11-23T10:00:00Z), 'now' or -5m") from err
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)
