"""Blocking work off the event loop.

The controller's event loop drives every migration; a CMDB transaction, a signature or a compliance check must not
stall it. :func:`blocking` runs such a call in a worker thread. A cancel of the awaiting task (a migration
cancelled mid-step, a shutdown) waits for the call to finish before it propagates: a write that started lands (or
fails) before whoever cancelled goes on, so "persisted before its side effect" keeps its order.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def blocking(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` in a worker thread, never abandoned half way by a cancel."""
    task = asyncio.ensure_future(asyncio.to_thread(functools.partial(fn, *args, **kwargs)))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})  # let it land
        if not task.cancelled():
            task.exception()  # its outcome is not ours to report any more: retrieved, so never logged as lost
        raise
