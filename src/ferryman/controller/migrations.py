"""The migration runner: drives the pure protocol (:mod:`ferryman.migration.machine`) with real agents and the journal.

For each migration it loops: apply an event to the machine, **persist the new state in the journal**, then execute
the commands the machine returned, turning each outcome into the next event. The commit is special: the state after
the commit is computed first (pure) and written by the same transaction that moves the VM's placement
(:meth:`JournalRepository.commit_migration`), so a crash can never leave a committed VM whose journal says otherwise.

On controller start :meth:`MigrationService.recover` re-runs every migration the journal shows unfinished with a
:class:`Recover` event: before the commit it rolls back, after it rolls forward (DESIGN.md invariant 2).

Admission goes through the anti-thrashing governor; refusals, phase changes, scrubs and alarms are audit events with
the principal who asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import uuid
from typing import Any

import structlog

from ferryman.cmdb.journal import MigrationRecord
from ferryman.controller import failpoints
from ferryman.controller.agent_client import HttpAgentClient, with_key
from ferryman.controller.fleet import Change, Fleet
from ferryman.controller.keys import Copy
from ferryman.core import errors
from ferryman.core.models import VM, DiskSpec, Host, HostState, Severity, VMSpec, VMState
from ferryman.core.wire import spec_to_dict
from ferryman.migration import machine as m
from ferryman.migration.states import Phase, Step, is_terminal
from ferryman.pki.identity import qemu_dn_of_host
from ferryman.pki.tickets import issue_lease, issue_ticket
from ferryman.scheduler.governor import Active, Attempt, Governor, GovernorSettings, MigrationRequest

log = structlog.get_logger(__name__)

ACTIVE_STATES = {VMState.RUNNING}
COMMIT_CHECK_DELAY_S = 0.5  # before asking an unreachable destination again whether it may take over; doubles
RETRY_DELAY_S = 2.0  # before a retryable step is retried; doubles with each retry of the same step
MIN_PROGRESS_GAP_S = 0.1
PROGRESS_WAIT_S = 1.0  # a progress read waits this long on the source agent unless the RAM stream settles first:
# about one request a second during a long transfer, and the completion is known within the agent's QMP poll (50 ms)


class MigrationService:
    def __init__(
        self,
        fleet: Fleet,
        agents: HttpAgentClient,
        settings: GovernorSettings | None = None,
        scrub_mode: str = "zero",
    ) -> None:
        self.fleet = fleet
        self.scrub_mode = scrub_mode  # for plain VMs; an encrypted VM's copies are always crypto-erased
        self.repo = fleet.repo
        self.agents = agents
        self.governor = Governor(settings or GovernorSettings(), random.Random().random)
        self.progress: dict[str, dict[str, Any]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel: dict[str, asyncio.Event] = {}

    # -- requests --------------------------------------------------------------------------------------------------

    def _history(self) -> tuple[list[Active], list[Attempt]]:
        active, history = [], []
        for r in self.repo.list_migrations(limit=1000):
            if r.outcome is None:
                active.append(Active(r.vm_id, r.source, r.destination, r.principal, r.requested_at))
                continue
            disrupted = bool(r.data.get("machine", {}).get("disrupted"))
            outcome = {"done": "done", "refused": "refused", "stuck": "disrupted"}.get(
                r.outcome, "disrupted" if disrupted else "rolled_back"
            )
            end = r.finished_at or r.updated_at
            history.append(Attempt(r.vm_id, r.source, r.destination, r.principal, r.requested_at, outcome, end))  # type: ignore[arg-type]
        return active, history

    def _check_request(self, vm: VM, to: str) -> tuple[Host, Host]:
        if vm.state not in ACTIVE_STATES:
            raise errors.Conflict(f"{vm.name} is {vm.state.value}: only a running VM can be live-migrated")
        placement = self.repo.current_placement(vm.id)
        if placement is None:
            raise errors.Conflict(f"{vm.name} has no placement")
        source, destination = self.repo.get_host(placement.host), self.repo.get_host(to)
        if source.name == destination.name:
            raise errors.InvalidInput(f"{vm.name} already runs on {to}")
        if destination.state is not HostState.ENROLLED or not self.fleet.reconciler.is_fresh(destination.name):
            raise errors.Conflict(f"destination {to} is not enrolled and reporting")
        usage = {u.host.name: u for u in self.fleet.host_usage()}[to]
        if usage.host.memory_mb - usage.memory_used_mb < vm.memory_mb:
            raise errors.CapacityError(f"host {to} is full: {usage.host.memory_mb - usage.memory_used_mb} MiB free")
        return source, destination

    async def request(
        self,
        vm_name: str,
        to: str,
        *,
        shared_storage: bool,
        principal: str,
        bandwidth_mib_s: int | None = None,
        force: bool = False,
        role: str = "admin",
        automatic: bool = False,
    ) -> MigrationRecord:
        """Admit a migration (policies, then the governor) and start it; ``automatic``: a remediation plan's move,
        which a VM's policies may forbid (``auto_balance: false``). An operator's drain is not automatic."""
        vm, _ = self.fleet.get_vm(vm_name)
        source, destination = self._check_request(vm, to)
        if self.fleet.admission is not None:
            self.fleet.admission.admit_migration(
                vm, destination.name, force=force, role=role, principal=principal, automatic=automatic
            )
        now = self.fleet.clock.now()
        active, history = self._history()
        decision = self.governor.decide(
            MigrationRequest(vm.id, source.name, destination.name, principal), now=now, active=active, history=history
        )
        mid = str(uuid.uuid4())
        state = m.initial(mid, vm.id, source.name, destination.name, shared_storage)
        record = MigrationRecord(
            id=mid,
            vm_id=vm.id,
            source=source.name,
            destination=destination.name,
            shared_storage=shared_storage,
            phase=Phase.REQUESTED.value,
            principal=principal,
            generation=vm.generation,
            requested_at=now,
            updated_at=now,
            data={"machine": state.to_record(), "bandwidth_mib_s": bandwidth_mib_s},
        )
        if not decision.allowed:
            refused = dataclasses.replace(
                record, phase=Phase.REFUSED.value, outcome="refused", finished_at=now, error="; ".join(decision.reasons)
            )
            self.repo.add_migration(refused)
            for alert in decision.alerts:
                self.fleet.audit("security.thrashing", alert.message, principal, vm=vm.id, severity=Severity.ALARM)
            self.fleet.audit(
                "migration.refused",
                f"{vm.name} → {to} refused: {refused.error}",
                principal,
                vm=vm.id,
                host=source.name,
                severity=Severity.WARNING,
                migration=mid,
            )
            retry = f" (retry in {decision.retry_after_s:.0f}s)" if decision.retry_after_s else ""
            raise errors.Conflict(f"migration refused: {refused.error}{retry}")
        record = self.repo.add_migration(record)
        self.fleet.audit(
            "migration.requested",
            f"{vm.name} {source.name} → {destination.name}",
            principal,
            vm=vm.id,
            host=source.name,
            migration=mid,
            shared_storage=shared_storage,
        )
        self._spawn(mid, state, m.Start())
        return record

    async def wait_finished(self, mid: str, limit_s: float = 1800.0) -> None:
        """Wait (bounded) until the runner of ``mid`` has stopped."""
        task = self._tasks.get(mid)
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), limit_s)

    def _spawn(self, mid: str, state: m.MigrationState, event: m.Event) -> None:
        self._cancel[mid] = asyncio.Event()
        task = asyncio.create_task(self._run(mid, state, event), name=f"migration-{mid}")
        self._tasks[mid] = task
        task.add_done_callback(lambda _t: (self._tasks.pop(mid, None), self._cancel.pop(mid, None)))

    async def cancel(self, mid: str, principal: str) -> MigrationRecord:
        record = self.repo.request_cancel(mid, self.fleet.clock.now())
        self.fleet.audit(
            "migration.cancel_requested", f"cancel of migration {mid}", principal, vm=record.vm_id, migration=mid
        )
        flag = self._cancel.get(mid)
        if flag is not None:
            flag.set()
        return record

    async def drain(self, host: str, principal: str) -> tuple[list[MigrationRecord], list[str]]:
        """Move every running VM off ``host``: each to the reachable host with the most free memory, within the
        governor's limits; what cannot start now is reported, not retried in a loop."""
        self.repo.get_host(host)
        started, refused = [], []
        planned: dict[str, str] = {}  # VM id -> destination of the migrations this drain started
        for placement in self.repo.placements_on(host):
            vm = self.repo.get_vm(placement.vm_id)
            if vm.state is not VMState.RUNNING:
                refused.append(f"{vm.name}: {vm.state.value}, not running")
                continue
            targets = [
                u.host.name
                for u in sorted(
                    (
                        u
                        for u in self.fleet.host_usage()
                        if u.host.name != host
                        and u.reachable
                        and u.host.role == "compute"
                        and u.host.memory_mb - u.memory_used_mb >= vm.memory_mb
                    ),
                    key=lambda u: (u.memory_used_mb - u.host.memory_mb, u.host.name),
                )
            ]
            if not targets:
                refused.append(f"{vm.name}: no other host has {vm.memory_mb} MiB free")
                continue
            admission = self.fleet.admission
            target = admission.migration_target(vm, targets, planned) if admission else targets[0]
            if target is None:
                refused.append(f"{vm.name}: no other host is allowed by its placement policies")
                continue
            try:
                started.append(await self.request(vm.name, target, shared_storage=False, principal=principal))
                planned[vm.id] = target
            except errors.FerrymanError as err:
                refused.append(f"{vm.name}: {err}")
        self.fleet.audit(
            "host.drain", f"drain of {host}: {len(started)} started, {len(refused)} not", principal, host=host
        )
        return started, refused

    async def recover(self) -> None:
        """At start: every unfinished migration continues under a Recover event (roll back or roll forward)."""
        for record in self.repo.list_migrations(active_only=True):
            state = m.MigrationState.from_record(record.data["machine"])
            if record.phase == Phase.COMMITTED.value and not state.committed:
                state, _ = m.step(state, m.StepDone(Step.COMMIT))  # the commit landed; its state write did not
            self.fleet.audit(
                "migration.recovering",
                f"migration {record.id} resumes from {record.phase}",
                "system",
                vm=record.vm_id,
                migration=record.id,
            )
            self._spawn(record.id, state, m.Recover())

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- the loop --------------------------------------------------------------------------------------------------

    async def _run(self, mid: str, state: m.MigrationState, event: m.Event) -> None:
        log.info("migration running", migration=mid, phase=state.phase.value)
        budget = m.max_commands(state)
        try:
            state, queue = self._apply(mid, state, event)
            while queue and budget > 0:
                command = queue.pop(0)
                await failpoints.maybe_pause(state.phase, mid, command.step)  # fault injection; off unless configured
                budget -= 1
                if isinstance(command, m.Commit):
                    state, queue = await self._commit(mid, state)
                    continue
                outcome = await self._execute(mid, state, command)
                if outcome is not None:
                    state, queue = self._apply(mid, state, outcome)
            if not is_terminal(state.phase):
                self.fleet.audit(
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
            self.fleet.audit(
                "migration.runner_error",
                f"runner of {mid} failed: {err}",
                "system",
                severity=Severity.ALARM,
                migration=mid,
            )
        finally:
            self.progress.pop(mid, None)

    def _apply(self, mid: str, state: m.MigrationState, event: m.Event) -> tuple[m.MigrationState, list[m.Command]]:
        """Step the machine and persist the new state BEFORE any of its commands runs."""
        new, commands = m.step(state, event)
        self._persist(mid, new)
        return new, list(commands)

    async def _destination_ready(self, mid: str, state: m.MigrationState) -> str | None:
        """Why the destination cannot take over now (None: it holds the complete, paused copy). An unreachable agent
        is asked again a few times, briefly: the guest is paused on both hosts meanwhile, and resuming the source
        (the rollback) serves it better than waiting long for an agent that may not come back."""
        attempt = 0
        while True:
            try:
                check = await self._call(state.destination, mid, "check-destination", {}, limit_s=60)
            except errors.TransientError as err:
                if attempt >= state.max_retries:
                    return f"{state.destination} did not answer: {err}"
                await asyncio.sleep(COMMIT_CHECK_DELAY_S * 2**attempt)
                attempt += 1
                continue
            except errors.FerrymanError as err:
                return str(err)
            return None if check["ok"] else str(check["detail"])

    async def _commit(self, mid: str, state: m.MigrationState) -> tuple[m.MigrationState, list[m.Command]]:
        """The linearisation point: placement, generation, phase and post-commit machine state in ONE transaction,
        and only once the destination is known to hold the complete copy (else the rollback keeps the source)."""
        refusal = await self._destination_ready(mid, state)
        if refusal is not None:
            failed = m.StepFailed(Step.COMMIT, f"destination not ready: {refusal}", retryable=False)
            return self._apply(mid, state, failed)
        after, commands = m.step(state, m.StepDone(Step.COMMIT))
        try:
            record, vm, placement = self.repo.commit_migration(
                mid, self.fleet.clock.now(), data={"machine": after.to_record()}
            )
        except errors.FerrymanError as err:  # the transaction did not land: nothing changed
            return self._apply(mid, state, m.StepFailed(Step.COMMIT, str(err), retryable=False))
        self.fleet.reconciler.note_change(vm.id)
        self.fleet.changed(Change(vm_id=vm.id))
        self.fleet.audit(
            "migration.committed",
            f"{vm.name} now lives on {placement.host} (generation {placement.generation})",
            record.principal,
            vm=vm.id,
            host=placement.host,
            migration=mid,
        )
        return after, list(commands)

    def _persist(self, mid: str, state: m.MigrationState) -> None:
        record = self.repo.get_migration(mid)
        outcome = {
            Phase.DONE: "done",
            Phase.ROLLED_BACK: "rolled_back",
            Phase.REFUSED: "refused",
            Phase.STUCK: "stuck",
        }.get(state.phase)
        if record.phase == state.phase.value and outcome is None and record.data.get("machine") == state.to_record():
            return
        facts = state.facts
        transferred, downtime = facts.get("transferred_bytes"), facts.get("downtime_ms")
        self.repo.advance_migration(
            mid,
            state.phase.value,
            self.fleet.clock.now(),
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
        )
        if record.phase != state.phase.value:
            log.info("migration transition", migration=mid, frm=record.phase, to=state.phase.value)
            self.fleet.audit(
                "migration.phase",
                f"migration {mid[:8]}: {record.phase} → {state.phase.value}",
                record.principal,
                vm=state.vm_id,
                migration=mid,
                frm=record.phase,
                to=state.phase.value,
                cause=state.cause,
            )

    # -- executing commands ----------------------------------------------------------------------------------------

    async def _execute(self, mid: str, state: m.MigrationState, command: m.Command) -> m.Event | None:
        if isinstance(command, m.RaiseAlarm):
            self.fleet.audit(
                f"alarm.{command.kind}",
                command.message,
                "system",
                vm=state.vm_id,
                severity=Severity.ALARM,
                migration=mid,
            )
            return None
        if isinstance(command, m.Finish) and command.step is None:
            await self._close(mid, state)
            self._finished(mid, state, command)
            return None
        step = command.step
        assert step is not None
        flag = self._cancel.get(mid)
        # a cancel interrupts forward steps before the commit only; rollback and post-commit steps run to their end
        cancellable = flag is not None and not state.committed and state.phase is not Phase.ROLLING_BACK
        if cancellable and flag is not None and flag.is_set():
            return m.Cancel()
        try:
            call = asyncio.create_task(self._do(mid, state, step))
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
            await asyncio.sleep(min(RETRY_DELAY_S * 2**state.retries, 30.0))
            return m.StepFailed(step, str(err), retryable=True)
        except errors.FerrymanError as err:
            return m.StepFailed(step, str(err), retryable=False)
        return m.StepDone(step, facts)

    def _finished(self, mid: str, state: m.MigrationState, finish: m.Finish) -> None:
        record = self.repo.get_migration(mid)
        severity = Severity.INFO if finish.outcome in {"done", "rolled_back"} else Severity.ALARM
        self.fleet.audit(
            f"migration.{finish.outcome}",
            f"migration {mid} {finish.outcome}" + (f": {state.cause}" if state.cause else ""),
            record.principal,
            vm=state.vm_id,
            severity=severity,
            migration=mid,
            disrupted=finish.disrupted,
        )

    def _ticket(self, mid: str) -> str:
        return str(self.repo.get_migration(mid).data["ticket"])

    def _crl(self) -> str:
        revoked = [(c.serial, c.revoked_at) for c in self.repo.list_certificates() if c.revoked_at is not None]
        return self.fleet.ca.issue_crl(revoked).decode()

    async def _call(self, host_name: str, mid: str, step: str, body: dict[str, Any], limit_s: float = 120) -> Any:
        host = self.repo.get_host(host_name)
        return await self.agents.migration_step(host, mid, step, {"ticket": self._ticket(mid), **body}, limit_s)

    async def _do(self, mid: str, state: m.MigrationState, step: Step) -> dict[str, m.Fact]:
        handler = getattr(self, f"_step_{step.value}")
        facts: dict[str, m.Fact] = await handler(mid, state)
        return facts

    async def _step_admit(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        record = self.repo.get_migration(mid)
        if "ticket" not in record.data:  # issued once: retries and recovery present the same ticket
            _, token = issue_ticket(
                self.fleet.ca,
                migration_id=mid,
                vm_id=state.vm_id,
                source=state.source,
                destination=state.destination,
                generation=record.generation,
                shared_storage=state.shared_storage,
            )
            self.repo.advance_migration(
                mid, state.phase.value, self.fleet.clock.now(), data={"ticket": token}, step_data={"ticket": "issued"}
            )
        return {}

    def _source_key(self, mid: str, state: m.MigrationState) -> dict[str, Any]:
        """The body field with the source copy's disk key (empty for a plain VM)."""
        vm = self.repo.get_vm(state.vm_id)
        return with_key({}, self.fleet.disk_key(vm, state.source, self.repo.get_migration(mid).generation))

    def _destination_key(self, mid: str, state: m.MigrationState, *, make: bool = False) -> dict[str, Any]:
        """The body field with the destination copy's disk key. ``make`` (preparation only): made and stored on
        first use, a key of its own for new images or the source's for shared storage, where both copies open the
        same images; later steps only read it (NotFound if it is gone)."""
        vm = self.repo.get_vm(state.vm_id)
        if not vm.encrypted:
            return {}
        if self.fleet.keys is None:
            raise errors.InvalidInput(f"{vm.name} is encrypted but this controller keeps no disk keys")
        generation = self.repo.get_migration(mid).generation
        target = Copy(vm.id, state.destination, generation + 1)
        if not make:
            return with_key({}, self.fleet.keys.get(target))
        if state.shared_storage:
            key = self.fleet.keys.share(Copy(vm.id, state.source, generation), target)
        else:
            key = self.fleet.keys.ensure(target)
        return with_key({}, key)

    async def _step_snapshot(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        out = await self._call(state.source, mid, "snapshot", self._source_key(mid, state), limit_s=600)
        return {
            "snapshots": out.get("snapshots"),
            "disk_paths": out.get("disk_paths"),
            "dirty_kib_per_s": out.get("dirty_kib_per_s"),
            "record_interval_ms": out.get("record_interval_ms"),
            "resident_mib": out.get("resident_mib"),
        }

    def _spec(self, state: m.MigrationState) -> VMSpec:
        vm = self.repo.get_vm(state.vm_id)
        f = state.facts
        return VMSpec(
            vm_id=vm.id,
            name=vm.name,
            vcpus=vm.vcpus,
            memory_mb=vm.memory_mb,
            disks=(DiskSpec(vm.disk_bytes),),
            canary=vm.canary,
            generation=self.repo.get_migration(state.migration_id).generation,
            dirty_kib_per_s=int(f.get("dirty_kib_per_s") or 256),
            record_interval_ms=int(f.get("record_interval_ms") or 1000),
            encrypted=vm.encrypted,
            resident_mib=int(f.get("resident_mib") or 0),
        )

    async def _step_prepare_destination(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        shared = str(state.facts.get("disk_paths") or "").split(",") if state.shared_storage else []
        body = {
            "spec": spec_to_dict(self._spec(state)),
            "source_dn": qemu_dn_of_host(state.source),
            "crl_pem": self._crl(),
            "shared_disks": [p for p in shared if p],
            **self._destination_key(mid, state, make=True),
        }
        out = await self._call(state.destination, mid, "prepare", body, limit_s=120)
        return {"dst_address": out["address"], "migration_port": out["migration_port"], "nbd_port": out["nbd_port"]}

    async def _hooks(self, mid: str, host: str, point: str) -> str:
        out = await self._call(host, mid, f"hooks/{point}", {"context": {}}, limit_s=120)
        if out["vetoed"]:
            raise errors.Conflict(f"vetoed by {host}: {out['summary']}")
        return str(out["summary"])

    async def _step_pre_hooks(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        return {
            "pre_source": await self._hooks(mid, state.source, "pre-migrate-source"),
            "pre_destination": await self._hooks(mid, state.destination, "pre-migrate-destination"),
        }

    def _size(self, state: m.MigrationState) -> int:
        vm = self.repo.get_vm(state.vm_id)
        return vm.memory_mb * (1 << 20) + (0 if state.shared_storage else vm.disk_bytes)

    async def _step_start_mirror(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        within = self.governor.completion_timeout_s(self._size(state))
        body = {
            "dst_address": state.facts["dst_address"],
            "nbd_port": state.facts["nbd_port"],
            "crl_pem": self._crl(),
            "within": within,
        }
        out = await self._call(state.source, mid, "mirror", body, limit_s=within + 30)
        return {"mirrored_bytes": out["mirrored_bytes"]}

    async def _step_transfer(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        record = self.repo.get_migration(mid)
        cap = record.data.get("bandwidth_mib_s")
        bandwidth = int(cap) << 20 if cap else self.governor.settings.bandwidth_cap_bytes_per_s
        body = {
            "dst_address": state.facts["dst_address"],
            "migration_port": state.facts["migration_port"],
            "crl_pem": self._crl(),
            "bandwidth_bytes_per_s": bandwidth,
        }
        await self._call(state.source, mid, "transfer", body)
        return {}

    async def _step_switch_over(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        """Follow the RAM stream (progress for the CLI) until it completes, then end the mirrors on the source."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.governor.completion_timeout_s(self._size(state))
        stalled_since, last = loop.time(), -1
        while True:
            asked = loop.time()
            progress = await self._call(state.source, mid, "progress", {"wait_s": PROGRESS_WAIT_S})
            self.progress[mid] = progress
            if progress["status"] == "completed":
                break
            if progress["status"] in {"failed", "cancelled", "none"}:
                raise errors.HypervisorError(f"RAM transfer {progress['status']}")
            if progress["transferred_bytes"] != last:
                stalled_since, last = loop.time(), progress["transferred_bytes"]
            if loop.time() - stalled_since > self.governor.progress_timeout_s or loop.time() > deadline:
                raise errors.TransientError("RAM transfer made no progress in time")
            if loop.time() - asked < MIN_PROGRESS_GAP_S:  # an answer that did not wait: do not ask in a tight loop
                await asyncio.sleep(MIN_PROGRESS_GAP_S)
        out = await self._call(state.source, mid, "switchover", {"within": 120}, limit_s=180)
        return {
            "transferred_bytes": out["transferred_bytes"],
            "downtime_ms": out["downtime_ms"],
            "total_ms": out["total_ms"],
        }

    async def _step_activate(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        vm = self.repo.get_vm(state.vm_id)  # committed: vm.generation is the new one
        _, lease = issue_lease(self.fleet.ca, vm_id=vm.id, host=state.destination, generation=vm.generation)
        out = await self._call(
            state.destination, mid, "activate", {"lease": lease, **self._destination_key(mid, state)}
        )
        if out.get("restarted"):
            self._restarted(mid, state, state.destination)
        return {"activated_generation": out.get("generation"), "activation_seq": out.get("last_seq")}

    async def _step_retire_source(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        await self._call(state.source, mid, "retire", {})
        return {}

    async def _scrub(self, mid: str, state: m.MigrationState, side: str) -> dict[str, m.Fact]:
        """The losing side's copy goes: for an encrypted VM its key is destroyed first (crypto-erase that holds even
        if the host never answers), then the host scrubs every artefact and returns the receipts."""
        host = state.source if side == "source" else state.destination
        vm = self.repo.get_vm(state.vm_id)
        generation = self.repo.get_migration(mid).generation + (0 if side == "source" else 1)
        destroyed = self.fleet.destroy_keys(
            vm, f"migration {mid}: the {side} copy lost", host=host, generation=generation
        )
        mode = "crypto" if vm.encrypted else self.scrub_mode
        out = await self._call(host, mid, "scrub", {"side": side, "mode": mode}, limit_s=1800)
        receipts = self.fleet.store_scrub_receipts(host, out["receipts"], mid)
        total = sum(r["bytes"] for r in out["receipts"])
        self.fleet.audit(
            "scrub.done",
            f"{len(out['receipts'])} artefact(s), {total} bytes scrubbed on {host}",
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

    async def _step_scrub_source(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        return await self._scrub(mid, state, "source")

    async def _step_scrub_destination(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        return await self._scrub(mid, state, "destination")

    async def _step_post_hooks(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        """Validation first (the guest runs on the destination and its disk records continue), then the hooks."""
        key = self._destination_key(mid, state)
        check = await self._call(state.destination, mid, "validate", key, limit_s=120)
        if not check["ok"] and not check.get("running", True):
            # the committed copy's QEMU is gone: activation boots it again from its disks (roll forward), once
            await self._step_activate(mid, state)
            check = await self._call(state.destination, mid, "validate", key, limit_s=120)
        if not check["ok"]:
            raise errors.HypervisorError(f"validation on {state.destination} failed: {check['detail']}")
        return {
            "validation": str(check["detail"]),
            "post_destination": await self._hooks(mid, state.destination, "post-migrate-destination"),
        }

    async def _step_finish(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        await self._close(mid, state)
        self._finished(mid, state, m.Finish("done"))
        return {}

    async def _close(self, mid: str, state: m.MigrationState) -> None:
        """Both hosts scrub their copy of this migration's TLS material and forget it (best effort: a host that is
        down keeps it until the reconciliation of residues, and its ticket has expired by then)."""
        if "ticket" not in self.repo.get_migration(mid).data:
            return
        for host, role in ((state.source, "source"), (state.destination, "destination")):
            try:
                await self._call(host, mid, "close", {"role": role})
            except errors.FerrymanError as err:
                self.fleet.audit(
                    "migration.close_failed",
                    f"{host} could not close migration {mid}: {err}",
                    "system",
                    host=host,
                    severity=Severity.WARNING,
                    migration=mid,
                )

    async def _step_kill_destination(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        await self._call(state.destination, mid, "kill-destination", {})
        return {}

    async def _step_resume_source(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        """The source runs again under a lease for the generation the migration started from (never committed)."""
        generation = self.repo.get_migration(mid).generation
        vm = self.repo.get_vm(state.vm_id)
        if vm.generation != generation:
            raise errors.Conflict(f"VM {vm.name} is at generation {vm.generation}: this migration's source is stale")
        _, lease = issue_lease(self.fleet.ca, vm_id=vm.id, host=state.source, generation=generation)
        out = await self._call(state.source, mid, "resume-source", {"lease": lease, **self._source_key(mid, state)})
        if out.get("restarted"):
            self._restarted(mid, state, state.source)
        return {"source_run_state": out.get("run_state")}

    def _restarted(self, mid: str, state: m.MigrationState, host: str) -> None:
        self.fleet.audit(
            "migration.vm_restarted",
            f"the QEMU of the copy of record on {host} had died; the VM was booted again from its disks",
            "system",
            vm=state.vm_id,
            host=host,
            severity=Severity.WARNING,
            migration=mid,
        )

    async def _step_rollback_hooks(self, mid: str, state: m.MigrationState) -> dict[str, m.Fact]:
        out = await self._call(state.source, mid, "hooks/rollback", {"context": {"cause": state.cause}})
        return {"rollback_hooks": str(out["summary"])}
