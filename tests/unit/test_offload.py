"""Blocking work off the event loop: the loop keeps running meanwhile, and a cancel waits for the call to land."""

from __future__ import annotations

import asyncio
import threading

import pytest

from ferryman.controller.offload import blocking


async def test_the_loop_keeps_running_while_a_blocking_call_waits() -> None:
    """Another coroutine makes progress while the blocking call holds its worker thread."""
    release = threading.Event()
    call = asyncio.create_task(blocking(release.wait, 5))
    ticks = 0
    while ticks < 3:
        await asyncio.sleep(0)
        ticks += 1
    assert not call.done()
    release.set()
    assert await call is True


async def test_a_cancel_waits_for_the_call_to_land_then_propagates() -> None:
    """A write that started is never abandoned half way: the cancelled task ends only after it returned."""
    started, release = threading.Event(), threading.Event()
    landed: list[str] = []

    def write() -> None:
        started.set()
        release.wait(5)
        landed.append("written")

    task = asyncio.create_task(blocking(write))
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done() and landed == []  # the write still runs: the cancel waits for it
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert landed == ["written"]


async def test_errors_come_back_as_raised() -> None:
    """A failing call raises its own error in the awaiting task."""

    def fail() -> None:
        raise KeyError("gone")

    with pytest.raises(KeyError, match="gone"):
        await blocking(fail)
