"""The agent's side of a live migration: the steps the controller's runner asks of a source or a destination.

Every call carries the controller-signed migration ticket. The first call of a migration on a host (``snapshot`` on
the source, ``prepare`` on the destination) verifies the ticket in full, including its single-use nonce, and opens a
local context for the migration; later calls must present the same ticket for the same migration and role. A ticket
that names another host, another role or another migration, a forged or expired one, or a replay of a used one is
refused with :class:`Forbidden`.

The agent decides nothing: it does what the step asks, idempotently where a restarted controller may ask twice, and
reports facts (ports, bytes, downtime, scrub receipts). The data path itself lives in
:mod:`ferryman.agent.hypervisor.migrate`; there is no way to ask for a migration without TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509

from ferryman.agent.hooks import HookPoint, run_hooks
from ferryman.agent.hypervisor import migrate, procscan
from ferryman.agent.hypervisor.backup import clear_leftovers, live_snapshot
from ferryman.agent.hypervisor.qmp import LUKS_ITER_TIME_MS, QemuDriver
from ferryman.agent.hypervisor.tlsdir import write_tls_dir
from ferryman.agent.probes import GuestChecks, GuestProbe, guest_view, last_seq_of
from ferryman.agent.settings import AgentSettings
from ferryman.agent.storage.scrub import ScrubError, ScrubMode, ScrubReceipt, scrub_tree
from ferryman.agent.storage.snapshots import (
    leftover_partials,
    list_snapshots,
    prune_and_scrub,
    restore_snapshot,
    snapshot_disk,
)
from ferryman.core import errors
from ferryman.core.clock import Clock
from ferryman.core.models import VMSpec
from ferryman.pki.csr import write_atomic
from ferryman.pki.tickets import MigrationTicket, NonceStore, Role, verify_lease, verify_successor, verify_ticket
from ferryman.wire import migration as w
from ferryman.wire.base import Empty
from ferryman.wire.vms import (
    Receipt,
    RemoveStaleCopy,
    Restore,
    Restored,
    SnapshotInfo,
    SnapshotList,
    StaleCopyRemoved,
)

log = structlog.get_logger(__name__)

SNAPSHOT_S = 500.0  # a live snapshot's bound: within the controller's 600 s for the step, so no retry overlaps it
VALIDATION_MIN_WAIT_S = 30.0  # how long validation waits, at least, for the guest probes' evidence of progress
PROGRESS_WAIT_MAX_S = 5.0  # the longest a progress request may wait for the RAM stream to settle


def free_port(address: str) -> int:
    """A TCP port free on ``address`` now (the QEMU that binds it next is the only listener we start there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        port: int = sock.getsockname()[1]
        return port


class MigrationAgent:
    """The migration steps of one host."""

    def __init__(
        self,
        settings: AgentSettings,
        driver: QemuDriver,
        clock: Clock,
        *,
        snapshots_keep: int = 1,
        probes: Sequence[GuestProbe] = (),
    ) -> None:
        """``probes``: what validation checks beside the guest's run state and vCPU progress (e.g. the lab's reader
        of its guest's disk records)."""
        self._settings = settings
        self._driver = driver
        self._clock = clock
        self._ca_cert = x509.load_pem_x509_certificate(settings.ca.read_bytes())
        self._nonces = NonceStore(settings.state_dir / "migrations" / "used-nonces.json")
        self._snapshots_keep = snapshots_keep
        self._hooks_dir = settings.state_dir / "hooks"
        self._checks = GuestChecks.standard(probes)

    # -- tickets and contexts -----------------------------------------------------------------------------------------

    def _context_file(self, migration_id: str) -> Path:
        return self._settings.state_dir / "migrations" / f"{migration_id}.json"

    def _tls_dir(self, migration_id: str) -> Path:
        return self._settings.state_dir / "migrations" / migration_id / "tls"

    def open(self, migration_id: str, token: str, role: Role) -> MigrationTicket:
        """First use of a ticket on this host: full verification with its nonce; idempotent for the same ticket."""
        self._present(token)
        existing = self._load(migration_id)
        if existing is not None:
            return self.check(migration_id, token, role)
        ticket = self._verify(migration_id, token, role, check_expiry=True)
        # the context first, the nonce last: a context that cannot be written leaves the ticket usable for a retry
        path = self._context_file(migration_id)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(path, json.dumps({"token": token, "role": role}).encode(), mode=0o600)
        except (OSError, errors.PKIError) as err:
            raise errors.StorageError(f"cannot record migration {migration_id}: {err}") from err
        try:
            self._nonces.use(f"{role}:{ticket.nonce}", ticket.expires_at, self._clock.now())
        except errors.FerrymanError:
            path.unlink(missing_ok=True)
            raise
        return ticket

    def check(self, migration_id: str, token: str, role: Role, *, committed: bool = False) -> MigrationTicket:
        """A later call of an opened migration: the same ticket, still signed, still for this host and role.

        ``committed``: a step after the commit (activate, retire, validate, post hooks). Its ticket may have expired
        during a long controller outage; the migration must still roll forward (activation also needs a lease)."""
        self._present(token)
        stored = self._load(migration_id)
        if stored is None or stored["role"] != role or stored["token"] != token:
            raise errors.Forbidden(f"no open {role} migration {migration_id} on {self._settings.name} for this ticket")
        return self._verify(migration_id, token, role, check_expiry=not committed)

    def check_ending(self, migration_id: str, token: str, role: Role) -> MigrationTicket:
        """A step that leads back to a safe state (kill or scrub the losing side, resume the source, roll-back hooks,
        close). The ticket must be signed and name this host in this role, but this host may hold no context for it
        (never prepared here, or already scrubbed by an earlier run of the same rollback) and it may have expired:
        such a step stays possible after any outage. Each is idempotent and none can make a second copy run (resuming
        the source also needs a lease)."""
        self._present(token)
        stored = self._load(migration_id)
        if stored is not None and (stored["role"] != role or stored["token"] != token):
            raise errors.Forbidden(f"migration {migration_id} on {self._settings.name} was opened with another ticket")
        return self._verify(migration_id, token, role, check_expiry=False)

    @staticmethod
    def _present(token: str) -> None:
        if not token:
            raise errors.Forbidden("a migration step needs the controller's migration ticket")

    def _verify(self, migration_id: str, token: str, role: Role, *, check_expiry: bool) -> MigrationTicket:
        """The ticket's signature, host, role and migration (its nonce is the caller's business)."""
        return verify_ticket(
            token,
            self._ca_cert,
            me=self._settings.name,
            role=role,
            clock=self._clock,
            migration_id=migration_id,
            check_expiry=check_expiry,
        )

    def _load(self, migration_id: str) -> dict[str, Any] | None:
        try:
            loaded: dict[str, Any] = json.loads(self._context_file(migration_id).read_text())
        except FileNotFoundError:
            return None
        except ValueError as err:
            raise errors.Conflict(f"migration context {migration_id} is corrupt") from err
        return loaded

    def _write_tls(self, migration_id: str, crl_pem: str | None) -> Path:
        s = self._settings
        return write_tls_dir(
            self._tls_dir(migration_id),
            cert_pem=s.cert.read_bytes(),
            key_pem=s.key.read_bytes(),
            ca_pem=s.ca.read_bytes(),
            crl_pem=crl_pem.encode() if crl_pem else None,
        )

    def _snapshot_dir(self, vm_id: str) -> Path:
        return self._settings.state_dir / "snapshots" / vm_id

    # -- source ----------------------------------------------------------------------------------------------------

    async def snapshot(self, migration_id: str, request: w.TakeSnapshot) -> w.Snapshotted:
        """Open the source side and take the pre-migration snapshot of every disk (older ones pruned and scrubbed).
        An encrypted VM's snapshots are encrypted under its copy's key, like its disks."""
        ticket = self.open(migration_id, request.ticket, "source")
        spec = self._driver.load_spec(ticket.vm_id)
        if spec.generation != ticket.generation:
            raise errors.Conflict(
                f"this host holds generation {spec.generation} of {ticket.vm_id}, the ticket is for {ticket.generation}"
            )
        self._driver.use_key(ticket.vm_id, request.disk_key)
        disk_key = self._driver.key_of(ticket.vm_id)
        directory = self._snapshot_dir(ticket.vm_id)
        taken = []
        tag = f"pre-{migration_id[:8]}"
        live = self._driver.is_alive(ticket.vm_id)
        # what an interrupted snapshot left: its job and node in QEMU, then (once QEMU holds none) its partial file
        if not live or await clear_leftovers(self._driver, ticket.vm_id):
            await asyncio.to_thread(scrub_tree, leftover_partials(directory), ScrubMode.ZERO)
        for index, disk in enumerate(self._driver.disk_paths(ticket.vm_id) if self._snapshots_keep > 0 else []):
            # retention 0: no pre-migration snapshot at all; a retried step keeps the snapshot it took
            existing = [s.path for s in list_snapshots(directory) if s.tag == tag and s.disk == disk.stem]
            if existing:
                path = existing[0]
            elif live:  # inside the running QEMU: the guest is never paused for the copy
                size = spec.disks[index].size_bytes
                path = await live_snapshot(
                    self._driver, ticket.vm_id, index, disk, size, directory, tag, key=disk_key, within=SNAPSHOT_S
                )
            else:  # nothing holds the disk: copy it from outside
                path = await asyncio.to_thread(
                    snapshot_disk, disk, directory, tag, key=disk_key, iter_time_ms=LUKS_ITER_TIME_MS
                )
            taken.append(path.name)
        pruned = await asyncio.to_thread(prune_and_scrub, directory, self._snapshots_keep, _mode(spec))
        return w.Snapshotted(
            snapshots=",".join(taken),
            pruned=len(pruned),
            disk_paths=",".join(str(p) for p in self._driver.disk_paths(ticket.vm_id)),
            dirty_kib_per_s=spec.dirty_kib_per_s,
            record_interval_ms=spec.record_interval_ms,
            resident_mib=spec.resident_mib,
        )

    # -- snapshots of the copy of record ---------------------------------------------------------------------------

    def snapshots(self, vm_id: str) -> SnapshotList:
        """The VM's snapshots on this host, oldest first."""
        return SnapshotList(
            snapshots=[
                SnapshotInfo(disk=s.disk, tag=s.tag, taken_at=s.taken_at.isoformat(), size_bytes=s.size_bytes)
                for s in list_snapshots(self._snapshot_dir(vm_id))
            ]
        )

    async def restore(self, vm_id: str, request: Restore) -> Restored:
        """Replace the VM's disks with a snapshot (the newest, or the one tagged ``tag``) and boot it again.

        Only the host of record may: the lease must be for this host and the copy's generation. The replaced disks
        are scrubbed, not merely unlinked.
        """
        spec = self._driver.load_spec(vm_id)
        verify_lease(
            request.lease,
            self._ca_cert,
            me=self._settings.name,
            vm_id=vm_id,
            generation=spec.generation,
            clock=self._clock,
        )
        self._driver.use_key(vm_id, request.disk_key)
        disk_key = self._driver.key_of(vm_id)
        found = list_snapshots(self._snapshot_dir(vm_id))
        chosen_tag = request.tag or (found[-1].tag if found else None)
        disks = self._driver.disk_paths(vm_id)
        chosen = {s.disk: s for s in found if s.tag == chosen_tag}
        missing = [d.name for d in disks if d.stem not in chosen]
        if chosen_tag is None or missing:
            where = f"VM {vm_id} on {self._settings.name}"
            raise errors.NotFound(f"no snapshot {chosen_tag or ''} covers every disk of {where}")
        with contextlib.suppress(errors.NotFound):
            await self._driver.stop(vm_id)
        receipts = []
        try:
            for disk in disks:
                receipt = await asyncio.to_thread(
                    restore_snapshot,
                    chosen[disk.stem].path,
                    disk,
                    key=disk_key,
                    iter_time_ms=LUKS_ITER_TIME_MS,
                    mode=_mode(spec),
                )
                if receipt is not None:
                    receipts.append(receipt)
        except errors.FerrymanError:
            # a disk that failed keeps its old content (the copy completes before the swap): boot what there is
            with contextlib.suppress(errors.FerrymanError):
                await self._driver.start(vm_id)
            raise
        runtime = await self._driver.start(vm_id)
        log.warning("vm restored from snapshot", vm=vm_id, tag=chosen_tag)
        return Restored(
            tag=chosen_tag,
            taken_at=chosen[disks[0].stem].taken_at.isoformat(),
            run_state=str(runtime.run_state),
            receipts=_receipts(receipts),
        )

    async def scrub_snapshots(self, vm_id: str) -> list[ScrubReceipt]:
        """The VM is deleted from this host: its snapshots go too, scrubbed."""
        return await asyncio.to_thread(scrub_tree, [self._snapshot_dir(vm_id)], ScrubMode.CRYPTO)

    async def mirror(self, migration_id: str, request: w.StartMirror) -> w.Mirrored:
        ticket = self.check(migration_id, request.ticket, "source")
        tls = self._write_tls(migration_id, request.crl_pem)
        ready = await migrate.start_mirror(
            self._driver,
            ticket.vm_id,
            dst_address=request.dst_address,
            dst_name=ticket.destination,
            nbd_port=request.nbd_port,
            tls_dir=tls,
            within=request.within,
        )
        return w.Mirrored(mirrored_bytes=sum(p.total_bytes for p in ready))

    async def transfer(self, migration_id: str, request: w.StartTransfer) -> w.TransferStarted:
        ticket = self.check(migration_id, request.ticket, "source")
        tls = self._write_tls(migration_id, request.crl_pem)
        progress = await migrate.start_transfer(
            self._driver,
            ticket.vm_id,
            dst_address=request.dst_address,
            dst_name=ticket.destination,
            migration_port=request.migration_port,
            tls_dir=tls,
            bandwidth_bytes_per_s=request.bandwidth_bytes_per_s or None,
        )
        return w.TransferStarted(status=str(progress.status))

    async def progress(self, migration_id: str, request: w.ReadProgress) -> w.Progress:
        """The RAM stream's progress. With ``wait_s`` (at most PROGRESS_WAIT_MAX_S) the answer waits until the
        stream has settled (completed, failed, cancelled) or that time has passed, reading QEMU every
        ``migrate.POLL_INTERVAL``: the runner learns of the completion at once without asking over and over."""
        ticket = self.check(migration_id, request.ticket, "source")
        wait_s = request.wait_s
        if not 0 <= wait_s <= PROGRESS_WAIT_MAX_S:
            raise errors.InvalidInput(f"bad wait_s {wait_s}: give 0 to {PROGRESS_WAIT_MAX_S} seconds")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        p = await migrate.migration_progress(self._driver, ticket.vm_id)
        while p.status not in migrate.SETTLED and loop.time() < deadline:
            await asyncio.sleep(migrate.POLL_INTERVAL)
            p = await migrate.migration_progress(self._driver, ticket.vm_id)
        mirrors = await migrate.mirror_progress(self._driver, ticket.vm_id)
        return w.Progress(
            status=str(p.status),
            transferred_bytes=p.transferred_bytes,
            remaining_bytes=p.remaining_bytes,
            total_bytes=p.total_bytes,
            rate_bytes_per_s=p.mbps * 1e6 / 8,
            dirty_pages_rate=p.dirty_pages_rate,
            mirror_offset=sum(m.done_bytes for m in mirrors),
            mirror_length=sum(m.total_bytes for m in mirrors),
        )

    async def switchover(self, migration_id: str, request: w.SwitchOver) -> w.SwitchedOver:
        """Wait for the RAM stream to complete (source paused, destination complete and paused); end the mirrors."""
        ticket = self.check(migration_id, request.ticket, "source")
        done = await migrate.wait_transfer(self._driver, ticket.vm_id, within=request.within)
        await migrate.finish_outgoing(self._driver, ticket.vm_id)
        return w.SwitchedOver(
            transferred_bytes=done.transferred_bytes, downtime_ms=done.downtime_ms, total_ms=done.total_time_ms
        )

    async def retire(self, migration_id: str, request: w.Retire) -> Empty:
        """Quit the source QEMU after the commit (its generation is stale from now on). Idempotent."""
        ticket = self.check(migration_id, request.ticket, "source", committed=True)
        with contextlib.suppress(errors.NotFound):
            await self._driver.stop(ticket.vm_id)
            # the stale copy's taps went with its QEMU; its rules go now (the destination has its own)
            await self._driver.nics.release(self._driver.load_spec(ticket.vm_id))
        return Empty()

    async def resume_source(self, migration_id: str, request: w.ResumeSource) -> w.SourceResumed:
        """Rollback: stop any outgoing migration and mirror; the source runs again under a lease for its (unchanged)
        generation. A source QEMU that died is booted again from its disks, which the migration only read. Idempotent.
        """
        ticket = self.check_ending(migration_id, request.ticket, "source")
        verify_lease(
            request.lease,
            self._ca_cert,
            me=self._settings.name,
            vm_id=ticket.vm_id,
            generation=ticket.generation,
            clock=self._clock,
        )
        if not self._driver_has(ticket.vm_id):
            raise errors.Conflict(f"{self._settings.name} holds no copy of VM {ticket.vm_id} to resume")
        if self._driver.load_spec(ticket.vm_id).generation != ticket.generation:
            raise errors.Conflict(f"the copy of VM {ticket.vm_id} here is not generation {ticket.generation}")
        self._driver.use_key(ticket.vm_id, request.disk_key)
        if self._driver.is_alive(ticket.vm_id):
            state = await migrate.cancel_outgoing(self._driver, ticket.vm_id)
            await migrate.announce(self._driver, ticket.vm_id)
            return w.SourceResumed(run_state=str(state))
        log.warning("source QEMU gone; booting the VM again from its disks", migration=migration_id, vm=ticket.vm_id)
        runtime = await self._driver.start(ticket.vm_id)
        return w.SourceResumed(run_state=str(runtime.run_state), restarted=True)

    # -- destination -----------------------------------------------------------------------------------------------

    async def prepare(self, migration_id: str, request: w.Prepare) -> w.Prepared:
        """Open the destination side: a paused QEMU waiting for the assigned source only, and its disk targets."""
        ticket = self.open(migration_id, request.ticket, "destination")
        spec = request.spec
        if spec.vm_id != ticket.vm_id or spec.generation != ticket.generation:
            raise errors.Forbidden("the VM spec does not match the migration ticket")
        if self._driver_has(spec.vm_id) and not self._driver.is_incoming(spec.vm_id):
            raise errors.Conflict(f"a copy of record of {spec.vm_id} already lives on {self._settings.name}")
        if self._driver_has(spec.vm_id):  # a retried prepare: start over with a fresh destination
            await self._discard_destination(spec.vm_id)
        tls = self._write_tls(migration_id, request.crl_pem)
        self._driver.use_key(spec.vm_id, request.disk_key)
        address = self._settings.listen_host
        ports = {"migration_port": free_port(address), "nbd_port": free_port(address)}
        shared = [Path(p) for p in request.shared_disks]
        await migrate.prepare_incoming(
            self._driver,
            spec,
            listen=address,
            migration_port=ports["migration_port"],
            nbd_port=None if ticket.shared_storage else ports["nbd_port"],
            tls_dir=tls,
            allowed_peer_dn=request.source_dn,
            with_disk_target=not ticket.shared_storage,
            shared_disks=shared,
            owner=migration_id,
        )
        nics = await self._driver.nics.states(spec)  # installed and verified before QEMU started, read back again
        return w.Prepared(address=address, nics=nics, **ports)

    def _ours_incoming(self, vm_id: str, migration_id: str) -> bool:
        """An unactivated destination of ``vm_id`` here that this migration (or no claimed one) prepared."""
        if not self._driver_has(vm_id) or not self._driver.is_incoming(vm_id):
            return False
        return self._driver.incoming_owner(vm_id) in {None, migration_id}

    def _driver_has(self, vm_id: str) -> bool:
        try:
            self._driver.load_spec(vm_id)
        except errors.NotFound:
            return False
        return True

    async def activate(self, migration_id: str, request: w.Activate) -> w.Activated:
        """After the commit: run the destination under a lease for the new generation. Idempotent."""
        ticket = self.check(migration_id, request.ticket, "destination", committed=True)
        generation = ticket.generation + 1
        verify_lease(
            request.lease,
            self._ca_cert,
            me=self._settings.name,
            vm_id=ticket.vm_id,
            generation=generation,
            clock=self._clock,
        )
        if not self._driver_has(ticket.vm_id):
            raise errors.Conflict(f"{self._settings.name} holds no copy of VM {ticket.vm_id} to activate")
        self._driver.use_key(ticket.vm_id, request.disk_key)
        alive = self._driver.is_alive(ticket.vm_id)
        if not self._driver.is_incoming(ticket.vm_id) and alive:
            return w.Activated(already=True, generation=generation)
        self._driver.set_generation(ticket.vm_id, generation)
        if alive:
            runtime = await migrate.activate_incoming(self._driver, ticket.vm_id)
            last_seq = await self._note_activation(migration_id, ticket.vm_id)
            return w.Activated(pid=runtime.pid, generation=generation, last_seq=last_seq)
        # The committed copy's QEMU died. Its disks are complete (the mirror converged before the switch-over and
        # the commit), so roll forward by booting the VM from them: the guest restarts, its acknowledged records stay.
        log.warning("destination QEMU gone after the commit; booting from its disks", migration=migration_id)
        self._driver.mark_activated(ticket.vm_id)
        runtime = await self._driver.start(ticket.vm_id)
        last_seq = await self._note_activation(migration_id, ticket.vm_id)
        return w.Activated(pid=runtime.pid, generation=generation, restarted=True, last_seq=last_seq)

    async def _note_activation(self, migration_id: str, vm_id: str) -> int | None:
        """Take every guest probe's mark right after activation (or a reboot of the committed copy), e.g. the guest's
        newest disk record, and keep them, with the time, in the migration's context on this host: a validation soon
        after measures from them, so it need not wait for new evidence after it starts. A record the guest writes
        between ``cont`` and this read only raises the bar. Returns the guest's progress counter if a probe read one
        (None if none could be read now)."""
        try:
            marks = await self._checks.mark(guest_view(self._driver, vm_id))
        except errors.FerrymanError as err:
            log.warning("cannot look at the guest after activation", vm=vm_id, error=str(err))
            marks = {}
        stored = self._load(migration_id) or {}
        stored.pop("activation", None)
        if marks:
            stored["activation"] = {
                "at": self._clock.now().isoformat(),
                "marks": {name: {"value": m.value, "fresh_s": m.fresh_s} for name, m in marks.items()},
            }
        with contextlib.suppress(OSError, errors.PKIError):  # without it, validation reads its own starting point
            write_atomic(self._context_file(migration_id), json.dumps(stored).encode(), mode=0o600)
        return last_seq_of(marks)

    def _activation_bar(self, migration_id: str) -> dict[str, Any]:
        """The probes' marks taken at activation, each only for as long as its probe said it stays fresh: an older
        one could let a guest that has stopped since pass."""
        activation: Any = (self._load(migration_id) or {}).get("activation")
        try:
            age = (self._clock.now() - dt.datetime.fromisoformat(activation["at"])).total_seconds()
            marks = dict(activation["marks"])
        except (TypeError, KeyError, ValueError):
            return {}
        return {
            name: mark["value"]
            for name, mark in marks.items()
            if isinstance(mark, dict) and isinstance(mark.get("fresh_s"), int | float) and 0 <= age <= mark["fresh_s"]
        }

    async def check_destination(self, migration_id: str, request: w.CheckDestination) -> w.DestinationCheck:
        """Just before the commit: the destination's QEMU is alive, still unactivated, its incoming migration
        completed and the guest paused there. The controller commits only on ``ok``."""
        ticket = self.check(migration_id, request.ticket, "destination")
        vm_id = ticket.vm_id
        if not self._driver_has(vm_id) or not self._driver.is_incoming(vm_id) or not self._driver.is_alive(vm_id):
            return w.DestinationCheck(ok=False, detail=f"no live, unactivated destination QEMU of {vm_id} here")
        try:
            progress = await migrate.migration_progress(self._driver, vm_id)
            status = (await self._driver.execute(vm_id, "query-status"))["status"]
        except errors.FerrymanError as err:
            return w.DestinationCheck(ok=False, detail=f"destination QEMU does not answer: {err}")
        ok = progress.status is migrate.MigrationStatus.COMPLETED and status == "paused"
        return w.DestinationCheck(ok=ok, detail=f"incoming migration {progress.status}, guest {status}")

    async def validate(self, migration_id: str, request: w.Validate) -> w.Validation:
        """After activation: the guest runs here, by every guest probe (:mod:`ferryman.agent.probes`): QEMU says it
        runs, its vCPUs advance, and each probe the agent was given sees the guest progress (the lab's: a disk record
        newer than the one read at activation, read from the host side with the copy's key if it is encrypted). Each
        probe measures from its mark of the activation while that is fresh (progress since proves the guest ran here),
        else from a reading now, and waits for its evidence up to VALIDATION_MIN_WAIT_S, or longer if it needs to."""
        ticket = self.check(migration_id, request.ticket, "destination", committed=True)
        self._driver.use_key(ticket.vm_id, request.disk_key)
        guest = guest_view(self._driver, ticket.vm_id)
        if not self._driver.is_alive(ticket.vm_id):
            return w.Validation(ok=False, running=False, detail="no QEMU of the VM runs here")
        verdict = await self._checks.check(guest, self._activation_bar(migration_id), VALIDATION_MIN_WAIT_S)
        return verdict.report()

    async def kill_destination(self, migration_id: str, request: w.KillDestination) -> Empty:
        """Rollback: kill the destination QEMU (never a copy of record). Idempotent."""
        ticket = self.check_ending(migration_id, request.ticket, "destination")
        if self._ours_incoming(ticket.vm_id, migration_id):
            with contextlib.suppress(errors.NotFound):
                await self._driver.kill(ticket.vm_id)
        return Empty()

    async def _discard_destination(self, vm_id: str) -> list[ScrubReceipt]:
        paths = await migrate.abort_incoming(self._driver, vm_id)
        return await asyncio.to_thread(scrub_tree, paths, ScrubMode.CRYPTO)

    async def close(self, migration_id: str, request: w.Close) -> w.Closed:
        """The migration ended: scrub this host's copy of the TLS material and forget the context. Idempotent; a
        closed migration's ticket can never open it again (its nonce is spent)."""
        if self._load(migration_id) is None:
            return w.Closed(closed=False)
        self.check_ending(migration_id, request.ticket, request.role)
        receipts = await asyncio.to_thread(scrub_tree, [self._tls_dir(migration_id).parent], ScrubMode.ZERO)
        self._context_file(migration_id).unlink(missing_ok=True)
        return w.Closed(closed=True, receipts=_receipts(receipts))

    # -- both ------------------------------------------------------------------------------------------------------

    async def hooks(self, migration_id: str, request: w.RunHooks) -> w.HooksRun:
        point, token = HookPoint(request.point), request.ticket
        role: Role = (
            "destination"
            if point is HookPoint.PRE_MIGRATE_DESTINATION or (point is HookPoint.POST_MIGRATE_DESTINATION)
            else "source"
        )
        if point is HookPoint.ROLLBACK:
            ticket = self.check_ending(migration_id, token, role)
        else:
            committed = point in {HookPoint.POST_MIGRATE_SOURCE, HookPoint.POST_MIGRATE_DESTINATION}
            ticket = self.check(migration_id, token, role, committed=committed)
        run = await run_hooks(
            self._hooks_dir,
            point,
            {
                "migration_id": migration_id,
                "vm_id": ticket.vm_id,
                "source": ticket.source,
                "destination": ticket.destination,
                "host": self._settings.name,
                **request.context,
            },
        )
        return w.HooksRun(
            vetoed=run.vetoed,
            summary=run.summary(),
            results=[w.HookOutcome.model_validate(dataclasses.asdict(r)) for r in run.results],
        )

    async def scrub(self, migration_id: str, request: w.Scrub) -> w.Scrubbed:
        """Scrub every artefact of the losing side of this migration on this host; return the receipts."""
        side, mode = request.side, ScrubMode(request.mode)
        ticket = self.check_ending(migration_id, request.ticket, side)
        if side == "destination":
            if not self._driver_has(ticket.vm_id):
                paths: list[Path] = []
            elif not self._driver.is_incoming(ticket.vm_id):
                raise errors.Conflict("refusing to scrub the copy of record on the destination")
            elif not self._ours_incoming(ticket.vm_id, migration_id):
                paths = []  # another migration's destination: not this ticket's to discard
            else:
                paths = await migrate.abort_incoming(self._driver, ticket.vm_id)
        else:
            paths = await self._source_artefacts(ticket)
        paths.append(self._tls_dir(migration_id).parent)
        try:
            receipts = await asyncio.to_thread(scrub_tree, paths, mode)
        except ScrubError as err:
            raise errors.ScrubIncomplete(f"scrub on {self._settings.name} incomplete: {err}") from err
        self._context_file(migration_id).unlink(missing_ok=True)
        log.info("migration residues scrubbed", migration=migration_id, side=side, files=len(receipts))
        return w.Scrubbed(receipts=_receipts(receipts), at=self._clock.now().isoformat())

    async def remove_stale_copy(self, vm_id: str, request: RemoveStaleCopy) -> StaleCopyRemoved:
        """Kill and scrub this host's copy of ``vm_id`` once a lease proves another host runs a later generation.

        Disk images stay when ``keep_disks`` (the copy of record runs on them: shared storage) or when any live QEMU
        still references them. Idempotent.
        """
        try:
            spec = self._driver.load_spec(vm_id)
        except errors.NotFound:
            return StaleCopyRemoved(removed=False)
        verify_successor(
            request.successor,
            self._ca_cert,
            me=self._settings.name,
            vm_id=vm_id,
            generation=spec.generation,
            clock=self._clock,
        )
        with contextlib.suppress(errors.NotFound):
            await self._driver.kill(vm_id)
        await self._driver.nics.release(spec)  # its taps went with its QEMU; the copy of record has its own rules
        disks = self._driver.disk_paths(vm_id)
        processes = await asyncio.to_thread(procscan.scan_qemu)
        in_use = {d for d in disks if any(proc.references(d) for proc in processes)}
        keep = set(disks) if request.keep_disks else in_use
        vm_dir = self._driver.vm_dir(vm_id)
        kept = [p for p in vm_dir.iterdir() if p in keep] if vm_dir.is_dir() else []
        paths = [self._snapshot_dir(vm_id)]
        paths += [p for p in vm_dir.iterdir() if p not in kept] if kept else [vm_dir]
        receipts = await asyncio.to_thread(scrub_tree, paths, _mode(spec))
        log.warning("stale copy removed", vm=vm_id, generation=spec.generation, kept=[str(p) for p in kept])
        return StaleCopyRemoved(removed=True, kept=[str(p) for p in kept], receipts=_receipts(receipts))

    async def _source_artefacts(self, ticket: MigrationTicket) -> list[Path]:
        """The retired source's VM directory and its snapshots; shared images stay (the destination runs on them)."""
        alive = [
            rt
            for rt in await self._driver.list()
            if rt.vm_id == ticket.vm_id and rt.managed and rt.run_state != "shutdown"
        ]
        if alive:
            raise errors.Conflict(f"a QEMU of {ticket.vm_id} still runs here; retire it before scrubbing")
        vm_dir = self._driver.vm_dir(ticket.vm_id)
        paths = [self._snapshot_dir(ticket.vm_id)]
        if not vm_dir.exists():
            return paths
        try:
            generation = self._driver.load_spec(ticket.vm_id).generation
        except (errors.NotFound, errors.HypervisorError):  # a scrub interrupted at the spec: finish it
            generation = ticket.generation
        if generation != ticket.generation:
            # the VM came back to this host since: an old ticket must not scrub the new copy
            raise errors.Conflict(f"the copy of {ticket.vm_id} here is not this migration's source")
        if ticket.shared_storage:
            return [*paths, *(p for p in vm_dir.iterdir() if not p.name.startswith("disk"))]
        return [*paths, vm_dir]


def _receipts(receipts: Sequence[ScrubReceipt]) -> list[Receipt]:
    return [Receipt.model_validate(r.to_audit()) for r in receipts]


def _mode(spec: VMSpec) -> ScrubMode:
    """How this host scrubs a VM's artefacts on its own account: crypto-erase for an encrypted VM (its images hold
    only ciphertext; the headers with the keyslots are destroyed, every other file is zeroed), zeros otherwise."""
    return ScrubMode.CRYPTO if spec.encrypted else ScrubMode.ZERO
