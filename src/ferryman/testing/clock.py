"""A clock tests move by hand."""

from __future__ import annotations

import datetime as dt


class FakeClock:
    def __init__(self, start: dt.datetime | None = None) -> None:
        self.t = start or dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)

    def now(self) -> dt.datetime:
        return self.t

    def advance(self, seconds: float) -> dt.datetime:
        self.t += dt.timedelta(seconds=seconds)
        return self.t
