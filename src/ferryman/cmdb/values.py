"""Checks of values before they reach the database, shared by every SQL repository module, so that SQLite and
PostgreSQL refuse the same inputs with the same error."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from ferryman.core.errors import InvalidInput


def utc(value: dt.datetime, what: str = "time") -> dt.datetime:
    """``value`` in UTC; InvalidInput for a naive datetime."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{what} {value.isoformat()} has no timezone: pass an aware UTC datetime")
    return value.astimezone(dt.UTC)


def as_json(value: Any, what: str) -> Any:
    """``value`` if it can be stored as JSON, else InvalidInput."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise InvalidInput(f"{what} is not JSON-serialisable: {err}") from err
    return value
