"""The migration data path: the QMP sequences that move a VM's RAM and local disks between two QEMUs over TLS.

Destination. :func:`prepare_incoming` starts QEMU with the source's machine definition, paused (``-S``) and waiting
(``-incoming defer``). A ``tls-creds-x509`` object (``endpoint=server``, ``verify-peer=on``) and an ``authz-simple``
object naming the DN of the one source host the controller assigned guard the migration listener and, for local
storage, an NBD server exporting the empty target disks. The destination stays paused after the stream completes
until :func:`activate_incoming` (``cont``), which the migration runner calls only after the commit;
:func:`abort_incoming` kills it and names every file it left.

Source. Client credentials (``verify-peer=on``) plus ``tls-hostname`` set to the destination host's name, so the
destination's certificate must name the host the controller assigned, not merely come from our CA.
:func:`start_mirror` copies the disks over NBD-over-TLS (``blockdev-mirror`` sync=full; sync=top for an overlay on a
registry image, whose base the destination holds verified; write-blocking by default, so once the mirror is ready
every guest write reaches both disks before the guest sees it complete), then :func:`start_transfer` sends RAM with
``migrate``, with a return path so that the source reports completion only once the destination has loaded the whole
stream. After completion the source is paused (``postmigrate``),
:func:`finish_outgoing` completes the mirror without pivoting (``block-job-cancel`` on a ready job, as libvirt does) and
detaches the NBD node; :func:`cancel_outgoing` undoes everything and leaves the source running.

Shared storage. No NBD: the destination opens the source's images in place. The ``late-block-activate`` capability
keeps them inactive on the destination (no write lock, no cached metadata) until ``cont``; the source inactivates them
at switch-over. So at no time do two QEMUs hold an image writable, and a rollback after completion can resume the
source.

No plaintext: every function installs TLS credentials before it opens or accepts a connection, reads back that QEMU
has them set, and has no parameter that turns them off (DESIGN.md invariant 4). This module decides nothing: it never
resumes a VM unless asked to, never retries, and every wait is bounded.

Multifd (several TLS channels) is available through ``multifd_channels`` on both ends. On the lab machine (2 cores,
TCG, loopback) two channels measured no faster than one, with a 128 MiB guest and with a 1 GiB guest holding 768 MiB
of data (4.99 s against 4.97 s, median of 3); each channel adds a TLS handshake, so it is off by default.

QEMU 7.2 behaviours the caller must know:

* A destination whose incoming stream fails after the TLS handshake (the source hung up or was cancelled) exits on
  its own; :func:`abort_incoming` copes with a process that is already gone.
* The incoming migration's TLS handshake runs on the destination's main loop: a TCP client that connects to the
  migration port and stays silent freezes the destination's QMP (our commands time out) until it hangs up; garbage
  is refused at once. Open the listener (:func:`prepare_incoming`) just before the source starts, and in production
  restrict the port to the source host at the network level. The NBD server does not have this weakness.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import structlog

from ferryman.agent.hypervisor.qmp import QemuDriver
from ferryman.agent.hypervisor.tlsdir import check_tls_dir
from ferryman.core.errors import Conflict, HypervisorError, InvalidInput, NotFound
from ferryman.core.models import RunState, VMRuntime, VMSpec
from ferryman.pki.ca import check_dns_name

log = structlog.get_logger("ferryman.agent.migrate")

SERVER_CREDS = "fm-tls-server"
SOURCE_AUTHZ = "fm-authz-source"
MIGRATION_CREDS = "fm-tls-migration"
NBD_CREDS = "fm-tls-nbd"
POLL_INTERVAL = 0.05
DEFAULT_DOWNTIME_MS = 300
UNLIMITED_BANDWIDTH = 1 << 40
"""The cap set when the caller gives none (QEMU's own default, 128 MiB/s, would be an unasked-for limit)."""

CopyMode = Literal["write-blocking", "background"]


class MigrationStatus(enum.StrEnum):
    """QEMU's ``MigrationStatus``, as ``query-migrate`` reports it on either end."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"


SETTLED = frozenset(
    {MigrationStatus.NONE, MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED}
)
"""States in which no migration stream is in flight."""

_RamInfo = TypedDict(
    "_RamInfo",
    {"transferred": int, "remaining": int, "total": int, "dirty-pages-rate": int, "mbps": float},
    total=False,
)
_MigrateInfo = TypedDict(
    "_MigrateInfo",
    {
        "status": str,
        "ram": _RamInfo,
        "total-time": int,
        "downtime": int,
        "expected-downtime": int,
        "setup-time": int,
        "error-desc": str,
    },
    total=False,
)
_JobInfo = TypedDict(
    "_JobInfo",
    {"id": str, "type": str, "status": str, "current-progress": int, "total-progress": int, "error": str},
    total=False,
)


@dataclass(frozen=True)
class MigrationProgress:
    """One ``query-migrate`` reading. ``downtime_ms`` is known only once the migration completed."""

    status: MigrationStatus
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    total_bytes: int = 0
    dirty_pages_rate: int = 0
    mbps: float = 0.0
    total_time_ms: int | None = None
    downtime_ms: int | None = None
    expected_downtime_ms: int | None = None
    setup_time_ms: int | None = None
    error: str | None = None

    @classmethod
    def from_qmp(cls, info: _MigrateInfo) -> MigrationProgress:
        ram = info.get("ram", {})
        try:
            status = MigrationStatus(info.get("status", "none"))
        except ValueError as err:
            raise HypervisorError(f"QEMU reports an unknown migration status {info.get('status')!r}") from err
        return cls(
            status=status,
            transferred_bytes=ram.get("transferred", 0),
            remaining_bytes=ram.get("remaining", 0),
            total_bytes=ram.get("total", 0),
            dirty_pages_rate=ram.get("dirty-pages-rate", 0),
            mbps=ram.get("mbps", 0.0),
            total_time_ms=info.get("total-time"),
            downtime_ms=info.get("downtime"),
            expected_downtime_ms=info.get("expected-downtime"),
            setup_time_ms=info.get("setup-time"),
            error=info.get("error-desc"),
        )


@dataclass(frozen=True)
class MirrorProgress:
    """One disk's mirror job: ``done_bytes`` of ``total_bytes`` copied; ready once source and target are in sync."""

    job_id: str
    status: str
    done_bytes: int
    total_bytes: int
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.status == "ready"


@dataclass(frozen=True)
class IncomingMigration:
    """A destination waiting for its source: where it listens and what it exports."""

    vm_id: str
    pid: int | None
    migration_uri: str
    nbd_server: str | None
    exports: tuple[str, ...]
    disks: tuple[Path, ...]


MigrationCallback = Callable[[MigrationProgress], None]
MirrorCallback = Callable[[list[MirrorProgress]], None]


# -- destination ---------------------------------------------------------------------------------------------------


async def prepare_incoming(
    driver: QemuDriver,
    spec: VMSpec,
    *,
    listen: str,
    migration_port: int,
    nbd_port: int | None,
    tls_dir: Path,
    allowed_peer_dn: str,
    with_disk_target: bool,
    shared_disks: Sequence[Path] = (),
    owner: str | None = None,
    multifd_channels: int | None = None,
) -> IncomingMigration:
    """Start the destination QEMU paused, accepting only ``allowed_peer_dn`` over TLS on ``listen``.

    ``with_disk_target``: create empty target disks and export them (writable) over NBD-over-TLS on ``nbd_port``;
    otherwise open ``shared_disks`` (the source's images) in place. If any step fails the QEMU is killed and the
    error raised; :func:`abort_incoming` then names the files to scrub.
    """
    _ip(listen)
    _check_port(migration_port)
    if with_disk_target:
        _check_port(nbd_port)
    elif not shared_disks:
        raise InvalidInput("a migration without disk targets needs the shared images' paths")
    if not allowed_peer_dn.strip():
        raise InvalidInput("the source's DN is required: the destination admits one host only")
    check_tls_dir(tls_dir, "server")
    runtime = await driver.create_incoming(spec, None if with_disk_target else shared_disks, owner=owner)
    vm_id = spec.vm_id
    try:
        await _add_object(driver, vm_id, "tls-creds-x509", SERVER_CREDS, dir=str(tls_dir), endpoint="server")
        await _add_object(driver, vm_id, "authz-simple", SOURCE_AUTHZ, identity=allowed_peer_dn)
        await _set_capabilities(driver, vm_id, {"late-block-activate": True, "multifd": bool(multifd_channels)})
        params: dict[str, Any] = {"tls-creds": SERVER_CREDS, "tls-authz": SOURCE_AUTHZ}
        if multifd_channels:
            params["multifd-channels"] = multifd_channels
        await _set_tls_parameters(driver, vm_id, params)
        exports: tuple[str, ...] = ()
        if with_disk_target:
            assert nbd_port is not None
            exports = await _export_disks(driver, vm_id, len(spec.disks), listen, nbd_port)
        uri = _tcp_uri(listen, migration_port)
        await driver.execute(vm_id, "migrate-incoming", {"uri": uri})
    except BaseException:
        with contextlib.suppress(HypervisorError):
            await driver.kill(vm_id)
        raise
    log.info("incoming migration prepared", vm=vm_id, uri=uri, exports=exports, peer=allowed_peer_dn)
    nbd_server = f"{listen}:{nbd_port}" if with_disk_target else None
    disks = tuple(driver.disk_paths(vm_id))
    return IncomingMigration(vm_id, runtime.pid, uri, nbd_server, exports, disks)


async def _export_disks(driver: QemuDriver, vm_id: str, count: int, listen: str, port: int) -> tuple[str, ...]:
    """Serve the target disks over NBD, behind the same TLS credentials and source-only authz as the migration."""
    addr = {"type": "inet", "data": {"host": listen, "port": str(port)}}
    await driver.execute(
        vm_id, "nbd-server-start", {"addr": addr, "tls-creds": SERVER_CREDS, "tls-authz": SOURCE_AUTHZ}
    )
    names = []
    for index in range(count):
        name = _disk_node(index)
        arguments = {"type": "nbd", "id": f"fm-export-{name}", "node-name": name, "name": name, "writable": True}
        await driver.execute(vm_id, "block-export-add", arguments)
        names.append(name)
    return tuple(names)


async def activate_incoming(driver: QemuDriver, vm_id: str) -> VMRuntime:
    """Run the destination (``cont``) once its incoming migration completed; Conflict in any other state.

    The NBD server goes first: nothing may write to the disks behind the now running guest.
    """
    progress = await migration_progress(driver, vm_id)
    status = (await driver.execute(vm_id, "query-status"))["status"]
    if progress.status is not MigrationStatus.COMPLETED or status != "paused":
        raise Conflict(f"VM {vm_id} cannot be activated: migration is {progress.status}, VM is {status}")
    if await driver.execute(vm_id, "query-block-exports"):
        await driver.execute(vm_id, "nbd-server-stop")
    driver.mark_activated(vm_id)
    runtime = await driver.resume(vm_id)
    await announce(driver, vm_id)
    log.info("incoming vm activated", vm=vm_id, pid=runtime.pid)
    return runtime


ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}  # QEMU's own post-migration defaults (ms)


async def announce(driver: QemuDriver, vm_id: str) -> None:
    """Tell the network where the VM's NICs are now (RARP from each MAC, and the guest's own gratuitous ARP/NA):
    bridges and the overlay's forwarding tables move to this host. Only after ``cont``: a paused VM sends nothing."""
    if driver.load_spec(vm_id).nics:
        await driver.execute(vm_id, "announce-self", dict(ANNOUNCE))


async def abort_incoming(driver: QemuDriver, vm_id: str) -> list[Path]:
    """Kill a destination that was never activated; return every path it created, files first, its directory last.

    The caller scrubs them. Shared images are not among them (they belong to the source). Conflict if the VM here is
    not an unactivated destination: a copy of record is never discarded this way.
    """
    vm_dir = driver.vm_dir(vm_id)
    if not await asyncio.to_thread(vm_dir.is_dir):
        return []
    if not driver.is_incoming(vm_id):
        raise Conflict(f"VM {vm_id} on this host is not an unactivated migration destination; refusing to discard it")
    with contextlib.suppress(NotFound):
        await driver.kill(vm_id)
    with contextlib.suppress(NotFound):  # its NICs' rules go with it (its taps went with its QEMU)
        await driver.nics.release(driver.load_spec(vm_id))
    paths = await asyncio.to_thread(_paths_below, vm_dir)
    log.info("incoming migration aborted", vm=vm_id, residues=len(paths))
    return paths


def _paths_below(directory: Path) -> list[Path]:
    files = sorted(path for path in directory.rglob("*") if not path.is_dir() or path.is_symlink())
    dirs = sorted((path for path in directory.rglob("*") if path.is_dir() and not path.is_symlink()), reverse=True)
    return [*files, *dirs, directory]


# -- source --------------------------------------------------------------------------------------------------------


def mirror_sync(spec: VMSpec, index: int, backed: bool) -> str:
    """``top`` for an overlay on a registry image that still has the image beneath it (the destination holds the same
    verified image under its own overlay, so only what the guest wrote travels); ``full`` for every other disk (the
    whole chain), also for an overlay a snapshot restore flattened: its unallocated clusters read as zeros here, and
    only ``full`` writes those zeros over the destination's image."""
    overlay = index == 0 and spec.image is not None and not spec.image.full_copy
    return "top" if overlay and backed else "full"


async def _backed_nodes(driver: QemuDriver, vm_id: str) -> set[str]:
    """The names of the VM's block nodes that have a backing image open beneath them."""
    nodes = await driver.execute(vm_id, "query-named-block-nodes", {"flat": True})
    return {str(n.get("node-name")) for n in nodes or [] if int(n.get("backing_file_depth") or 0) > 0}


async def start_mirror(
    driver: QemuDriver,
    vm_id: str,
    *,
    dst_address: str,
    dst_name: str,
    nbd_port: int,
    tls_dir: Path,
    copy_mode: CopyMode = "write-blocking",
    within: float = 120.0,
    on_progress: MirrorCallback | None = None,
) -> list[MirrorProgress]:
    """Mirror every disk to the destination's NBD exports over TLS and wait (at most ``within``) until all are ready.

    The destination's certificate must name ``dst_name``. On any failure the jobs, NBD nodes and credentials this
    call added are removed and the error (QEMU's message) raised; the VM keeps running throughout.
    """
    _ip(dst_address)
    _check_port(nbd_port)
    check_dns_name(dst_name, "destination host name")
    check_tls_dir(tls_dir, "client")
    spec = driver.load_spec(vm_id)
    count = len(spec.disks)
    backed = await _backed_nodes(driver, vm_id)
    await _add_object(driver, vm_id, "tls-creds-x509", NBD_CREDS, dir=str(tls_dir), endpoint="client")
    try:
        for index in range(count):
            await driver.execute(vm_id, "blockdev-add", _nbd_target(index, dst_address, nbd_port, dst_name))
            sync = mirror_sync(spec, index, _disk_node(index) in backed)
            job: dict[str, Any] = {"job-id": _mirror_job(index), "device": _disk_node(index)}
            job |= {"target": _nbd_node(index), "sync": sync, "copy-mode": copy_mode}
            job["auto-dismiss"] = False
            await driver.execute(vm_id, "blockdev-mirror", job)
        ready = await _wait_mirrors_ready(driver, vm_id, count, within, on_progress)
    except BaseException:
        with contextlib.suppress(HypervisorError):
            await _drop_mirrors(driver, vm_id, force=True)
        raise
    log.info("disks mirrored", vm=vm_id, dst=dst_name, bytes=sum(p.total_bytes for p in ready))
    return ready


async def start_transfer(
    driver: QemuDriver,
    vm_id: str,
    *,
    dst_address: str,
    dst_name: str,
    migration_port: int,
    tls_dir: Path,
    bandwidth_bytes_per_s: int | None = None,
    downtime_limit_ms: int = DEFAULT_DOWNTIME_MS,
    multifd_channels: int | None = None,
) -> MigrationProgress:
    """Start sending RAM to the destination over TLS (the destination's certificate must name ``dst_name``).

    Returns at once; :func:`wait_transfer` follows it. Refused (Conflict) while a disk mirror is not ready, because
    the destination would run on a disk that lacks writes. ``multifd_channels`` must match the destination's.
    """
    _ip(dst_address)
    _check_port(migration_port)
    check_dns_name(dst_name, "destination host name")
    if bandwidth_bytes_per_s is not None and bandwidth_bytes_per_s <= 0:
        raise InvalidInput(f"bad bandwidth {bandwidth_bytes_per_s}: give bytes per second, or None for no cap")
    if downtime_limit_ms <= 0 or (multifd_channels is not None and not 1 <= multifd_channels <= 255):
        raise InvalidInput(f"bad downtime limit {downtime_limit_ms} ms or multifd channels {multifd_channels}")
    check_tls_dir(tls_dir, "client")
    not_ready = [job.job_id for job in await _mirror_jobs(driver, vm_id) if not job.ready]
    if not_ready:
        raise Conflict(f"VM {vm_id} cannot migrate before its disk mirrors are ready: {', '.join(not_ready)}")
    await _add_object(driver, vm_id, "tls-creds-x509", MIGRATION_CREDS, dir=str(tls_dir), endpoint="client")
    # With a return path the source completes only once the destination has loaded the whole stream.
    await _set_capabilities(driver, vm_id, {"return-path": True, "multifd": bool(multifd_channels)})
    params: dict[str, Any] = {"tls-creds": MIGRATION_CREDS, "tls-hostname": dst_name}
    params |= {"max-bandwidth": bandwidth_bytes_per_s or UNLIMITED_BANDWIDTH, "downtime-limit": downtime_limit_ms}
    if multifd_channels:
        params["multifd-channels"] = multifd_channels
    await _set_tls_parameters(driver, vm_id, params)
    await driver.execute(vm_id, "migrate", {"uri": _tcp_uri(dst_address, migration_port)})
    log.info("migration started", vm=vm_id, dst=dst_name, port=migration_port, bandwidth=bandwidth_bytes_per_s)
    return await migration_progress(driver, vm_id)


async def migration_progress(driver: QemuDriver, vm_id: str) -> MigrationProgress:
    """The VM's migration as QEMU reports it now (on the source, or on a destination for its incoming stream)."""
    info: _MigrateInfo = await driver.execute(vm_id, "query-migrate")
    return MigrationProgress.from_qmp(info)


async def wait_transfer(
    driver: QemuDriver, vm_id: str, *, within: float, on_progress: MigrationCallback | None = None
) -> MigrationProgress:
    """Wait until the migration completed (the source is then paused) and return the last reading.

    Raises HypervisorError with QEMU's reason if it failed or was cancelled, or if it is still in flight after
    ``within`` seconds; it is not cancelled then (see :func:`cancel_outgoing`).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        progress = await migration_progress(driver, vm_id)
        if on_progress is not None:
            on_progress(progress)
        if progress.status is MigrationStatus.COMPLETED:
            log.info("migration completed", vm=vm_id, total_ms=progress.total_time_ms, downtime_ms=progress.downtime_ms)
            return progress
        if progress.status in SETTLED:
            raise HypervisorError(f"migration of VM {vm_id} {progress.status}: {progress.error or 'no reason given'}")
        if loop.time() >= deadline:
            raise HypervisorError(f"migration of VM {vm_id} still {progress.status} after {within}s")
        await asyncio.sleep(POLL_INTERVAL)


async def finish_outgoing(driver: QemuDriver, vm_id: str, within: float = 30.0) -> None:
    """After a completed migration: complete the mirrors without pivoting, detach NBD nodes, drop TLS objects.

    The source stays paused; its disks are left untouched. Conflict unless the migration completed.
    """
    progress = await migration_progress(driver, vm_id)
    if progress.status is not MigrationStatus.COMPLETED:
        raise Conflict(f"migration of VM {vm_id} is {progress.status}, not completed")
    errors = await _drop_mirrors(driver, vm_id, force=False, within=within)
    await _del_objects(driver, vm_id, MIGRATION_CREDS)
    if errors:
        raise HypervisorError(f"disk mirror of VM {vm_id} ended with errors: {'; '.join(errors)}")
    log.info("outgoing migration finished", vm=vm_id)


async def cancel_outgoing(driver: QemuDriver, vm_id: str, within: float = 30.0) -> RunState:
    """Stop any migration and disk mirror of the VM and leave it running; returns its final run state.

    If the migration had already completed the source is resumed (``cont``): the caller must have killed the
    destination first (:func:`abort_incoming`), since it holds a complete copy.
    """
    progress = await migration_progress(driver, vm_id)
    if progress.status not in SETTLED:
        await driver.execute(vm_id, "migrate_cancel")
        progress = await _wait_settled(driver, vm_id, within)
    await _drop_mirrors(driver, vm_id, force=True, within=within)
    await _del_objects(driver, vm_id, MIGRATION_CREDS)
    state = await _run_state(driver, vm_id)
    if state is RunState.POSTMIGRATE:
        state = (await driver.resume(vm_id)).run_state
    log.info("outgoing migration cancelled", vm=vm_id, migration=progress.status, run_state=state)
    return state


async def _wait_settled(driver: QemuDriver, vm_id: str, within: float) -> MigrationProgress:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (progress := await migration_progress(driver, vm_id)).status not in SETTLED:
        if loop.time() >= deadline:
            raise HypervisorError(f"migration of VM {vm_id} still {progress.status} {within}s after cancel")
        await asyncio.sleep(POLL_INTERVAL / 2)
    return progress


# -- mirror jobs ---------------------------------------------------------------------------------------------------


async def mirror_progress(driver: QemuDriver, vm_id: str) -> list[MirrorProgress]:
    """The VM's disk mirror jobs (those this module started) as QEMU reports them now."""
    return await _mirror_jobs(driver, vm_id)


async def _mirror_jobs(driver: QemuDriver, vm_id: str) -> list[MirrorProgress]:
    jobs: list[_JobInfo] = await driver.execute(vm_id, "query-jobs")
    return [
        MirrorProgress(
            job_id=job.get("id", ""),
            status=job.get("status", ""),
            done_bytes=job.get("current-progress", 0),
            total_bytes=job.get("total-progress", 0),
            error=job.get("error"),
        )
        for job in jobs
        if job.get("id", "").startswith("fm-mirror-")
    ]


async def _wait_mirrors_ready(
    driver: QemuDriver, vm_id: str, count: int, within: float, on_progress: MirrorCallback | None
) -> list[MirrorProgress]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        jobs = await _mirror_jobs(driver, vm_id)
        if on_progress is not None:
            on_progress(jobs)
        failed = [f"{job.job_id}: {job.error or job.status}" for job in jobs if job.status in ("aborting", "concluded")]
        if failed or len(jobs) != count:
            raise HypervisorError(f"disk mirror of VM {vm_id} failed: {'; '.join(failed) or 'job vanished'}")
        if all(job.ready for job in jobs):
            return jobs
        if loop.time() >= deadline:
            done = sum(job.done_bytes for job in jobs)
            raise HypervisorError(f"disk mirror of VM {vm_id} not ready after {within}s ({done} bytes copied)")
        await asyncio.sleep(POLL_INTERVAL)


async def _drop_mirrors(driver: QemuDriver, vm_id: str, *, force: bool, within: float = 30.0) -> list[str]:
    """End this module's mirror jobs, delete their NBD nodes and the NBD credentials; returns the jobs' errors.

    ``force=False`` on a ready job completes it without pivoting (after a final sync); ``force=True`` abandons it.
    """
    errors = []
    for job in await _mirror_jobs(driver, vm_id):
        if job.status not in ("concluded", "aborting", "null"):
            try:
                await driver.execute(vm_id, "block-job-cancel", {"device": job.job_id, "force": force})
            except HypervisorError:
                # the job may have concluded between the query and the cancel (QEMU then refuses the verb)
                now = {j.job_id: j.status for j in await _mirror_jobs(driver, vm_id)}
                if now.get(job.job_id) not in ("concluded", "aborting", "null"):
                    raise
        final = await _wait_concluded(driver, vm_id, job.job_id, within)
        await driver.execute(vm_id, "job-dismiss", {"id": job.job_id})
        if final.error and not force:
            errors.append(f"{job.job_id}: {final.error}")
    nodes = await driver.execute(vm_id, "query-named-block-nodes", {"flat": True})
    for name in sorted({node.get("node-name", "") for node in nodes}):
        if name.startswith("fm-nbd-"):
            await driver.execute(vm_id, "blockdev-del", {"node-name": name})
    await _del_objects(driver, vm_id, NBD_CREDS)
    return errors


async def _wait_concluded(driver: QemuDriver, vm_id: str, job_id: str, within: float) -> MirrorProgress:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        job = next((j for j in await _mirror_jobs(driver, vm_id) if j.job_id == job_id), None)
        if job is None:
            raise HypervisorError(f"mirror job {job_id} of VM {vm_id} vanished")
        if job.status == "concluded":
            return job
        if loop.time() >= deadline:
            raise HypervisorError(f"mirror job {job_id} of VM {vm_id} still {job.status} after {within}s")
        await asyncio.sleep(POLL_INTERVAL / 2)


# -- QMP helpers ---------------------------------------------------------------------------------------------------


async def _add_object(driver: QemuDriver, vm_id: str, qom_type: str, object_id: str, **props: Any) -> None:
    """``object-add``, replacing an object of the same id left by an earlier attempt. TLS objects verify the peer."""
    await _del_objects(driver, vm_id, object_id)
    if qom_type == "tls-creds-x509":
        props["verify-peer"] = True
    await driver.execute(vm_id, "object-add", {"qom-type": qom_type, "id": object_id, **props})


async def _del_objects(driver: QemuDriver, vm_id: str, *object_ids: str) -> None:
    present = {item["name"] for item in await driver.execute(vm_id, "qom-list", {"path": "/objects"})}
    for object_id in object_ids:
        if object_id in present:
            await driver.execute(vm_id, "object-del", {"id": object_id})


async def _set_capabilities(driver: QemuDriver, vm_id: str, capabilities: dict[str, bool]) -> None:
    caps = [{"capability": name, "state": state} for name, state in capabilities.items()]
    await driver.execute(vm_id, "migrate-set-capabilities", {"capabilities": caps})


async def _set_tls_parameters(driver: QemuDriver, vm_id: str, params: dict[str, Any]) -> None:
    """Set migration parameters and read back the TLS ones: a stream must never start without them."""
    await driver.execute(vm_id, "migrate-set-parameters", params)
    actual = await driver.execute(vm_id, "query-migrate-parameters")
    for name in ("tls-creds", "tls-authz", "tls-hostname"):
        if name in params and actual.get(name) != params[name]:
            raise HypervisorError(f"QEMU of VM {vm_id} reports {name}={actual.get(name)!r}, expected {params[name]!r}")


async def _run_state(driver: QemuDriver, vm_id: str) -> RunState:
    status = (await driver.execute(vm_id, "query-status"))["status"]
    try:
        return RunState(status)
    except ValueError:
        return RunState.OTHER


def _disk_node(index: int) -> str:
    """The node name :func:`ferryman.agent.hypervisor.qmp.machine_args` gives disk ``index``; also its export name."""
    return f"disk{index}"


def _nbd_target(index: int, address: str, port: int, dst_name: str) -> dict[str, Any]:
    """The NBD client node for disk ``index``: TLS, and the server's certificate must name ``dst_name``."""
    return {
        "driver": "nbd",
        "node-name": _nbd_node(index),
        "server": {"type": "inet", "host": address, "port": str(port)},
        "export": _disk_node(index),
        "tls-creds": NBD_CREDS,
        "tls-hostname": dst_name,
    }


def _nbd_node(index: int) -> str:
    return f"fm-nbd-disk{index}"


def _mirror_job(index: int) -> str:
    return f"fm-mirror-disk{index}"


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        raise InvalidInput(f"bad address {address!r}: give an IP address") from None


def _check_port(port: int | None) -> None:
    if port is None or not 0 < port < 65536:
        raise InvalidInput(f"bad port {port!r}")


def _tcp_uri(address: str, port: int) -> str:
    host = f"[{address}]" if _ip(address).version == 6 else address
    return f"tcp:{host}:{port}"
