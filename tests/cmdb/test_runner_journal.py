"""The migration runner on the real CMDB journal (SQLite and PostgreSQL), through the controller's threaded adapter,
with fake agents: the SQL repository keeps the contract the runner's fakes assume, and a crash between phases
recovers from what the database holds."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from ferryman.cmdb.journal import MigrationRecord
from ferryman.cmdb.sql import SqlRepository
from ferryman.controller.migrations import ThreadedJournal
from ferryman.core.errors import Conflict
from ferryman.core.models import VM, Event
from ferryman.migration import machine as m
from ferryman.migration.runner import MigrationRunner
from ferryman.migration.states import LOCAL_PATH, Phase
from ferryman.scheduler.governor import Governor, GovernorSettings
from ferryman.testing.migration import FakeAgents, FakeAudit, FakeCredentials, FakeInventory, FakeRunnerClock
from ferryman.wire import migration as w

T0 = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)


def runner(repo: SqlRepository, agents: FakeAgents, pause: object = None) -> MigrationRunner:
    return MigrationRunner(
        journal=ThreadedJournal(repo),
        agents=agents,
        credentials=FakeCredentials(),
        inventory=FakeInventory(),
        audit=FakeAudit(),
        clock=FakeRunnerClock(),
        governor=Governor(GovernorSettings(), lambda: 0.5),
        pause=pause,  # type: ignore[arg-type]
    )


def start(fleet: SqlRepository, mid: str) -> m.MigrationState:
    vm = VM(id="id-web", name="web", tenant="acme", memory_mb=128, vcpus=1, disk_bytes=1 << 26, image="lab", canary="c")
    fleet.add_vm(vm, "h1", T0)
    state = m.initial(mid, vm.id, "h1", "h2", False)
    fleet.add_migration(
        MigrationRecord(
            id=mid,
            vm_id=vm.id,
            source="h1",
            destination="h2",
            shared_storage=False,
            phase="requested",
            principal="alice",
            generation=1,
            requested_at=T0,
            updated_at=T0,
            data={"machine": state.to_record()},
        )
    )
    return state


async def test_a_migration_runs_to_done_on_the_sql_journal(fleet: SqlRepository) -> None:
    """Every forward phase is a journal step in order; the commit moved the VM to h2 at generation 2."""
    await runner(fleet, FakeAgents()).run("m1", start(fleet, "m1"), m.Start())
    record = fleet.get_migration("m1")
    assert record.outcome == "done" and record.downtime_ms == 120
    assert list(dict.fromkeys(s.phase for s in fleet.migration_steps("m1"))) == [p.value for p in LOCAL_PATH]
    placement = fleet.current_placement("id-web")
    assert placement is not None and (placement.host, placement.generation) == ("h2", 2)


async def test_a_crash_after_the_commit_rolls_forward_from_the_database(fleet: SqlRepository) -> None:
    """A runner stopped right after the commit is resumed by another from the database alone."""
    reached, hold = asyncio.Event(), asyncio.Event()

    async def pause(phase: str, migration_id: str, step: str | None) -> None:
        if phase == Phase.COMMITTED.value:
            reached.set()
            await hold.wait()

    first = runner(fleet, FakeAgents(), pause)
    first.start("m1", start(fleet, "m1"), m.Start())
    await asyncio.wait_for(reached.wait(), 10)
    await first.close()
    agents = FakeAgents()
    second = runner(fleet, agents)
    await second.recover()
    await second.wait("m1", 10)
    assert fleet.get_migration("m1").outcome == "done"
    assert agents.steps()[0] == ("h2", "Activate")
    assert isinstance(agents.calls[0].request, w.Activate) and agents.calls[0].request.lease.endswith(":h2:g2")


async def test_each_phase_change_and_its_audit_event_land_in_one_transaction(fleet: SqlRepository) -> None:
    """Every phase the journal went through has exactly one ``migration.phase`` event, in order, by the requester."""
    await runner(fleet, FakeAgents()).run("m-ev", start(fleet, "m-ev"), m.Start())
    events = list(reversed(fleet.list_events(kind_prefix="migration.phase", limit=100)))
    phases = [s.phase for s in fleet.migration_steps("m-ev")]
    changes = [(a, b) for a, b in zip(["requested", *phases], phases, strict=False) if a != b and b != "committed"]
    assert [(e.data["frm"], e.data["to"]) for e in events] == changes
    assert {e.principal for e in events} == {"alice"} and {e.data["migration"] for e in events} == {"m-ev"}


def test_a_refused_transition_writes_no_event(fleet: SqlRepository) -> None:
    """The event shares the transition's fate: a compare-and-set that fails leaves the log as it was."""
    start(fleet, "m-cas")
    before = fleet.list_events(limit=100)
    event = Event(kind="migration.phase", message="m-cas: requested → admitted", time=T0)
    with pytest.raises(Conflict):
        fleet.advance_migration("m-cas", "admitted", T0, expected_phase="snapshotted", event=event)
    assert fleet.list_events(limit=100) == before
    fleet.advance_migration("m-cas", "admitted", T0, expected_phase="requested", event=event)
    assert fleet.list_events(limit=100)[0].kind == "migration.phase"
