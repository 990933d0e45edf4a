"""The migration runner: drives the pure protocol (:mod:`ferryman.migration.machine`) with agents and the journal.

For each migration it loops: apply an event to the machine, **persist the new state in the journal**, then execute
the commands the machine returned, turning each outcome into the next event. The commit is special: the state after
the commit is computed first (pure) and written by the same transaction that moves the VM's placement
(:meth:`Journal.commit_migration`), so a crash can never leave a committed VM whose journal says otherwise.

:meth:`MigrationRunner.recover` re-runs every migration the journal shows unfinished with a :class:`Recover` event:
before the commit it rolls back, after it rolls forward (DESIGN.md invariant 2).

It talks to the world only through the ports of :mod:`ferryman.migration.ports` (journal, agents, credentials,
inventory, audit, clock): it decides nothing the machine does not decide, and it must not import the controller, an
agent, SQL or HTTP. Admission (governor, placement policy) happens before a migration reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import ValidationError

from ferryman.cmdb.journal import MigrationRecord
from ferryman.core import errors
from ferryman.core.models import VM, DiskSpec, Event, ImageRef, Severity, VMSpec
from ferryman.migration import machine as m
from ferryman.migration.ports import Agents, Audit, Clock, Credentials, Images, Inventory, Journal, Networks, Pause
from ferryman.migration.states import Phase, Step, is_terminal
from ferryman.pki.identity import qemu_dn_of_host
from ferryman.scheduler.governor import Governor
from ferryman.wire import migration as w
from ferryman.wire.base import AgentCall, R

log = structlog.get_logger(__name__)

OUTCOMES = {Phase.DONE: "done", Phase.ROLLED_BACK: "rolled_back", Phase.REFUSED: "refused", Phase.STUCK: "stuck"}


@dataclass(frozen=True)
class RunnerSettings:
    """The runner's bounded waits (every retry loop has a cap: the machine's ``max_retries``)."""

    commit_check_delay_s: float = 0.5  # before asking an unreachable destination again whether it may take over
    retry_delay_s: float = 2.0  # before a retryable step is retried; doubles with each retry of the same step
    max_retry_delay_s: float = 30.0
    min_progress_gap_s: float = 0.1  # between two progress reads that did not wait on the agent
    progress_wait_s: float = 1.0  # a progress read waits this long on the source agent unless the stream settles
    scrub_mode: w.ScrubModeName = "zero"  # for plain VMs; an encrypted VM's copies are always crypto-erased


Handler = Callable[[str, m.MigrationState], Coroutine[Any, Any, dict[str, m.Fact]]]


class MigrationRunner:
    """Runs migrations, one asyncio task each; ``progress`` holds the RAM stream's latest progress per migration."""

    def __init__(
        self,
        *,
        journal: Journal,
        agents: Agents,
        credentials: Credentials,
        inventory: Inventory,
        audit: Audit,
        clock: Clock,
        governor: Governor,
        settings: RunnerSettings | None = None,
        pause: Pause | None = None,
        images: Images | None = None,
        networks: Networks | None = None,
    ) -> None:
        self.journal = journal
        self.agents = agents
        self.credentials = credentials
        self.inventory = inventory
        self.audit = audit
        self.clock = clock
        self.governor = governor
        self.settings = settings or RunnerSettings()
        self.pause = pause
        self.images = images
        self.networks = networks
        self.progress: dict[str, dict[str, Any]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel: dict[str, asyncio.Event] = {}
        # each running migration's journal record as this runner last wrote or read it: the runner is its only
        # writer while it runs, so its phase, ticket and generation need no read of the journal per step
        self._records: dict[str, MigrationRecord] = {}
        # and its VM row: only the commit moves it while the migration runs (the commit's result replaces it); the
        # one decision that must see a concurrent change (resuming the source) reads the journal afresh
        self._vms: dict[str, VM] = {}
        self._images: dict[str, ImageRef | None] = {}  # checked at the first step that needs it, once per run
        self._handlers: dict[Step, Handler] = {
            Step.ADMIT: self._admit,
            Step.SNAPSHOT: self._snapshot,
            Step.PREPARE_DESTINATION: self._prepare_destination,
            Step.PRE_HOOKS: self._pre_hooks,
            Step.START_MIRROR: self._start_mirror,
            Step.TRANSFER: self._transfer,
            Step.SWITCH_OVER: self._switch_over,
            Step.ACTIVATE: self._activate,
            Step.RETIRE_SOURCE: self._retire_source,
            Step.SCRUB_SOURCE: lambda mid, state: self._scrub(mid, state, "source"),
            Step.POST_HOOKS: self._post_hooks,
            Step.FINISH: self._finish,
            Step.KILL_DESTINATION: self._kill_destination,
            Step.SCRUB_DESTINATION: lambda mid, state: self._scrub(mid, state, "destination"),
            Step.RESUME_SOURCE: self._resume_source,
            Step.ROLLBACK_HOOKS: self._rollback_hooks,
        }

    # -- tasks -----------------------------------------------------------------------------------------------------

    def start(self, mid: str, state: m.MigrationState, event: m.Event) -> None:
        """Run migration ``mid`` from ``state`` with ``event`` in a task of its own."""
        self._cancel[mid] = asyncio.Event()
        task = asyncio.create_task(self.run(mid, state, event), name=f"migration-{mid}")
        self._tasks[mid] = task
        task.add_done_callback(lambda _t: (self._tasks.pop(mid, None), self._cancel.pop(mid, None)))

    def cancel(self, mid: str) -> None:
        """Interrupt ``mid``'s forward steps before the commit (the journal already records the request)."""
        flag = self._cancel.get(mid)
        if flag is not None:
            flag.set()

    async def wait(self, mid: str, limit_s: float = 1800.0) -> None:
        """Wait (bounded) until the runner of ``mid`` has stopped."""
        task = self._tasks.get(mid)
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), limit_s)

    async def recover(self) -> None:
        """At start: every unfinished migration continues under a Recover event (roll back or roll forward)."""
        for record in await self.journal.list_migrations(active_only=True):
            state = m.MigrationState.from_record(record.data["machine"])
            if record.phase == Phase.COMMITTED.value and not state.committed:
                state, _ = m.step(state, m.StepDone(Step.COMMIT))  # the commit landed; its state write did not
            await self.audit(
                "migration.recovering",
                f"migration {record.id} resumes from {record.phase}",
                "system",
                vm=record.vm_id,
                migration=record.id,
            )
            self.start(record.id, state, m.Recover())

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the loop --------------------------------------------------------------------------------------------------

    async def run(self, mid: str, state: m.MigrationState, event: m.Event) -> None:
        """Drive one migration until the machine has nothing more to do (bounded by :func:`machine.max_commands`)."""
        log.info("migration running", migration=mid, phase=state.phase.value)
        budget = m.max_commands(state)
        try:
            state, queue = await self._apply(mid, state, event)
            while queue and budget > 0:
                command = queue.pop(0)
                if self.pause is not None:
                    await self.pause(state.phase.value, mid, command.step.value if command.step else None)
                budget -= 1
                if isinstance(command, m.Commit):
                    state, queue = await self._commit(mid, state)
                    continue
                outcome = await self._execute(mid, state, command)
                if outcome is not None:
                    state, queue = await self._apply(mid, state, outcome)
            if not is_terminal(state.phase):
                await self.audit(
                    "alarm.migration_stalled",
                    f"migration {mid} stopped in {state.phase.value} (pending {state.pending})",
                    "system",
                    vm=state.vm_id,
                    severity=Severity.ALARM,
                    migration=mid,
                )
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a bug must not leave a migration silently unattended
            log.exception("migration runner crashed", migration=mid)
            await self.audit(
                "migration.runner_error",
                f"runner of {mid} failed: {err}",
                "system",
                severity=Severity.ALARM,
                migration=mid,
            )
        finally:
            self.progress.pop(mid, None)
            self._records.pop(mid, None)
            self._vms.pop(mid, None)
            self._images.pop(mid, None)

    async def _apply(
        self, mid: str, state: m.MigrationState, event: m.Event
    ) -> tuple[m.MigrationState, list[m.Command]]:
        """Step the machine and persist the new state BEFORE any of its commands runs."""
        new, commands = m.step(state, event)
        await self._persist(mid, new)
        return new, list(commands)

    async def _record(self, mid: str) -> MigrationRecord:
        record = self._records.get(mid)
        if record is None:
            record = self._records[mid] = await self.journal.get_migration(mid)
        return record

    async def _persist(self, mid: str, state: m.MigrationState) -> None:
        """Write the machine's state; a change of phase carries its audit event in the same transaction."""
        record = await self._record(mid)
        outcome = OUTCOMES.get(state.phase)
        if record.phase == state.phase.value and outcome is None and record.data.get("machine") == state.to_record():
            return
        transferred, downtime = state.facts.get("transferred_bytes"), state.facts.get("downtime_ms")
        now = self.clock.now()
        event = None
        if record.phase != state.phase.value:
            log.info("migration transition", migration=mid, frm=record.phase, to=state.phase.value)
            event = Event(
                kind="migration.phase",
                message=f"migration {mid[:8]}: {record.phase} → {state.phase.value}",
                time=now,
                principal=record.principal,
                vm=state.vm_id,
                data={"migration": mid, "frm": record.phase, "to": state.phase.value, "cause": state.cause},
            )
        self._records[mid] = await self.journal.advance_migration(
            mid,
            state.phase.value,
            now,
            outcome=outcome,
            error=state.error,
            bytes_transferred=int(transferred) if transferred is not None else None,
            downtime_ms=int(downtime) if downtime is not None else None,
            data={"machine": state.to_record()},
            step_data={
                "step": state.pending.value if state.pending else None,
                "error": state.error,
                "cause": state.cause,
            },
            event=event,
        )

    async def _destination_ready(self, mid: str, state: m.MigrationState) -> str | None:
        """Why the destination cannot take over now (None: it holds the complete, paused copy). An unreachable agent
        is asked again a few times, briefly: the guest is paused on both hosts meanwhile, and resuming the source
        (the rollback) serves it better than waiting long for an agent that may not come back."""
        attempt = 0
        while True:
            try:
                check = await self._call(state.destination, mid, w.CheckDestination(ticket=await self._ticket(mid)), 60)
            except errors.TransientError as err:
                if attempt >= state.max_retries:
                    return f"{state.destination} did not answer: {err}"
                await self.clock.sleep(self.settings.commit_check_delay_s * 2**attempt)
                attempt += 1
                continue
            except errors.FerrymanError as err:
                return str(err)
            return None if check.ok else check.detail

    async def _commit(self, mid: str, state: m.MigrationState) -> tuple[m.MigrationState, list[m.Command]]:
        """The linearisation point: placement, generation, phase and post-commit machine state in ONE transaction,
        and only once the destination is known to hold the complete copy (else the rollback keeps the source)."""
        refusal = await self._destination_ready(mid, state)
        if refusal is not None:
            failed = m.StepFailed(Step.COMMIT, f"destination not ready: {refusal}", retryable=False)
            return await self._apply(mid, state, failed)
        after, commands = m.step(state, m.StepDone(Step.COMMIT))
        try:
            record, vm, placement = await self.journal.commit_migration(
                mid, self.clock.now(), data={"machine": after.to_record()}
            )
            self._records[mid], self._vms[mid] = record, vm
        except errors.FerrymanError as err:  # the transaction did not land: nothing changed
            return await self._apply(mid, state, m.StepFailed(Step.COMMIT, str(err), retryable=False))
        await self.inventory.committed(vm)
        await self.audit(
            "migration.committed",
            f"{vm.name} now lives on {placement.host} (generation {placement.generation})",
            record.principal,
            vm=vm.id,
            host=placement.host,
            migration=mid,
        )
        return after, list(commands)

    async def _execute(self, mid: str, state: m.MigrationState, command: m.Command) -> m.Event | None:
        if isinstance(command, m.RaiseAlarm):
            alarm = f"alarm.{command.kind}"
            await self.audit(alarm, command.message, "system", vm=state.vm_id, severity=Severity.ALARM, migration=mid)
            return None
        if isinstance(command, m.Finish) and command.step is None:
            await self._close(mid, state)
            await self._finished(mid, state, command)
            return None
        step = command.step
        assert step is not None
        flag = self._cancel.get(mid)
        # a cancel interrupts forward steps before the commit only; rollback and post-commit steps run to their end
        cancellable = flag is not None and not state.committed and state.phase is not Phase.ROLLING_BACK
        if cancellable and flag is not None and flag.is_set():
            return m.Cancel()
        try:
            call: asyncio.Task[dict[str, m.Fact]] = asyncio.create_task(self._handlers[step](mid, state))
            if cancellable and flag is not None:
                waiter = asyncio.create_task(flag.wait())
                done, _ = await asyncio.wait({call, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if call not in done:  # cancelled while the step ran: stop it, then let the machine roll back
                    call.cancel()
                    with contextlib.suppress(asyncio.CancelledError, errors.FerrymanError):
                        await call
                    return m.Cancel()
            facts = await call
        except errors.TransientError as err:
            # the machine may retry this step: leave the failing host a moment first (bounded by max_retries)
            delay = min(self.settings.retry_delay_s * 2**state.retries, self.settings.max_retry_delay_s)
            await self.clock.sleep(delay)
            return m.StepFailed(step, str(err), retryable=True)
        except errors.FerrymanError as err:
            return m.StepFailed(step, str(err), retryable=False)
        except ValidationError as err:  # a request this runner could not even form (a fact missing or malformed)
            problem = f"malformed {step.value} request: {err.error_count()} problem(s)"
            return m.StepFailed(step, problem, retryable=False)
        return m.StepDone(step, facts)

    async def _finished(self, mid: str, state: m.MigrationState, finish: m.Finish) -> None:
        record = await self._record(mid)
        severity = Severity.INFO if finish.outcome in {"done", "rolled_back"} else Severity.ALARM
        await self.audit(
            f"migration.{finish.outcome}",
            f"migration {mid} {finish.outcome}" + (f": {state.cause}" if state.cause else ""),
            record.principal,
            vm=state.vm_id,
            severity=severity,
            migration=mid,
            disrupted=finish.disrupted,
        )

    # -- talking to agents -----------------------------------------------------------------------------------------

    async def _ticket(self, mid: str) -> str:
        return str((await self._record(mid)).data["ticket"])

    async def _call(self, host: str, mid: str, request: AgentCall[R], limit_s: float = 120) -> R:
        return await self.agents.call(host, mid, request, limit_s=limit_s)

    async def _vm(self, state: m.MigrationState) -> VM:
        vm = self._vms.get(state.migration_id)
        if vm is None:
            vm = self._vms[state.migration_id] = await self.journal.get_vm(state.vm_id)
        return vm

    async def _image(self, mid: str, state: m.MigrationState) -> ImageRef | None:
        """The VM's registry image, checked by the registry (an unusable image fails the step that needs it)."""
        if mid not in self._images:
            vm = await self._vm(state)
            self._images[mid] = await self.images.ref(vm) if self.images is not None else None
        return self._images[mid]

    async def _generation(self, mid: str) -> int:
        """The VM's generation when the migration was requested (the source copy's)."""
        return (await self._record(mid)).generation

    async def _source_key(self, mid: str, state: m.MigrationState) -> bytes | None:
        return await self.credentials.disk_key(await self._vm(state), state.source, await self._generation(mid))

    async def _destination_key(self, mid: str, state: m.MigrationState, *, make: bool = False) -> bytes | None:
        record = await self._record(mid)
        return await self.credentials.destination_key(await self._vm(state), record, make=make)

    async def _size(self, state: m.MigrationState) -> int:
        vm = await self._vm(state)
        return vm.memory_mb * (1 << 20) + (0 if state.shared_storage else vm.disk_bytes)

    async def _spec(self, mid: str, state: m.MigrationState) -> VMSpec:
        vm = await self._vm(state)
        f = state.facts
        return VMSpec(
            vm_id=vm.id,
            name=vm.name,
            vcpus=vm.vcpus,
            memory_mb=vm.memory_mb,
            disks=(DiskSpec(vm.disk_bytes),),
            canary=vm.canary,
            generation=await self._generation(mid),
            dirty_kib_per_s=int(f.get("dirty_kib_per_s") or 256),
            record_interval_ms=int(f.get("record_interval_ms") or 1000),
            encrypted=vm.encrypted,
            resident_mib=int(f.get("resident_mib") or 0),
            image=await self._image(mid, state),
            nics=await self.networks.nics(vm, state.destination) if self.networks is not None else (),
        )

    async def _hooks(self, mid: str, host: str, point: w.HookPointName, **context: w.JSONValue) -> str:
        out = await self._call(host, mid, w.RunHooks(ticket=await self._ticket(mid), point=point, context=context))
        if out.vetoed:
            raise errors.Conflict(f"vetoed by {host}: {out.summary}")
        return out.summary

    # -- the steps -------------------------------------------------------------------------------------------------

    async def _admit(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        record = await self._record(mid)
        if "ticket" not in record.data:  # issued once: retries and recovery present the same ticket
            self._records[mid] = await self.journal.advance_migration(
                mid,
                state.phase.value,
                self.clock.now(),
                data={"ticket": await self.credentials.ticket(record)},
                step_data={"ticket": "issued"},
            )
        return {}

    async def _snapshot(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        request = w.TakeSnapshot(ticket=await self._ticket(mid), disk_key=await self._source_key(mid, state))
        out = await self._call(state.source, mid, request, limit_s=600)
        return {
            "snapshots": out.snapshots,
            "disk_paths": out.disk_paths,
            "dirty_kib_per_s": out.dirty_kib_per_s,
            "record_interval_ms": out.record_interval_ms,
            "resident_mib": out.resident_mib,
        }

    async def _prepare_destination(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        """The destination gets the VM's image first (verified on arrival, again when its QEMU starts), then starts
        paused, waiting for the mirror and the RAM stream."""
        shared = str(state.facts.get("disk_paths") or "").split(",") if state.shared_storage else []
        image = await self._image(mid, state)
        if image is not None and self.images is not None:
            await self.images.ensure_on(state.destination, image)
        spec = await self._spec(mid, state)
        request = w.Prepare(
            ticket=await self._ticket(mid),
            spec=spec,
            source_dn=qemu_dn_of_host(state.source),
            crl_pem=await self.credentials.crl(),
            shared_disks=[p for p in shared if p],
            disk_key=await self._destination_key(mid, state, make=True),
        )
        out = await self._call(state.destination, mid, request, limit_s=120)
        facts: dict[str, m.Fact] = {
            "dst_address": out.address,
            "migration_port": out.migration_port,
            "nbd_port": out.nbd_port,
        }
        if spec.nics and self.networks is not None:  # the rules stand, verified, before a byte of the VM arrives
            facts["nic_rules"] = await self.networks.verified(await self._vm(state), state.destination, out.nics)
        return facts

    async def _pre_hooks(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        return {
            "pre_source": await self._hooks(mid, state.source, "pre-migrate-source"),
            "pre_destination": await self._hooks(mid, state.destination, "pre-migrate-destination"),
        }

    async def _start_mirror(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        within = self.governor.completion_timeout_s(await self._size(state))
        request = w.StartMirror(
            ticket=await self._ticket(mid),
            dst_address=str(state.facts["dst_address"]),
            nbd_port=int(state.facts["nbd_port"] or 0),
            crl_pem=await self.credentials.crl(),
            within=within,
        )
        out = await self._call(state.source, mid, request, limit_s=within + 30)
        return {"mirrored_bytes": out.mirrored_bytes}

    async def _transfer(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        cap = (await self._record(mid)).data.get("bandwidth_mib_s")
        bandwidth = int(cap) << 20 if cap else self.governor.settings.bandwidth_cap_bytes_per_s
        request = w.StartTransfer(
            ticket=await self._ticket(mid),
            dst_address=str(state.facts["dst_address"]),
            migration_port=int(state.facts["migration_port"] or 0),
            crl_pem=await self.credentials.crl(),
            bandwidth_bytes_per_s=bandwidth,
        )
        await self._call(state.source, mid, request)
        return {}

    async def _switch_over(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        """Follow the RAM stream (progress for the CLI) until it completes, then end the mirrors on the source."""
        clock, s = self.clock, self.settings
        deadline = clock.monotonic() + self.governor.completion_timeout_s(await self._size(state))
        stalled_since, last = clock.monotonic(), -1
        ticket = await self._ticket(mid)
        while True:
            asked = clock.monotonic()
            progress = await self._call(state.source, mid, w.ReadProgress(ticket=ticket, wait_s=s.progress_wait_s))
            self.progress[mid] = progress.model_dump()
            if progress.status == "completed":
                break
            if progress.status in {"failed", "cancelled", "none"}:
                raise errors.HypervisorError(f"RAM transfer {progress.status}")
            if progress.transferred_bytes != last:
                stalled_since, last = clock.monotonic(), progress.transferred_bytes
            if clock.monotonic() - stalled_since > self.governor.progress_timeout_s or clock.monotonic() > deadline:
                raise errors.TransientError("RAM transfer made no progress in time")
            if clock.monotonic() - asked < s.min_progress_gap_s:  # an answer that did not wait: no tight loop
                await clock.sleep(s.min_progress_gap_s)
        out = await self._call(state.source, mid, w.SwitchOver(ticket=ticket, within=120), limit_s=180)
        return {"transferred_bytes": out.transferred_bytes, "downtime_ms": out.downtime_ms, "total_ms": out.total_ms}

    async def _activate(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        vm = await self._vm(state)  # committed: vm.generation is the new one
        request = w.Activate(
            ticket=await self._ticket(mid),
            lease=await self.credentials.lease(vm.id, state.destination, vm.generation),
            disk_key=await self._destination_key(mid, state),
        )
        out = await self._call(state.destination, mid, request)
        if out.restarted:
            await self._restarted(mid, state, state.destination)
        return {"activated_generation": out.generation, "activation_seq": out.last_seq}

    async def _retire_source(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        await self._call(state.source, mid, w.Retire(ticket=await self._ticket(mid)))
        return {}

    async def _scrub(self, mid: str, state: m.MigrationState, side: w.Side) -> dict[str, m.Fact]:
        """The losing side's copy goes: for an encrypted VM its key is destroyed first (crypto-erase that holds even
        if the host never answers), then the host scrubs every artefact and returns the receipts."""
        host = state.source if side == "source" else state.destination
        vm = await self._vm(state)
        generation = await self._generation(mid) + (0 if side == "source" else 1)
        destroyed = await self.credentials.destroy_keys(
            vm, f"migration {mid}: the {side} copy lost", host=host, generation=generation
        )
        mode: w.ScrubModeName = "crypto" if vm.encrypted else self.settings.scrub_mode
        request = w.Scrub(ticket=await self._ticket(mid), side=side, mode=mode)
        out = await self._call(host, mid, request, limit_s=1800)
        receipts = await self.inventory.store_receipts(host, out.receipts, mid)
        total = sum(r.bytes for r in out.receipts)
        await self.audit(
            "scrub.done",
            f"{len(out.receipts)} artefact(s), {total} bytes scrubbed on {host}",
            "system",
            vm=state.vm_id,
            host=host,
            migration=mid,
            side=side,
            receipts=receipts,
        )
        facts: dict[str, m.Fact] = {f"scrubbed_{side}_bytes": total}
        if destroyed:
            facts[f"{side}_keys_destroyed"] = ",".join(destroyed)
        return facts

    async def _post_hooks(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        """Validation first (the guest runs on the destination), then the hooks."""
        request = w.Validate(ticket=await self._ticket(mid), disk_key=await self._destination_key(mid, state))
        check = await self._call(state.destination, mid, request, limit_s=120)
        if not check.ok and not check.running:
            # the committed copy's QEMU is gone: activation boots it again from its disks (roll forward), once
            await self._activate(mid, state)
            check = await self._call(state.destination, mid, request, limit_s=120)
        if not check.ok:
            raise errors.HypervisorError(f"validation on {state.destination} failed: {check.detail}")
        return {
            "validation": check.detail,
            "post_destination": await self._hooks(mid, state.destination, "post-migrate-destination"),
        }

    async def _finish(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        await self._close(mid, state)
        await self._finished(mid, state, m.Finish("done"))
        return {}

    async def _close(self, mid: str, state: m.MigrationState) -> None:
        """Both hosts scrub their copy of this migration's TLS material and forget it (best effort: a host that is
        down keeps it until the reconciliation of residues, and its ticket has expired by then)."""
        if "ticket" not in (await self._record(mid)).data:
            return
        roles: tuple[tuple[str, w.Side], ...] = ((state.source, "source"), (state.destination, "destination"))
        for host, role in roles:
            try:
                await self._call(host, mid, w.Close(ticket=await self._ticket(mid), role=role))
            except errors.FerrymanError as err:
                await self.audit(
                    "migration.close_failed",
                    f"{host} could not close migration {mid}: {err}",
                    "system",
                    host=host,
                    severity=Severity.WARNING,
                    migration=mid,
                )

    async def _kill_destination(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        await self._call(state.destination, mid, w.KillDestination(ticket=await self._ticket(mid)))
        return {}

    async def _resume_source(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        """The source runs again under a lease for the generation the migration started from (never committed)."""
        generation = await self._generation(mid)
        vm = self._vms[mid] = await self.journal.get_vm(state.vm_id)  # afresh: has anything moved it meanwhile?
        if vm.generation != generation:
            raise errors.Conflict(f"VM {vm.name} is at generation {vm.generation}: this migration's source is stale")
        request = w.ResumeSource(
            ticket=await self._ticket(mid),
            lease=await self.credentials.lease(vm.id, state.source, generation),
            disk_key=await self._source_key(mid, state),
        )
        out = await self._call(state.source, mid, request)
        if out.restarted:
            await self._restarted(mid, state, state.source)
        return {"source_run_state": out.run_state}

    async def _restarted(self, mid: str, state: m.MigrationState, host: str) -> None:
        await self.audit(
            "migration.vm_restarted",
            f"the QEMU of the copy of record on {host} had died; the VM was booted again from its disks",
            "system",
            vm=state.vm_id,
            host=host,
            severity=Severity.WARNING,
            migration=mid,
        )

    async def _rollback_hooks(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        request = w.RunHooks(ticket=await self._ticket(mid), point="rollback", context={"cause": state.cause})
        out = await self._call(state.source, mid, request)
        return {"rollback_hooks": out.summary}
