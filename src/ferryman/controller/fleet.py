"""Fleet operations: sites, hosts and their enrolment, VM lifecycle. The API layer calls these; they call the CMDB
and the agents.

Every state change is persisted before its side effect: the intent is an event (and, for a creation, the VM row and
its placement) written before the agent is asked to act; the outcome is written after. Every decision is an event with
the principal who asked.
"""

from __future__ import annotations

import datetime as dt
import secrets
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import structlog

from ferryman.cmdb.journal import ScrubReceiptRecord
from ferryman.cmdb.networks import NicRequest
from ferryman.cmdb.repository import HostCertificate, Neighbour, Repository
from ferryman.controller.agent_client import AgentClient
from ferryman.controller.keys import Copy, DiskKeys
from ferryman.controller.networks import NetworkService, revoked_hosts, underlay_peers
from ferryman.controller.offload import blocking
from ferryman.controller.reconcile import Reconciler
from ferryman.controller.spent import point_of_no_return
from ferryman.core import errors
from ferryman.core.clock import Clock
from ferryman.core.models import (
    VM,
    DiskSpec,
    Event,
    Host,
    HostState,
    ImageRef,
    NicSpec,
    Placement,
    Severity,
    Site,
    VMAction,
    VMSpec,
    VMState,
    check_name,
    check_resident,
    next_vm_state,
)
from ferryman.pki.ca import CertificateAuthority
from ferryman.pki.tickets import issue_lease
from ferryman.security.secrets import hash_secret, new_secret
from ferryman.wire.vms import Receipt

log = structlog.get_logger(__name__)

MIN_MEMORY_MB, MAX_MEMORY_MB = 64, 65536
MIN_DISK, MAX_DISK = 1 << 20, 1 << 40


def certificate_revoked(repo: Repository, serial: int) -> bool:
    """True unless ``serial`` is a certificate we issued and have not revoked (unknown serials count as revoked)."""
    cert = repo.get_certificate(serial)
    return cert is None or cert.revoked_at is not None


LAB_GUEST_IMAGE = "ferryman-lab-guest"
"""The image of a VM whose request names none: the lab's built-in guest, not an image of the registry."""


@dataclass(frozen=True)
class VMRequest:
    name: str
    tenant: str
    memory_mb: int
    vcpus: int
    disk_bytes: int
    profile: dict[str, str]
    host: str | None = None
    dirty_kib_per_s: int = 256
    record_interval_ms: int = 1000
    resident_mib: int = 0  # lab guest: RAM it fills with non-zero data at boot
    force: bool = False  # break glass: place against hard policy rules (role permitting; audited)
    role: str = "admin"  # the requesting principal's role
    encrypted: bool = False  # LUKS-encrypted disks under per-copy keys (crypto-erase when a copy is discarded)
    image: str | None = None  # the registry image to boot (None: LAB_GUEST_IMAGE)
    image_copy: bool = False  # the first disk is a full copy of the image rather than an overlay on it
    networks: tuple[NicRequest, ...] = ()  # one NIC per entry, in device order


@dataclass(frozen=True)
class Change:
    """What changed in the CMDB: a VM (created, moved, deleted), a host's attributes, or an image of the registry
    (imported or revoked: the VMs booted from it are re-checked)."""

    vm_id: str | None = None
    host: str | None = None
    image: str | None = None


class ImageRegistry(Protocol):
    """The registry images VMs boot from (:class:`ferryman.controller.images.ImageService`)."""

    def ref(self, name: str, *, full_copy: bool = False) -> ImageRef:
        """What a host needs to boot ``name``; an image that may not be used now (revoked, untrusted, altered) is
        one clear error, audited (blocks: it hashes the stored files)."""
        ...

    async def ensure_on(self, host: Host, ref: ImageRef) -> int:
        """Send ``host`` the files of ``ref`` it lacks; the bytes sent."""
        ...


class Admission(Protocol):
    """Placement policies as creation sees them: pick a host, or check the one asked for (raises with reasons)."""

    def admit_creation(self, req: VMRequest, candidates: list[Host], principal: str) -> Host | None:
        """The host the new VM goes to among ``candidates`` (one when the request names it; None: no policy, the
        fleet chooses); raises PolicyRefused with the reasons when policies allow none (unless forced)."""
        ...

    def admit_migration(
        self, vm: VM, destination: str, *, force: bool, role: str, principal: str, automatic: bool = False
    ) -> None:
        """Raise PolicyRefused when a hard rule forbids moving ``vm`` to ``destination`` (unless forced)."""
        ...

    def migration_target(
        self, vm: VM, candidates: Iterable[str], planned: Mapping[str, str] | None = None
    ) -> str | None:
        """The best allowed destination among ``candidates`` (``planned``: VM id -> destination of moves already
        started, counted as done), None when none is allowed."""
        ...


@dataclass(frozen=True)
class HostUsage:
    host: Host
    vm_count: int
    memory_used_mb: int
    last_report: dt.datetime | None
    reachable: bool


class Fleet:
    def __init__(
        self,
        repo: Repository,
        agents: AgentClient,
        ca: CertificateAuthority,
        clock: Clock,
        reconciler: Reconciler,
        enrol_token_ttl_s: int = 3600,
        keys: DiskKeys | None = None,
    ) -> None:
        self.repo = repo
        self.agents = agents
        self.ca = ca
        self.clock = clock
        self.reconciler = reconciler
        self._enrol_ttl = dt.timedelta(seconds=enrol_token_ttl_s)
        self.keys = keys
        self.admission: Admission | None = None
        self.images: ImageRegistry | None = None
        self.default_image: str | None = None  # the registry image of a VM whose request names none
        self.networks: NetworkService | None = None
        self._watchers: list[Callable[[Change], None]] = []
        # held while a creation chooses its host or a migration is admitted (worker threads): two requests racing for
        # one host's memory or one of the governor's slots are judged one after the other
        self.placing = threading.Lock()

    # ---- change notification (compliance re-checks what a change affects) -----------------------------------------

    def watch(self, watcher: Callable[[Change], None]) -> None:
        self._watchers.append(watcher)

    def changed(self, change: Change) -> None:
        """A VM was created, moved or deleted, or a host's attributes changed: tell the watchers (after the commit)."""
        for watcher in self._watchers:
            try:
                watcher(change)
            except errors.FerrymanError as err:
                log.error("change watcher failed", change=str(change), error=str(err))

    # ---- audit -------------------------------------------------------------------------------------------------

    def audit(
        self,
        kind: str,
        message: str,
        principal: str,
        *,
        vm: str | None = None,
        host: str | None = None,
        severity: Severity = Severity.INFO,
        **data: Any,
    ) -> Event:
        event = Event(
            kind=kind,
            message=message,
            time=self.clock.now(),
            severity=severity,
            principal=principal,
            vm=vm,
            host=host,
            data=data,
        )
        log.info(kind, message=message, principal=principal, vm=vm, host=host)
        return self.repo.record_event(event)

    def store_scrub_receipts(
        self, host: str, receipts: Sequence[Receipt], migration_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Keep an agent's scrub receipts in the CMDB; returns their short form for the audit event."""
        at = self.clock.now()
        for r in receipts:
            self.repo.add_scrub_receipt(
                ScrubReceiptRecord(
                    host=host,
                    path=r.path,
                    bytes=r.bytes,
                    mode=r.mode,
                    duration_s=r.duration_s,
                    sample_hash=r.sample_hash,
                    at=at,
                    migration_id=migration_id,
                )
            )
        return [r.model_dump(include={"path", "bytes", "mode", "sample_hash"}) for r in receipts]

    # ---- sites and hosts ---------------------------------------------------------------------------------------

    def add_site(self, site: Site, principal: str) -> Site:
        check_name("site", site.name)
        if site.security_level < 0:
            raise errors.InvalidInput("security level must be 0 or more")
        created = self.repo.add_site(site)
        self.audit("site.added", f"site {site.name} (security level {site.security_level})", principal)
        return created

    def add_host(self, host: Host, principal: str) -> tuple[Host, str]:
        """Register a host and return it with a one-time enrolment token (shown once, stored hashed)."""
        check_name("host", host.name)
        if host.site not in {s.name for s in self.repo.list_sites()}:
            raise errors.NotFound(f"site {host.site!r} not found")
        if host.memory_mb < MIN_MEMORY_MB:
            raise errors.InvalidInput(f"host memory must be at least {MIN_MEMORY_MB} MiB")
        created = self.repo.add_host(replace(host, state=HostState.PENDING, created_at=self.clock.now()))
        token = new_secret()
        self.repo.add_enrol_token(host.name, hash_secret(token), self.clock.now() + self._enrol_ttl)
        self.audit("host.added", f"host {host.name} registered, waiting for enrolment", principal, host=host.name)
        self.changed(Change(host=host.name))
        return created, token

    def new_enrol_token(self, host_name: str, principal: str) -> str:
        self.repo.get_host(host_name)
        token = new_secret()
        self.repo.add_enrol_token(host_name, hash_secret(token), self.clock.now() + self._enrol_ttl)
        self.audit("host.enrol_token", f"new enrolment token for {host_name}", principal, host=host_name)
        return token

    def enrol(self, host_name: str, token: str, csr_pem: bytes) -> tuple[HostCertificate, bytes]:
        """Sign the host's CSR if its one-time token is valid; the certificate names the registered host."""
        try:
            host = self.repo.get_host(host_name)
        except errors.NotFound:
            self.audit(
                "host.enrol_refused", f"enrolment for unknown host {host_name}", "anonymous", severity=Severity.WARNING
            )
            raise errors.Unauthenticated("enrolment refused") from None
        try:
            issued = self.ca.sign_host_csr(csr_pem, host.name, host.address)
        except errors.FerrymanError as err:
            self.audit(
                "host.enrol_refused",
                f"bad CSR for {host_name}: {err}",
                "anonymous",
                host=host_name,
                severity=Severity.WARNING,
            )
            raise
        # the certificate exists only in memory until the one-time token is consumed; a bad token discards it
        if not self.repo.consume_enrol_token(host_name, hash_secret(token), self.clock.now()):
            self.audit(
                "host.enrol_refused",
                f"bad or used enrolment token for {host_name}",
                "anonymous",
                host=host_name,
                severity=Severity.WARNING,
            )
            raise errors.Unauthenticated("enrolment refused: the token is wrong, used or expired")
        cert = HostCertificate(
            serial=issued.serial, host=host.name, not_after=issued.not_after, issued_at=self.clock.now()
        )
        self.repo.add_certificate(cert)
        self.repo.set_host_state(host.name, HostState.ENROLLED)
        self.audit(
            "host.enrolled",
            f"{host.name} enrolled (certificate {issued.serial:x})",
            f"host:{host.name}",
            host=host.name,
            serial=str(issued.serial),
        )
        self.changed(Change(host=host.name))
        return cert, issued.pem

    def update_host(self, name: str, principal: str, **changes: Any) -> Host:
        """Change a host's attributes (patch level, hypervisor version, zone, ...); policies re-check its VMs."""
        before = self.repo.get_host(name)
        host = self.repo.update_host(name, **changes)
        diff = {k: [getattr(before, k), v] for k, v in changes.items() if getattr(before, k) != v}
        self.audit("host.updated", f"{name}: {diff or 'no change'}", principal, host=name, changes=diff)
        self.changed(Change(host=name))
        return host

    def revoke_host(self, host_name: str, principal: str) -> list[HostCertificate]:
        self.repo.get_host(host_name)
        revoked = []
        for cert in self.repo.list_certificates(host_name):
            if cert.revoked_at is None:
                revoked.append(self.repo.revoke_certificate(cert.serial, self.clock.now()))
        self.audit(
            "host.revoked",
            f"revoked {len(revoked)} certificate(s) of {host_name}",
            principal,
            host=host_name,
            severity=Severity.WARNING,
        )
        return revoked

    def is_revoked(self, serial: int) -> bool:
        return certificate_revoked(self.repo, serial)

    def underlay_peers(self, host: Host) -> list[str]:
        """What ``host`` floods its overlay segments to (see :func:`ferryman.controller.networks.underlay_peers`)."""
        return list(underlay_peers(self.repo.list_hosts(), host.name, revoked_hosts(self.repo)))

    def host_usage(self) -> list[HostUsage]:
        vms = {vm.id: vm for vm in self.repo.list_vms()}
        usage = []
        for host in self.repo.list_hosts():
            here = [vms[p.vm_id] for p in self.repo.placements_on(host.name) if p.vm_id in vms]
            report = self.reconciler.last_report(host.name)
            usage.append(
                HostUsage(
                    host=host,
                    vm_count=len(here),
                    memory_used_mb=sum(vm.memory_mb for vm in here),
                    last_report=report.received_at if report else None,
                    reachable=self.reconciler.is_fresh(host.name),
                )
            )
        return usage

    def neighbours_on_host(self, host_name: str, at: dt.datetime) -> list[Neighbour]:
        self.repo.get_host(host_name)
        return self.repo.neighbours_on_host(host_name, at)

    # ---- VMs ---------------------------------------------------------------------------------------------------

    def _choose_host(self, req: VMRequest, principal: str) -> Host:
        usage = {u.host.name: u for u in self.host_usage()}
        if req.host is not None:
            if req.host not in usage:
                raise errors.NotFound(f"host {req.host!r} not found")
            candidate = usage[req.host]
            if candidate.host.state is not HostState.ENROLLED:
                raise errors.Conflict(f"host {req.host} is not enrolled yet")
            if candidate.host.role != "compute" and not req.force:  # quarantine hosts keep their room for incidents
                raise errors.Conflict(
                    f"host {req.host} has role {candidate.host.role}: it takes no normal placements (--force, audited)"
                )
            if req.networks and not candidate.host.underlay:
                raise errors.Conflict(f"host {req.host} has no overlay endpoint (underlay): it cannot run NICs")
            free = candidate.host.memory_mb - candidate.memory_used_mb
            if free < req.memory_mb:
                raise errors.CapacityError(
                    f"host {req.host} is full: {free} MiB free of {candidate.host.memory_mb}, "
                    f"the VM needs {req.memory_mb}"
                )
            if self.admission is not None:
                return self.admission.admit_creation(req, [candidate.host], principal) or candidate.host
            return candidate.host
        eligible = [
            u
            for u in usage.values()
            if u.host.state is HostState.ENROLLED
            and u.host.role == "compute"
            and u.host.memory_mb - u.memory_used_mb >= req.memory_mb
            and (u.host.underlay or not req.networks)
        ]
        if not eligible:
            needs = " and an overlay endpoint for NICs" if req.networks else ""
            raise errors.CapacityError(f"no enrolled host has {req.memory_mb} MiB free{needs}")
        chosen = None
        if self.admission is not None:
            chosen = self.admission.admit_creation(req, [u.host for u in eligible], principal)
        return chosen or max(eligible, key=lambda u: (u.host.memory_mb - u.memory_used_mb, u.host.name)).host

    def _validate(self, req: VMRequest) -> None:
        check_name("VM", req.name)
        check_name("tenant", req.tenant)
        if not MIN_MEMORY_MB <= req.memory_mb <= MAX_MEMORY_MB:
            raise errors.InvalidInput(f"memory must be between {MIN_MEMORY_MB} and {MAX_MEMORY_MB} MiB")
        if not MIN_DISK <= req.disk_bytes <= MAX_DISK:
            raise errors.InvalidInput("disk must be between 1M and 1T")
        if not 1 <= req.vcpus <= 64:
            raise errors.InvalidInput("vcpus must be between 1 and 64")
        check_resident(req.resident_mib, req.memory_mb)
        for key, value in req.profile.items():
            if not key or not value:
                raise errors.InvalidInput(f"bad profile label {key}={value}: use key=value")
        if req.encrypted and self.keys is None:
            raise errors.InvalidInput("this controller keeps no disk keys: it cannot create encrypted VMs")
        if req.networks and self.networks is None:
            raise errors.InvalidInput("this controller manages no networks: it cannot give VMs NICs")
        try:
            existing = self.repo.get_vm(req.name, tenant=req.tenant)
        except errors.NotFound:
            return
        if existing.state is not VMState.DELETED:
            raise errors.Conflict(f"tenant {req.tenant} has a VM named {req.name} already")

    async def create_vm(self, req: VMRequest, principal: str) -> VM:
        """Choose a host, record the VM there (CMDB work in a worker thread), then ask its agent to boot it."""
        vm_id = str(uuid.uuid4())
        self.reconciler.note_change(vm_id)  # before the CMDB holds it: a report of it is not an unknown QEMU
        vm, host, key, image = await blocking(self._register, vm_id, req, principal)
        point_of_no_return()  # the VM is recorded: a --force approval stays used
        spec = VMSpec(
            vm_id=vm.id,
            name=vm.name,
            vcpus=vm.vcpus,
            memory_mb=vm.memory_mb,
            disks=(DiskSpec(vm.disk_bytes),),
            canary=vm.canary,
            generation=vm.generation,
            dirty_kib_per_s=req.dirty_kib_per_s,
            record_interval_ms=req.record_interval_ms,
            encrypted=vm.encrypted,
            resident_mib=req.resident_mib,
            image=image,
            nics=await blocking(self._nic_specs, vm.id, host.name),
        )
        try:
            if image is not None and self.images is not None:
                await self.images.ensure_on(host, image)
            await self.agents.create_vm(host, spec, self.lease(vm, host.name), key)
            await self.nics_applied(vm, host, spec.nics)
        except errors.AgentUnreachable as err:
            await blocking(self._creation_failed, vm, host, principal, err, keep=True)
            raise
        except errors.FerrymanError as err:
            await self._discard_failed(vm, host)
            await blocking(self._creation_failed, vm, host, principal, err, keep=False)
            raise
        vm = await blocking(self._created, vm, host, principal)
        self.reconciler.note_change(vm.id)
        return vm

    def _register(self, vm_id: str, req: VMRequest, principal: str) -> tuple[VM, Host, bytes | None, ImageRef | None]:
        """Validate, check the image, choose the host and record the VM on it with its disk key (stored, wrapped,
        before any agent sees it)."""
        self._validate(req)
        image = self._requested_image(req)
        if image is not None:  # the first disk holds at least the whole image
            req = replace(req, disk_bytes=max(req.disk_bytes, self.repo.get_image(image.name).virtual_size))
        req = replace(req, image=image.name if image is not None else LAB_GUEST_IMAGE)  # as admission judges it
        with self.placing:
            host = self._choose_host(req, principal)
            self.repo.ensure_tenant(req.tenant)
            vm = VM(
                id=vm_id,
                name=req.name,
                tenant=req.tenant,
                memory_mb=req.memory_mb,
                vcpus=req.vcpus,
                disk_bytes=req.disk_bytes,
                image=image.name if image is not None else LAB_GUEST_IMAGE,
                canary=f"FMCANARY-{secrets.token_hex(8)}",
                profile=dict(req.profile),
                state=VMState.CREATING,
                created_at=self.clock.now(),
                encrypted=req.encrypted,
                image_copy=req.image_copy if image is not None else False,
            )
            vm = self.repo.add_vm(vm, host.name, self.clock.now())
            what = "no NICs"
            try:  # addresses are allocated under the placing lock too: one request at a time takes them
                if req.networks and self.networks is not None:
                    self.networks.allocate(vm, req.networks)
                what = "no disk key"
                key = self.keys.create(Copy(vm.id, host.name, vm.generation)) if vm.encrypted and self.keys else None
            except errors.FerrymanError as err:
                if self.networks is not None:
                    self.networks.release(vm.id)
                self.repo.delete_vm(vm.id, self.clock.now())
                self.changed(Change(vm_id=vm.id))
                self.audit(
                    "vm.create_failed", f"{vm.name}: {what}: {err}", principal, vm=vm.id, severity=Severity.WARNING
                )
                raise
        self.changed(Change(vm_id=vm.id))
        self.audit(
            "vm.create_requested",
            f"{vm.name} for {vm.tenant} on {host.name}" + (f" from image {image.name}" if image else ""),
            principal,
            vm=vm.id,
            host=host.name,
            image=vm.image,
        )
        return vm, host, key, image

    def _requested_image(self, req: VMRequest) -> ImageRef | None:
        """The registry image a new VM boots from (None: the hosts' own boot image); refused if it may not be used."""
        name = req.image or self.default_image
        if name is None or name == LAB_GUEST_IMAGE:
            if req.image_copy:
                raise errors.InvalidInput("a full copy of the image needs an image of the registry (--image)")
            return None
        if self.images is None:
            raise errors.InvalidInput("this controller has no image registry: it cannot boot VMs from images")
        return self.images.ref(name, full_copy=req.image_copy)

    def image_ref(self, vm: VM) -> ImageRef | None:
        """What a host needs to boot ``vm``'s registry image, checked now; None for a VM that boots from its host's
        own boot image (an image name the registry does not hold)."""
        if self.images is None:
            return None
        try:
            self.repo.get_image(vm.image)
        except errors.NotFound:
            return None
        return self.images.ref(vm.image, full_copy=vm.image_copy)

    def _creation_failed(self, vm: VM, host: Host, principal: str, err: errors.FerrymanError, *, keep: bool) -> None:
        """``keep``: the agent did not answer, so the VM may exist there: it stays, marked failed."""
        if keep:
            vm = self.repo.set_vm_state(vm.id, next_vm_state(vm.state, VMAction.FAILED))
        self.audit(
            "vm.create_failed", f"{vm.name}: {err}", principal, vm=vm.id, host=host.name, severity=Severity.WARNING
        )

    def _created(self, vm: VM, host: Host, principal: str) -> VM:
        vm = self.repo.set_vm_state(vm.id, next_vm_state(vm.state, VMAction.CREATED))
        self.audit("vm.created", f"{vm.name} runs on {host.name}", principal, vm=vm.id, host=host.name)
        return vm

    async def _discard_failed(self, vm: VM, host: Host) -> None:
        try:
            await self.agents.destroy_vm(host, vm.id)
        except errors.FerrymanError as err:
            log.warning("cleanup of failed VM creation failed", vm=vm.id, host=host.name, error=str(err))
        await blocking(self._forget, vm, "creation failed")

    def _forget(self, vm: VM, reason: str) -> VM:
        """The VM is gone from its host: its keys are destroyed, its addresses released and its row marked deleted."""
        self.destroy_keys(vm, reason)
        if self.networks is not None:
            self.networks.release(vm.id)
        vm = self.repo.delete_vm(vm.id, self.clock.now())
        self.changed(Change(vm_id=vm.id))
        return vm

    def disk_key(self, vm: VM, host: str, generation: int | None = None) -> bytes | None:
        """The key of ``vm``'s copy on ``host`` (at ``generation``, default the VM's): None for a plain VM."""
        if not vm.encrypted:
            return None
        if self.keys is None:
            raise errors.InvalidInput(f"{vm.name} is encrypted but this controller keeps no disk keys")
        return self.keys.get(Copy(vm.id, host, vm.generation if generation is None else generation))

    def destroy_keys(self, vm: VM, reason: str, *, host: str | None = None, generation: int | None = None) -> list[str]:
        """Destroy the keys of ``vm``'s copies (on ``host``, at ``generation``): crypto-erase, audited."""
        if not vm.encrypted or self.keys is None:
            return []
        gone = self.keys.destroy(vm.id, reason, host=host, generation=generation)
        if gone:
            where = f" on {host}" if host else ""
            self.audit(
                "key.destroyed",
                f"{len(gone)} disk key(s) of {vm.name}{where} destroyed: {reason}",
                "system",
                vm=vm.id,
                host=host,
                keys=gone,
                generation=generation,
            )
        return gone

    def _nic_specs(self, vm_id: str, host: str) -> tuple[NicSpec, ...]:
        return self.networks.specs(vm_id, host) if self.networks is not None else ()

    async def nics_applied(self, vm: VM, host: Host, nics: Sequence[NicSpec]) -> None:
        """Read back the rules ``host`` installed for the VM's NICs and check them against the CMDB (recorded there
        as where they apply); NetworkError if they differ."""
        if nics and self.networks is not None:
            states = await self.agents.nic_states(host, vm.id)
            await blocking(self.networks.check_applied, vm.id, host.name, states, record_host=True)

    def lease(self, vm: VM, host: str) -> str:
        """A signed permission for ``host`` to run ``vm`` at its current generation (fencing of stale copies)."""
        return issue_lease(self.ca, vm_id=vm.id, host=host, generation=vm.generation)[1]

    def get_vm(self, name: str) -> tuple[VM, Placement | None]:
        vm = self.repo.get_vm(name)
        if vm.state is VMState.DELETED:
            raise errors.NotFound(f"VM {vm.name!r} not found (deleted)")
        return vm, self.repo.current_placement(vm.id)

    async def vm_action(self, name: str, action: VMAction, principal: str) -> VM:
        vm, host, target = await blocking(self._action_requested, name, action, principal)
        self.reconciler.note_change(vm.id)
        if action is VMAction.DELETE:
            try:
                await self.agents.destroy_vm(host, vm.id)
            except errors.NotFound:
                log.info("VM to delete was not on its host", vm=vm.id, host=host.name)
            vm = await blocking(self._forget, vm, "VM deleted")
        else:
            needs_lease = action in {VMAction.START, VMAction.RESUME}
            lease = self.lease(vm, host.name) if needs_lease else None
            # a boot opens the images: the registry's (checked now, sent if the host lacks it) and the VM's own disks
            key = await blocking(self.disk_key, vm, host.name) if action is VMAction.START else None
            image = await blocking(self.image_ref, vm) if action is VMAction.START else None
            if image is not None and self.images is not None:
                await self.images.ensure_on(host, image)
            try:
                await self.agents.vm_action(host, vm.id, action.value, lease, key)
                if action is VMAction.START:
                    await self.nics_applied(vm, host, await blocking(self._nic_specs, vm.id, host.name))
            except errors.Forbidden as err:
                await blocking(
                    self.audit,
                    "vm.fenced",
                    f"{host.name} refused to {action.value} {vm.name}: {err}",
                    principal,
                    vm=vm.id,
                    host=host.name,
                    severity=Severity.ALARM,
                )
                raise
            vm = await blocking(self.repo.set_vm_state, vm.id, target)
        self.reconciler.note_change(vm.id)
        await blocking(
            self.audit, f"vm.{target.value}", f"{vm.name} is {target.value}", principal, vm=vm.id, host=host.name
        )
        return vm

    def _action_requested(self, name: str, action: VMAction, principal: str) -> tuple[VM, Host, VMState]:
        vm, placement = self.get_vm(name)
        target = next_vm_state(vm.state, action)
        if placement is None:
            raise errors.Conflict(f"{vm.name} has no placement")
        host = self.repo.get_host(placement.host)
        self.audit(
            f"vm.{action.value}_requested",
            f"{action.value} {vm.name} on {host.name}",
            principal,
            vm=vm.id,
            host=host.name,
        )
        return vm, host, target
