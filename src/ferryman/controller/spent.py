"""The single-use approvals a request has used, and the point from which they stay used.

The API's access check uses up a single-use approval (two-person rule) when the request presents it, and gives it
back if the request then fails: what was approved did not happen. Once the approved action begins to take effect (a
VM or migration recorded, a key destroyed, an agent asked to restore), the approval stays used whatever fails after:
the code that does such a step calls :func:`point_of_no_return` just before it. The request's list travels in a
context variable, which the route's worker threads share.
"""

from __future__ import annotations

import datetime as dt
from contextvars import ContextVar

Spent = list[tuple[int, dt.datetime]]  # (approval id, when it was used)

_current: ContextVar[Spent | None] = ContextVar("ferryman_spent_approvals", default=None)


def track(spent: Spent) -> None:
    """Make ``spent`` the current request's list (the access check appends to it)."""
    _current.set(spent)


def point_of_no_return() -> None:
    """The approved action begins to take effect: the approvals this request used are not given back."""
    spent = _current.get()
    if spent:
        spent.clear()
