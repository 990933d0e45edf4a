"""Core domain rules: VM lifecycle table, size and time parsing."""

from __future__ import annotations

import datetime as dt

import pytest

from ferryman.core.clock import parse_time
from ferryman.core.errors import Conflict, InvalidInput
from ferryman.core.models import VMAction, VMState, check_name, check_resident, max_resident_mib, next_vm_state
from ferryman.core.units import parse_mib, parse_size


class FixedClock:
    def __init__(self, t: dt.datetime) -> None:
        self.t = t

    def now(self) -> dt.datetime:
        return self.t


T0 = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


def test_lifecycle_allows_pause_resume_stop_start():
    """A running VM can be paused, resumed, stopped and started again."""
    s = next_vm_state(VMState.RUNNING, VMAction.PAUSE)
    assert s is VMState.PAUSED
    s = next_vm_state(s, VMAction.RESUME)
    assert s is VMState.RUNNING
    s = next_vm_state(s, VMAction.STOP)
    assert s is VMState.STOPPED
    assert next_vm_state(s, VMAction.START) is VMState.RUNNING


@pytest.mark.parametrize(
    ("state", "action"),
    [
        (VMState.STOPPED, VMAction.PAUSE),
        (VMState.RUNNING, VMAction.START),
        (VMState.DELETED, VMAction.START),
        (VMState.PAUSED, VMAction.PAUSE),
    ],
)
def test_lifecycle_refuses_illegal_transitions(state, action):
    """Illegal transitions raise Conflict naming the allowed actions."""
    with pytest.raises(Conflict, match=f"cannot {action.value}"):
        next_vm_state(state, action)


def test_deleted_is_terminal():
    """Nothing leaves the deleted state."""
    with pytest.raises(Conflict):
        next_vm_state(VMState.DELETED, VMAction.DELETE)


@pytest.mark.parametrize(
    ("text", "expected"), [("64M", 64 << 20), ("1G", 1 << 30), ("512K", 512 << 10), ("4096", 4096), ("2GiB", 2 << 30)]
)
def test_parse_size(text, expected):
    """Sizes with K/M/G suffixes parse to bytes."""
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-5M", "0", "1.5G", "12X"])
def test_parse_size_rejects_bad_input(text):
    """Malformed or non-positive sizes raise InvalidInput."""
    with pytest.raises(InvalidInput):
        parse_size(text)


def test_parse_mib_defaults_to_mib_and_needs_whole_mib():
    """A bare --memory number is MiB; a size that is not whole MiB is refused."""
    assert parse_mib("256") == 256
    assert parse_mib("1G") == 1024
    with pytest.raises(InvalidInput):
        parse_mib("1500K")


def test_parse_time_forms():
    """Times: ISO (naive taken as UTC), 'now', and relative offsets."""
    clock = FixedClock(T0)
    assert parse_time("now", clock) == T0
    assert parse_time("-5m", clock) == T0 - dt.timedelta(minutes=5)
    assert parse_time("-2h", clock) == T0 - dt.timedelta(hours=2)
    assert parse_time("2026-11-23T10:00:00", clock) == dt.datetime(2026, 11, 23, 10, tzinfo=dt.UTC)
    assert parse_time("2026-11-23T11:00:00+01:00", clock) == dt.datetime(2026, 11, 23, 10, tzinfo=dt.UTC)
    with pytest.raises(InvalidInput):
        parse_time("yesterday", clock)


@pytest.mark.parametrize("name", ["web-1", "a", "host-b"])
def test_good_names(name):
    """DNS-label-like names are accepted."""
    assert check_name("VM", name) == name


@pytest.mark.parametrize("name", ["", "Web", "-a", "a-", "a_b", "x" * 64, "a b"])
def test_bad_names(name):
    """Anything else is refused with InvalidInput."""
    with pytest.raises(InvalidInput):
        check_name("VM", name)


def test_resident_set_must_leave_the_guest_its_headroom() -> None:
    check_resident(0, 128)
    assert max_resident_mib(2048) == 2048 - 96 - 64  # fixed headroom plus 1/32 of RAM
    check_resident(max_resident_mib(512), 512)
    for resident, memory in ((max_resident_mib(512) + 1, 512), (1, 64), (-1, 1024)):
        with pytest.raises(InvalidInput, match="resident set"):
            check_resident(resident, memory)
