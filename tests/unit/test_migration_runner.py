"""The migration runner driven through its ports' fakes: every phase, retries, cancels, crashes and recovery."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ferryman.cmdb.journal import MigrationRecord
from ferryman.core import errors
from ferryman.core.models import VM, ImageRef, Severity, VMState
from ferryman.migration import machine as m
from ferryman.migration.runner import MigrationRunner, RunnerSettings
from ferryman.migration.states import LOCAL_PATH, SHARED_PATH, Phase
from ferryman.scheduler.governor import Governor, GovernorSettings
from ferryman.testing.migration import (
    FakeAgents,
    FakeAudit,
    FakeCredentials,
    FakeImages,
    FakeInventory,
    FakeJournal,
    FakeRunnerClock,
)
from ferryman.wire import migration as w

MID = "5f0c8a4e-0000-4000-8000-000000000001"


@dataclass
class World:
    journal: FakeJournal
    agents: FakeAgents
    credentials: FakeCredentials
    inventory: FakeInventory
    audit: FakeAudit
    clock: FakeRunnerClock
    vm: VM
    images: FakeImages = dataclasses.field(default_factory=FakeImages)

    def runner(self, *, pause: object = None, settings: RunnerSettings | None = None) -> MigrationRunner:
        return MigrationRunner(
            journal=self.journal,
            agents=self.agents,
            credentials=self.credentials,
            inventory=self.inventory,
            audit=self.audit,
            clock=self.clock,
            governor=Governor(GovernorSettings(), lambda: 0.5),
            settings=settings or RunnerSettings(),
            pause=pause,  # type: ignore[arg-type]
            images=self.images,
        )

    def new_migration(self, *, shared: bool = False) -> m.MigrationState:
        state = m.initial(MID, self.vm.id, "host-a", "host-b", shared)
        now = self.clock.now()
        self.journal.add_migration(
            MigrationRecord(
                id=MID,
                vm_id=self.vm.id,
                source="host-a",
                destination="host-b",
                shared_storage=shared,
                phase=Phase.REQUESTED.value,
                principal="alice",
                generation=self.vm.generation,
                requested_at=now,
                updated_at=now,
                data={"machine": state.to_record()},
            )
        )
        return state

    def record(self) -> MigrationRecord:
        return self.journal.migrations[MID]

    def placed_on(self) -> tuple[str, int]:
        placement = self.journal.placements[self.vm.id]
        return placement.host, placement.generation


def make_world(*, encrypted: bool = False) -> World:
    clock = FakeRunnerClock()
    vm = VM(
        id="vm-1",
        name="web-1",
        tenant="acme",
        memory_mb=128,
        vcpus=1,
        disk_bytes=64 << 20,
        image="lab",
        canary="canary-1",
        state=VMState.RUNNING,
        encrypted=encrypted,
    )
    journal = FakeJournal()
    journal.add_vm(vm, "host-a", clock.now())
    return World(journal, FakeAgents(), FakeCredentials(), FakeInventory(), FakeAudit(), clock, vm)


@pytest.fixture
def world() -> Iterator[World]:
    yield make_world()


async def run_to_end(world: World, state: m.MigrationState, event: m.Event | None = None) -> MigrationRecord:
    runner = world.runner()
    await runner.run(MID, state, event or m.Start())
    assert runner.progress == {}
    return world.record()


def at(world: World, kind: str) -> list[tuple[str, str]]:
    return [c for c in world.agents.steps() if c[1] == kind]


class PauseAt:
    """A failpoint: holds the runner before a command in ``phase`` (optionally of ``step``) until released."""

    def __init__(self, phase: Phase, step: str | None = None) -> None:
        self.phase, self.step = phase.value, step
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, phase: str, migration_id: str, step: str | None) -> None:
        if phase == self.phase and (self.step is None or step == self.step) and not self.reached.is_set():
            self.reached.set()
            await self.release.wait()


async def test_local_migration_walks_every_phase_in_order_and_commits_once(world: World) -> None:
    """A healthy local-storage migration persists each forward phase in order, commits once, and ends done."""
    record = await run_to_end(world, world.new_migration())
    assert record.outcome == "done" and record.phase == "done"
    written = list(dict.fromkeys(world.journal.phases[MID]))
    assert written == [p.value for p in LOCAL_PATH]
    assert world.journal.commits == 1 and world.placed_on() == ("host-b", 2)
    assert world.inventory.committed_vms == ["vm-1"]
    assert world.agents.steps()[:9] == [
        ("host-a", "TakeSnapshot"),
        ("host-b", "Prepare"),
        ("host-a", "RunHooks"),
        ("host-b", "RunHooks"),
        ("host-a", "StartMirror"),
        ("host-a", "StartTransfer"),
        ("host-a", "ReadProgress"),
        ("host-a", "SwitchOver"),
        ("host-b", "CheckDestination"),
    ]
    assert world.agents.steps()[9:] == [
        ("host-b", "Activate"),
        ("host-a", "Retire"),
        ("host-a", "Scrub"),
        ("host-b", "Validate"),
        ("host-b", "RunHooks"),
        ("host-a", "Close"),
        ("host-b", "Close"),
    ]
    assert [(h, mid) for h, mid, _ in world.inventory.receipts] == [("host-a", MID)]
    kinds = world.audit.kinds()
    assert kinds.index("migration.committed") < kinds.index("scrub.done") < kinds.index("migration.done")


async def test_every_call_carries_the_ticket_issued_once_and_the_host_pairs_credentials(world: World) -> None:
    """The ticket is issued at admission and presented by every step; leases name the copy's host and generation."""
    await run_to_end(world, world.new_migration())
    ticket = world.record().data["ticket"]
    assert ticket == await world.credentials.ticket(world.record())
    assert all(getattr(c.request, "ticket", None) == ticket for c in world.agents.calls)
    activate = next(c.request for c in world.agents.calls if isinstance(c.request, w.Activate))
    assert activate.lease == "lease:vm-1:host-b:g2"
    prepare = next(c.request for c in world.agents.calls if isinstance(c.request, w.Prepare))
    assert prepare.source_dn == "O=Ferryman,OU=host,CN=host-a" and prepare.spec.generation == 1
    assert prepare.spec.record_interval_ms == 1000 and prepare.shared_disks == []


async def test_shared_storage_skips_the_mirror_and_hands_over_the_disk_paths(world: World) -> None:
    """On shared storage nothing is mirrored and the destination opens the source's disk paths."""
    record = await run_to_end(world, world.new_migration(shared=True))
    assert record.outcome == "done"
    assert list(dict.fromkeys(world.journal.phases[MID])) == [p.value for p in SHARED_PATH]
    assert at(world, "StartMirror") == []
    prepare = next(c.request for c in world.agents.calls if isinstance(c.request, w.Prepare))
    assert prepare.shared_disks == ["/var/lib/ferryman/vms/x/disk0.qcow2"]


async def test_a_transient_failure_after_the_commit_is_retried_after_a_growing_delay(world: World) -> None:
    """An unreachable destination at activation is asked again (2 s, then 4 s later) and the migration completes."""
    world.agents.fail(w.Activate, errors.AgentUnreachable("host-b is rebooting"), times=2)
    record = await run_to_end(world, world.new_migration())
    assert record.outcome == "done" and world.journal.commits == 1
    assert len(at(world, "Activate")) == 3
    assert world.clock.sleeps[-2:] == [2.0, 4.0]


async def test_a_failure_beyond_the_retries_after_the_commit_is_stuck_with_an_alarm(world: World) -> None:
    """After the commit nothing rolls back: a step that keeps failing ends STUCK and raises an operator alarm."""
    world.agents.fail(w.Retire, errors.AgentUnreachable("host-a is gone"), times=10)
    record = await run_to_end(world, world.new_migration())
    assert record.outcome == "stuck" and world.placed_on() == ("host-b", 2)
    assert len(at(world, "Retire")) == m.DEFAULT_MAX_RETRIES + 1
    alarms = [e for e in world.audit.events if e.severity is Severity.ALARM]
    assert [e.kind for e in alarms][:1] == ["alarm.migration_stuck_rolling_forward"]


async def test_a_scrub_error_keeps_its_retryability_across_the_wire(world: World) -> None:
    """A scrub the agent could not finish is retried (its error is transient), not declared stuck at once."""
    world.agents.fail(w.Scrub, errors.ScrubIncomplete("host-a: disk0.qcow2 busy"), times=1)
    record = await run_to_end(world, world.new_migration())
    assert record.outcome == "done" and len(at(world, "Scrub")) == 2


async def test_a_failure_before_the_commit_rolls_back_in_order_and_keeps_the_source(world: World) -> None:
    """A failed RAM transfer kills and scrubs the destination, then resumes the source under its own lease."""
    world.agents.fail(w.StartTransfer, errors.HypervisorError("QEMU refused migrate"))
    record = await run_to_end(world, world.new_migration())
    assert record.outcome == "rolled_back" and world.journal.commits == 0
    assert world.placed_on() == ("host-a", 1)
    rollback = world.agents.steps()[world.agents.steps().index(("host-a", "StartTransfer")) + 1 :]
    assert rollback == [
        ("host-b", "KillDestination"),
        ("host-b", "Scrub"),
        ("host-a", "ResumeSource"),
        ("host-a", "RunHooks"),
        ("host-a", "Close"),
        ("host-b", "Close"),
    ]
    resume = next(c.request for c in world.agents.calls if isinstance(c.request, w.ResumeSource))
    assert resume.lease == "lease:vm-1:host-a:g1"
    assert m.MigrationState.from_record(record.data["machine"]).disrupted


async def test_a_veto_by_a_pre_hook_rolls_back_without_counting_as_a_disruption(world: World) -> None:
    """A pre-migration hook that says no is a decision: rolled back, not disrupted."""
    world.agents.answer(w.RunHooks, w.HooksRun(vetoed=True, summary="maintenance window closed", results=[]))
    record = await run_to_end(world, world.new_migration())
    assert record.outcome == "rolled_back" and "maintenance window closed" in (record.error or "")
    assert not m.MigrationState.from_record(record.data["machine"]).disrupted


async def test_a_destination_that_is_not_ready_at_the_commit_means_rollback(world: World) -> None:
    """The commit happens only if the destination holds the complete paused copy; otherwise the source resumes."""
    world.agents.answer(w.CheckDestination, w.DestinationCheck(ok=False, detail="guest running"))
    record = await run_to_end(world, world.new_migration())
    assert record.outcome == "rolled_back" and world.journal.commits == 0 and world.placed_on() == ("host-a", 1)


async def test_an_unreachable_destination_at_the_commit_is_asked_a_bounded_number_of_times(world: World) -> None:
    """The readiness check retries max_retries times with doubling waits, then rolls back."""
    world.agents.fail(w.CheckDestination, errors.AgentUnreachable("no route"), times=100)
    record = await run_to_end(world, world.new_migration())
    assert record.outcome == "rolled_back"
    assert len(at(world, "CheckDestination")) == m.DEFAULT_MAX_RETRIES + 1
    assert world.clock.sleeps[: m.DEFAULT_MAX_RETRIES] == [0.5, 1.0, 2.0]


async def test_a_stalled_ram_stream_times_out_and_rolls_back(world: World) -> None:
    """Progress that does not move for the governor's progress timeout is a failure, not an endless wait."""
    stalled = w.Progress(
        status="active",
        transferred_bytes=10,
        remaining_bytes=10,
        total_bytes=20,
        rate_bytes_per_s=0.0,
        dirty_pages_rate=0,
        mirror_offset=0,
        mirror_length=0,
    )
    world.agents.answer(w.ReadProgress, stalled)
    record = await run_to_end(world, world.new_migration())
    assert record.outcome == "rolled_back" and "no progress" in (record.error or "")
    reads = len(at(world, "ReadProgress"))
    assert 1 < reads < 10_000


async def test_cancel_before_the_commit_interrupts_the_running_step_and_rolls_back(world: World) -> None:
    """A cancel while the mirror runs stops it and rolls back; the VM stays where it was."""
    release = world.agents.hold(w.StartMirror)
    runner = world.runner()
    runner.start(MID, world.new_migration(), m.Start())
    for _ in range(100):
        if at(world, "StartMirror"):
            break
        await asyncio.sleep(0)
    assert at(world, "StartMirror") == [("host-a", "StartMirror")]  # the cancel strikes while the mirror runs
    runner.cancel(MID)
    await runner.wait(MID, 5)
    release.set()
    record = world.record()
    assert record.outcome == "rolled_back" and world.placed_on() == ("host-a", 1)
    assert "cancelled" in (m.MigrationState.from_record(record.data["machine"]).cause or "")
    assert at(world, "StartTransfer") == []


async def test_cancel_after_the_commit_is_recorded_and_the_migration_completes(world: World) -> None:
    """After the commit a cancel cannot undo the move: it is recorded and the migration rolls forward to done."""
    release = world.agents.hold(w.Activate)
    runner = world.runner()
    runner.start(MID, world.new_migration(), m.Start())
    for _ in range(200):
        if at(world, "Activate"):
            break
        await asyncio.sleep(0)
    assert at(world, "Activate") == [("host-b", "Activate")]  # the cancel strikes after the commit
    runner.cancel(MID)
    release.set()
    await runner.wait(MID, 5)
    assert world.record().outcome == "done" and world.placed_on() == ("host-b", 2)


@pytest.mark.parametrize(
    ("crash_phase", "outcome", "host", "generation"),
    [
        (Phase.DEST_PREPARED, "rolled_back", "host-a", 1),
        (Phase.TRANSFERRING, "rolled_back", "host-a", 1),
        (Phase.SWITCHED_OVER, "rolled_back", "host-a", 1),
        (Phase.COMMITTED, "done", "host-b", 2),
        (Phase.SOURCE_RETIRED, "done", "host-b", 2),
    ],
)
async def test_a_controller_crash_recovers_from_the_journal(
    world: World, crash_phase: Phase, outcome: str, host: str, generation: int
) -> None:
    """A controller killed in any phase resumes from the journal: before the commit it rolls back, after it forward."""
    pause = PauseAt(crash_phase)
    first = world.runner(pause=pause)
    first.start(MID, world.new_migration(), m.Start())
    await asyncio.wait_for(pause.reached.wait(), 5)
    await first.close()  # the controller dies here: its state is only what the journal holds
    assert world.record().outcome is None
    second = world.runner()
    await second.recover()
    await second.wait(MID, 5)
    record = world.record()
    assert (record.outcome, world.placed_on()) == (outcome, (host, generation))
    assert world.journal.commits == (1 if outcome == "done" else 0)
    assert "migration.recovering" in world.audit.kinds()
    if outcome == "rolled_back":
        assert world.agents.steps()[-4:-2] == [("host-a", "ResumeSource"), ("host-a", "RunHooks")]


async def test_a_commit_whose_state_write_was_lost_rolls_forward(world: World) -> None:
    """The journal says COMMITTED but its machine state predates the commit: recovery must not roll back."""
    pause = PauseAt(Phase.SWITCHED_OVER, "commit")
    first = world.runner(pause=pause)
    first.start(MID, world.new_migration(), m.Start())
    await asyncio.wait_for(pause.reached.wait(), 5)
    await first.close()
    await world.journal.commit_migration(MID, world.clock.now())  # the placement moved; the machine state is old
    second = world.runner()
    await second.recover()
    await second.wait(MID, 5)
    assert world.record().outcome == "done" and world.placed_on() == ("host-b", 2) and world.journal.commits == 1
    assert at(world, "ResumeSource") == []


async def test_repeated_crashes_end_stuck_instead_of_looping(world: World) -> None:
    """A migration that keeps being interrupted after the commit stops at max_recoveries, with an alarm."""
    pause = PauseAt(Phase.COMMITTED)
    runner = world.runner(pause=pause)
    runner.start(MID, world.new_migration(), m.Start())
    await asyncio.wait_for(pause.reached.wait(), 5)
    await runner.close()
    for _ in range(m.DEFAULT_MAX_RECOVERIES + 1):
        pause = PauseAt(Phase.COMMITTED)
        runner = world.runner(pause=pause)
        await runner.recover()
        done = asyncio.ensure_future(runner.wait(MID, 5))
        await asyncio.wait({done, asyncio.ensure_future(pause.reached.wait())}, return_when=asyncio.FIRST_COMPLETED)
        await runner.close()
        if world.record().outcome is not None:
            break
    assert world.record().outcome == "stuck"
    assert any(e.kind.startswith("alarm.migration_stuck") for e in world.audit.events)


async def test_an_encrypted_vms_losing_copy_loses_its_key_before_its_scrub() -> None:
    """The source copy's key is destroyed before the source host is asked to scrub it (crypto-erase first)."""
    world = make_world(encrypted=True)
    destroyed_at_scrub: list[list[tuple[str, str, int]]] = []

    class Watching(FakeAgents):
        async def call(self, host, target, request, *, limit_s=120):  # type: ignore[no-untyped-def]
            if isinstance(request, w.Scrub):
                destroyed_at_scrub.append(list(world.credentials.destroyed))
            return await super().call(host, target, request, limit_s=limit_s)

    world.agents = Watching()
    record = await run_to_end(world, world.new_migration())
    assert destroyed_at_scrub == [[("vm-1", "host-a", 1)]]
    assert record.outcome == "done"
    assert world.credentials.destroyed == [("vm-1", "host-a", 1)]
    assert ("vm-1", "host-b", 2) in world.credentials.keys
    scrub = next(c.request for c in world.agents.calls if isinstance(c.request, w.Scrub))
    assert scrub.mode == "crypto"
    assert record.data["machine"]["facts"]["source_keys_destroyed"] == "host-a:g1"


async def test_a_bug_in_a_step_is_an_alarm_not_a_silent_stop(world: World) -> None:
    """An unexpected exception leaves an alarm event naming the migration (it is never swallowed silently)."""

    class Boom(FakeAgents):
        async def call(self, host, target, request, *, limit_s=120):  # type: ignore[no-untyped-def]
            if isinstance(request, w.Prepare):
                raise RuntimeError("bug")
            return await super().call(host, target, request, limit_s=limit_s)

    world.agents = Boom()
    await run_to_end(world, world.new_migration())
    assert any(e.kind == "migration.runner_error" and e.severity is Severity.ALARM for e in world.audit.events)


async def test_the_fake_journal_commit_is_a_compare_and_set() -> None:
    """The fake keeps the journal's contract: only a switched-over migration at the VM's generation commits."""
    world = make_world()
    world.new_migration()
    with pytest.raises(errors.Conflict):
        await world.journal.commit_migration(MID, dt.datetime.now(dt.UTC))
    with pytest.raises(errors.Conflict):
        await world.journal.advance_migration(MID, "committed", dt.datetime.now(dt.UTC))


async def test_a_request_the_runner_cannot_form_fails_its_step_instead_of_crashing(world: World) -> None:
    """A request the wire refuses to build (a scrub mode no agent knows) is a failed step: after the commit the
    migration ends STUCK with an operator alarm, never as a crashed runner."""
    runner = world.runner(settings=RunnerSettings(scrub_mode="shred"))  # type: ignore[arg-type]
    await runner.run(MID, world.new_migration(), m.Start())
    record = world.record()
    assert record.outcome == "stuck" and "malformed scrub_source request" in (record.error or "")
    assert world.placed_on() == ("host-b", 2) and at(world, "Scrub") == []
    assert "alarm.migration_stuck_rolling_forward" in world.audit.kinds()
    assert "migration.runner_error" not in world.audit.kinds()


IMAGE = ImageRef("debian-12", "sha256:" + "d" * 64, 1 << 20, "qcow2", "c2ln", "PEM")


async def test_the_destination_gets_the_vms_image_before_it_prepares_and_the_spec_names_it(world: World) -> None:
    """An image-booted VM: the image goes to the destination first, then Prepare carries it in the spec."""
    world.journal.vms[world.vm.id] = dataclasses.replace(world.vm, image="debian-12")
    world.images.refs["debian-12"] = IMAGE
    record = await run_to_end(world, world.new_migration())
    assert record.outcome == "done" and world.images.sent == [("host-b", "debian-12")]
    prepare = next(c.request for c in world.agents.calls if isinstance(c.request, w.Prepare))
    assert prepare.spec.image == IMAGE


async def test_a_vm_whose_image_was_revoked_does_not_migrate(world: World) -> None:
    """The registry refuses the image at destination preparation: nothing is sent, the migration rolls back."""
    world.journal.vms[world.vm.id] = dataclasses.replace(world.vm, image="debian-12")
    world.images.refs["debian-12"] = IMAGE
    world.images.revoked.add("debian-12")
    record = await run_to_end(world, world.new_migration())
    assert record.outcome == "rolled_back" and "revoked" in (record.error or "")
    assert world.images.sent == [] and not at(world, "Prepare")
    assert world.placed_on() == ("host-a", 1)
