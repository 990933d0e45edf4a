"""Forensic capture on the host, outside the guest's reach: a VM's memory and its disks, sealed while they stream.

An incident playbook needs evidence the guest can neither see being taken nor tamper with: it comes from QEMU, not
from inside the guest. It must also never exist in plaintext on the host's disks (``ferryman.forensics.sealed``
encrypts it from the first byte written and hashes it as it passes), and taking it must not stop the service: the
guest keeps running.

Memory (:func:`capture_memory`), in QMP::

    query-status                                       the run state to restore
    getfd fm-dump-<n>            (SCM_RIGHTS)           the write end of a pipe
    dump-guest-memory {format: elf, paging: false, protocol: "fd:fm-dump-<n>", detach: true}
    query-dump  ...  until completed or failed          progress logged
    query-status ...  until the state is back

QEMU stops the vCPUs for the time of the dump (run state ``save-vm``; under a second per GiB when the sealing keeps
up) and resumes them itself if they ran before; a paused VM stays paused. A thread reads the pipe and seals. The ELF
core (a PT_NOTE with every vCPU's registers, a PT_LOAD per RAM block) is what memory-forensics tools read.

A disk (:func:`capture_disk`) is taken by image fleecing, QEMU's way to export a point-in-time view of a live disk::

    object-add secret fm-fleece-key<i>                 an ephemeral key for the fleecing overlay
    blockdev-add {driver: qcow2, node-name: fm-fleece<i>, backing: disk<i>, LUKS under that key}
    blockdev-backup {device: disk<i>, target: fm-fleece<i>, sync: none}      the point in time
    getfd fm-nbd<i> (a listening UNIX socket in the VM's directory), nbd-server-start {addr: fd}
    block-export-add {type: nbd, node-name: fm-fleece<i>, writable: false}
    ... NBD reads of the whole export, in a thread, into the sealed file ...
    block-export-del, nbd-server-stop, job-cancel + job-dismiss, blockdev-del, object-del; the overlay crypto-erased

From the backup job's start, QEMU copies a block into the overlay before the guest overwrites it, so the overlay
(reading through to the live disk where nothing was copied) is the disk as it was at that instant, decrypted for an
encrypted VM (QEMU already holds its key), while the guest runs on, writing where it always does. The copies of old
blocks are encrypted under a key that never leaves memory. Two alternatives were rejected: ``qemu-img`` cannot write
to a pipe (it resizes its output) nor read a consistent view of a disk a running QEMU writes; and a temporary
snapshot overlay committed back afterwards (``blockdev-snapshot`` + ``block-commit``) would move the guest's writes
into a file the VM's spec does not know, lost if the agent died before the commit and the VM were restarted.

On any failure the partial evidence file is scrubbed, everything added to QEMU removed (what an agent that died
mid-capture left behind goes at the next capture, :func:`clear_leftovers`), and :class:`HypervisorError` raised.
Every wait is bounded. This module does not choose keys (the caller passes a fresh one per artefact and wraps it),
nor where evidence goes, nor whether the guest may keep running (a playbook pauses it first if it must not).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import select
import socket
import struct
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from ferryman.agent.hypervisor.qmp import LUKS_ITER_TIME_MS, QemuDriver
from ferryman.agent.storage.images import create_encrypted_qcow2, secret_object_qmp
from ferryman.agent.storage.scrub import ScrubError, ScrubMode, scrub_file, scrub_tree
from ferryman.core.errors import Conflict, HypervisorError, NotFound, StorageError
from ferryman.durable import fsync_directory
from ferryman.forensics.sealed import SealedWriter, SealInfo, new_key

__all__ = [
    "DISK_TIMEOUT",
    "MEMORY_TIMEOUT",
    "capture_disk",
    "capture_memory",
    "clear_leftovers",
    "disk_artefact",
    "memory_artefact",
]

log = structlog.get_logger(__name__)

MEMORY_TIMEOUT = 1800.0
DISK_TIMEOUT = 3600.0
SETTLE_TIMEOUT = 30.0  # for QEMU to finish a cancelled dump or job and hand back its state
POLL_INTERVAL = 0.05
PROGRESS_INTERVAL = 5.0
READ_BYTES = 1 << 20  # one read from the dump pipe
NBD_READ_BYTES = 4 << 20  # one NBD read request (QEMU serves up to 32 MiB)
SOCKET_TIMEOUT = 60.0
PREFIX = "fm-fleece"
EXPORT_PREFIX = "fm-forensic-disk"
FILE_PREFIX = "forensic-"
# states in which there is no guest memory to dump yet, or QEMU is already saving it
_NO_DUMP_STATES = frozenset({"inmigrate", "prelaunch", "finish-migrate", "save-vm", "restore-vm"})


def memory_artefact(vm_id: str) -> str:
    """The name a memory capture is sealed under: it binds the dump to its VM."""
    return f"{vm_id}/memory.elf"


def disk_artefact(vm_id: str, index: int) -> str:
    """The name a capture of disk ``index`` is sealed under (raw, as the guest sees it)."""
    return f"{vm_id}/disk{index}.raw"


# -- the evidence file ------------------------------------------------------------------------------------------------


class _Evidence:
    """The sealed file of one capture: created owner-only and exclusively, synced when done, scrubbed on failure."""

    def __init__(self, path: Path, key: bytes, artefact: str) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise StorageError(f"cannot create the evidence file {path}: {err.strerror or err}") from err
        self.file = os.fdopen(fd, "wb", buffering=0)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            self.writer = SealedWriter(self.file, key, artefact=artefact)
        except BaseException:
            self.discard()
            raise

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def finish(self) -> SealInfo:
        info = self.writer.close()
        os.fsync(self.file.fileno())
        self.file.close()
        fsync_directory(self.path.parent)
        return info

    def discard(self) -> None:
        """Close and scrub the partial file; a scrub that fails is logged (the capture's own error is raised)."""
        with contextlib.suppress(OSError):
            self.file.close()
        try:
            scrub_file(self.path, ScrubMode.ZERO)
        except ScrubError as err:
            log.error("could not scrub a partial evidence file", path=str(self.path), error=err.message)


async def _poll(probe: Callable[[], Awaitable[bool]], within: float) -> bool:
    """Call ``probe`` every :data:`POLL_INTERVAL` until it says True (True) or ``within`` seconds passed (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        if await probe():
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(POLL_INTERVAL)


async def _in_thread(func: Callable[..., Any], *args: Any) -> Any:
    """``func`` in a thread, waited for even if the caller is cancelled meanwhile (it owns files we must not close
    under it); the cancellation is raised once the thread returned."""
    future = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


_captures: weakref.WeakKeyDictionary[QemuDriver, set[str]] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def _one_capture(driver: QemuDriver, vm_id: str) -> AsyncIterator[None]:
    """One capture of a VM at a time (QEMU has one NBD server, and a capture clears what others left): Conflict."""
    running = _captures.setdefault(driver, set())
    if vm_id in running:
        raise Conflict(f"a forensic capture of VM {vm_id} is already running")
    running.add(vm_id)
    try:
        yield
    finally:
        running.discard(vm_id)


# -- memory -----------------------------------------------------------------------------------------------------------


async def capture_memory(
    driver: QemuDriver, vm_id: str, out_path: Path, key: bytes, *, within: float = MEMORY_TIMEOUT
) -> SealInfo:
    """Dump the VM's memory as an ELF core, sealed under ``key`` into ``out_path`` (a new file); returns its
    :class:`SealInfo`. The VM's run state afterwards is what it was before.

    Conflict: the VM is not attached here, has no memory to dump (an unactivated migration destination), or another
    capture of it runs; StorageError: ``out_path`` cannot be created; HypervisorError: the capture failed (nothing
    is left of it).
    """
    async with _one_capture(driver, vm_id):
        before = await _status(driver, vm_id)
        if before in _NO_DUMP_STATES:
            raise Conflict(f"VM {vm_id} is {before}: its memory cannot be captured now")
        artefact = memory_artefact(vm_id)
        evidence = await asyncio.to_thread(_Evidence, out_path, key, artefact)
        bound = log.bind(vm=vm_id, artefact=artefact)
        stop = threading.Event()
        pump: asyncio.Future[None] | None = None
        started = False
        try:
            read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            pump = asyncio.ensure_future(asyncio.to_thread(_pump_pipe, read_fd, evidence, stop))  # closes read_fd
            started = await _start_dump(driver, vm_id, write_fd)
            bound.info("memory capture started", run_state=before)
            total = await _wait_dump(driver, vm_id, pump, within, bound)
            await asyncio.wait_for(asyncio.shield(pump), SETTLE_TIMEOUT)  # EOF once QEMU closed its end
            info: SealInfo = await _in_thread(evidence.finish)
            if info.plaintext_bytes < total:
                raise HypervisorError(f"the dump holds {info.plaintext_bytes} bytes, less than the {total} of RAM")
            await _restore_run_state(driver, vm_id, before)
        except BaseException as err:
            stop.set()
            await _abort_dump(driver, vm_id, pump, started)
            await _in_thread(evidence.discard)
            await _restore_quietly(driver, vm_id, before)
            bound.error("memory capture failed", error=str(err) or type(err).__name__)
            if isinstance(err, Exception):
                raise HypervisorError(f"memory capture of VM {vm_id} failed: {err or type(err).__name__}") from err
            raise
    bound.info("memory captured", bytes=info.plaintext_bytes, sealed_bytes=info.sealed_bytes)
    return info


async def _start_dump(driver: QemuDriver, vm_id: str, write_fd: int) -> bool:
    """Hand QEMU the pipe's write end (ours is closed) and start a detached ELF dump into it; True once started."""
    fdname = f"fm-dump-{secrets.token_hex(4)}"
    try:
        _grow_pipe(write_fd)
        await driver.send_fd(vm_id, fdname, write_fd)
    finally:
        os.close(write_fd)
    arguments = {"paging": False, "format": "elf", "protocol": f"fd:{fdname}", "detach": True}
    try:
        await driver.execute(vm_id, "dump-guest-memory", arguments)
    except BaseException:
        with contextlib.suppress(HypervisorError, Conflict):
            await driver.execute(vm_id, "closefd", {"fdname": fdname})  # else QEMU keeps the pipe open
        raise
    return True


def _grow_pipe(fd: int) -> None:
    """A 1 MiB pipe buffer (the unprivileged maximum) lets QEMU write while the thread seals; optional."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)


def _pump_pipe(read_fd: int, evidence: _Evidence, stop: threading.Event) -> None:
    """Seal what QEMU writes into the pipe until it closes its end; on ``stop``, close ours, so that QEMU's next
    write fails (EPIPE: QEMU ignores SIGPIPE) and its dump ends."""
    poller = select.poll()
    poller.register(read_fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    try:
        while not stop.is_set():
            if not poller.poll(250):
                continue
            data = os.read(read_fd, READ_BYTES)
            if not data:
                return
            evidence.write(data)
    finally:
        os.close(read_fd)


async def _wait_dump(driver: QemuDriver, vm_id: str, pump: asyncio.Future[None], within: float, bound: Any) -> int:
    """Poll ``query-dump`` until the dump completed (returns its RAM bytes) or failed; logs progress. A pump that
    failed (the evidence could not be written) is the cause to report, not the dump that failed after it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    next_report = loop.time() + PROGRESS_INTERVAL
    while True:
        if pump.done() and not pump.cancelled() and (failure := pump.exception()) is not None:
            raise HypervisorError(f"sealing the dump failed: {failure}") from failure
        state = await driver.execute(vm_id, "query-dump")
        status, done, total = state.get("status"), int(state.get("completed", 0)), int(state.get("total", 0))
        if status == "completed":
            return total
        if status != "active":
            raise HypervisorError(f"QEMU's dump ended {status} after {done} of {total} bytes")
        if loop.time() > deadline:
            raise HypervisorError(f"the dump did not finish within {within:g}s ({done} of {total} bytes)")
        if loop.time() >= next_report:
            bound.info("memory capture progress", bytes=done, total=total)
            next_report = loop.time() + PROGRESS_INTERVAL
        await asyncio.sleep(POLL_INTERVAL)


async def _abort_dump(driver: QemuDriver, vm_id: str, pump: asyncio.Future[None] | None, started: bool) -> None:
    """After ``stop``: wait for the pump to close its end of the pipe and for QEMU's dump to end (bounded)."""
    if pump is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(pump), SETTLE_TIMEOUT)
    if started:

        async def ended() -> bool:
            return bool((await driver.execute(vm_id, "query-dump")).get("status") != "active")

        with contextlib.suppress(HypervisorError, Conflict):
            await _poll(ended, SETTLE_TIMEOUT)


async def _status(driver: QemuDriver, vm_id: str) -> str:
    return str((await driver.execute(vm_id, "query-status"))["status"])


async def _restore_run_state(driver: QemuDriver, vm_id: str, before: str) -> None:
    """Wait for QEMU to leave ``save-vm``; a VM that ran before runs again (QEMU resumes it, else ``cont`` does)."""
    status = before

    async def settled() -> bool:
        nonlocal status
        status = await _status(driver, vm_id)
        return status != "save-vm"

    await _poll(settled, SETTLE_TIMEOUT)
    if before == "running" and status not in ("running", "save-vm"):
        log.warning("vm not resumed after its memory capture; resuming it", vm=vm_id, status=status)
        await driver.execute(vm_id, "cont")
        status = await _status(driver, vm_id)
    if status != before:
        raise HypervisorError(f"VM {vm_id} is {status} after its memory capture; it was {before}")


async def _restore_quietly(driver: QemuDriver, vm_id: str, before: str) -> None:
    try:
        await _restore_run_state(driver, vm_id, before)
    except (HypervisorError, Conflict) as err:
        log.error("run state not restored after a failed memory capture", vm=vm_id, error=err.message)


# -- disks ------------------------------------------------------------------------------------------------------------


async def capture_disk(
    driver: QemuDriver, vm_id: str, index: int, out_path: Path, key: bytes, *, within: float = DISK_TIMEOUT
) -> SealInfo:
    """Capture disk ``index`` of the VM as the guest sees it (raw, decrypted) at one instant, sealed under ``key``
    into ``out_path`` (a new file); returns its :class:`SealInfo`. The guest keeps running and writing.

    No disk key is needed: QEMU reads through its own open, decrypting node. NotFound: the VM has no such disk;
    Conflict: it is not attached here, or another capture of it runs; StorageError: ``out_path`` cannot be created;
    HypervisorError: the capture failed (nothing is left of it).
    """
    async with _one_capture(driver, vm_id):
        size = await _disk_size(driver, vm_id, index)
        await clear_leftovers(driver, vm_id)
        artefact = disk_artefact(vm_id, index)
        evidence = await asyncio.to_thread(_Evidence, out_path, key, artefact)
        bound = log.bind(vm=vm_id, artefact=artefact)
        fleece = _Fleece(driver, vm_id, index)
        stop = threading.Event()
        pump: asyncio.Future[None] | None = None
        try:
            try:
                sock = await fleece.start(size)
                bound.info("disk capture started", bytes=size)
                pump = asyncio.ensure_future(asyncio.to_thread(_pump_nbd, sock, fleece.export, size, evidence, stop))
                await _watch(pump, stop, evidence, size, within, bound)
                info: SealInfo = await _in_thread(evidence.finish)
            finally:
                await fleece.stop()  # the export goes first: a pump still reading ends with it
        except BaseException as err:
            stop.set()
            if pump is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(pump), SETTLE_TIMEOUT)
            await _in_thread(evidence.discard)
            bound.error("disk capture failed", error=str(err) or type(err).__name__)
            if isinstance(err, Exception):
                message = f"capture of disk {index} of VM {vm_id} failed: {err or type(err).__name__}"
                raise HypervisorError(message) from err
            raise
    bound.info("disk captured", bytes=info.plaintext_bytes, sealed_bytes=info.sealed_bytes)
    return info


async def _disk_size(driver: QemuDriver, vm_id: str, index: int) -> int:
    nodes: list[dict[str, Any]] = await driver.execute(vm_id, "query-named-block-nodes")
    for node in nodes:
        if node.get("node-name") == f"disk{index}":
            return int(node["image"]["virtual-size"])
    raise NotFound(f"VM {vm_id} has no disk {index}")


async def _watch(
    pump: asyncio.Future[None], stop: threading.Event, evidence: _Evidence, size: int, within: float, bound: Any
) -> None:
    """Wait for the pump within ``within`` seconds, logging progress."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        done, _ = await asyncio.wait({pump}, timeout=min(PROGRESS_INTERVAL, max(0.0, deadline - loop.time())))
        if done:
            pump.result()
            return
        if loop.time() >= deadline:
            stop.set()
            raise HypervisorError(f"the disk was not read within {within:g}s")
        bound.info("disk capture progress", bytes=evidence.writer.plaintext_bytes, total=size)


class _Fleece:
    """The QEMU side of one disk capture: what :meth:`start` added, :meth:`stop` removes, in reverse order."""

    def __init__(self, driver: QemuDriver, vm_id: str, index: int) -> None:
        self.driver, self.vm_id = driver, vm_id
        self.disk = f"disk{index}"
        self.node = f"{PREFIX}{index}"
        self.secret = f"{PREFIX}-key{index}"
        self.export = f"{EXPORT_PREFIX}{index}"
        self.fdname = f"{PREFIX}-nbd{index}"
        vm_dir = driver.vm_dir(vm_id)
        self.overlay = vm_dir / f"{FILE_PREFIX}fleece{index}.qcow2"
        self.sock_name = f"{FILE_PREFIX}nbd{index}.sock"
        self.socket_path = vm_dir / self.sock_name
        self._undo: list[tuple[str, Callable[[], Awaitable[None]]]] = []

    async def _qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self.driver.execute(self.vm_id, command, arguments)

    async def start(self, size: int) -> socket.socket:
        """Freeze the point in time and export it; returns a socket connected to the export."""
        ephemeral = new_key()
        await asyncio.to_thread(_create_overlay, self.overlay, size, ephemeral, self.driver.qemu_img)
        self._undo.append(("scrub the overlay", self._scrub_overlay))
        await self._qmp("object-add", dict(secret_object_qmp(self.secret, ephemeral)))
        self._undo.append(("object-del", lambda: self._qmp("object-del", {"id": self.secret})))
        overlay = {
            "driver": "qcow2",
            "node-name": self.node,
            "file": {"driver": "file", "filename": str(self.overlay)},
            "backing": self.disk,
            "encrypt": {"format": "luks", "key-secret": self.secret},
        }
        await self._qmp("blockdev-add", overlay)
        self._undo.append(("blockdev-del", lambda: self._qmp("blockdev-del", {"node-name": self.node})))
        backup = {"job-id": self.node, "device": self.disk, "target": self.node, "sync": "none", "auto-dismiss": False}
        await self._qmp("blockdev-backup", backup)
        self._undo.append(("job-cancel", lambda: _end_job(self.driver, self.vm_id, self.node)))
        await self._serve()
        export = {"type": "nbd", "id": self.export, "node-name": self.node, "name": self.export, "writable": False}
        await self._qmp("block-export-add", export)
        self._undo.append(("block-export-del", self._del_export))
        return await asyncio.to_thread(self._connect)

    async def _serve(self) -> None:
        """Start QEMU's NBD server on a listening socket made here, in the VM's (owner-only) directory."""
        listener = await asyncio.to_thread(self._listen)
        self._undo.append(("unlink the socket", self._unlink_socket))
        try:
            await self.driver.send_fd(self.vm_id, self.fdname, listener.fileno())
        finally:
            listener.close()
        try:
            addr = {"type": "fd", "data": {"str": self.fdname}}
            await self._qmp("nbd-server-start", {"addr": addr, "max-connections": 1})
        except BaseException:
            with contextlib.suppress(HypervisorError, Conflict):
                await self._qmp("closefd", {"fdname": self.fdname})
            raise
        self._undo.append(("nbd-server-stop", lambda: self._qmp("nbd-server-stop")))

    def _listen(self) -> socket.socket:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _short_path(self.socket_path.parent, self.sock_name) as path:
                listener.bind(path)
            listener.listen(1)
        except BaseException:
            listener.close()
            raise
        return listener

    def _connect(self) -> socket.socket:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.settimeout(SOCKET_TIMEOUT)
            with _short_path(self.socket_path.parent, self.sock_name) as path:
                client.connect(path)
        except BaseException:
            client.close()
            raise
        self.socket_path.unlink(missing_ok=True)  # nobody else connects (and QEMU takes one client only)
        return client

    async def _unlink_socket(self) -> None:
        await asyncio.to_thread(self.socket_path.unlink, missing_ok=True)

    async def _del_export(self) -> None:
        await self._qmp("block-export-del", {"id": self.export, "mode": "hard"})

        async def gone() -> bool:
            return all(e.get("id") != self.export for e in await self._qmp("query-block-exports"))

        if not await _poll(gone, SETTLE_TIMEOUT):
            raise HypervisorError(f"export {self.export} not deleted within {SETTLE_TIMEOUT:g}s")

    async def _scrub_overlay(self) -> None:
        # crypto-erase: the overlay is LUKS under a key that existed only in this process and in QEMU
        await asyncio.to_thread(scrub_tree, [self.overlay], ScrubMode.CRYPTO)

    async def stop(self) -> None:
        """Undo every step of :meth:`start` that was done, newest first. A step that fails is logged; the overlay
        file is then scrubbed only if its node is gone from QEMU, else it waits for :func:`clear_leftovers`."""
        node_held = False
        while self._undo:
            what, undo = self._undo.pop()
            if node_held and what == "scrub the overlay":
                log.error("fleecing overlay may still be open in QEMU; left for the next capture", vm=self.vm_id)
                continue
            try:
                await undo()
            except (HypervisorError, Conflict, ScrubError, OSError) as err:
                node_held = node_held or what in ("job-cancel", "blockdev-del")
                log.error("disk capture cleanup step failed", vm=self.vm_id, step=what, error=str(err))


def _create_overlay(path: Path, size: int, key: bytes, qemu_img: str) -> None:
    """The fleecing overlay: created owner-only and exclusively first, so qemu-img fills a file nobody else reads."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    try:
        create_encrypted_qcow2(path, size, key, iter_time_ms=LUKS_ITER_TIME_MS, qemu_img=qemu_img)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _short_path(directory: Path, name: str) -> Iterator[str]:
    """``name`` in ``directory`` as a path short enough for a UNIX socket (at most 107 bytes), however deep the
    directory: through an open descriptor of it."""
    dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dir_fd}/{name}"
    finally:
        os.close(dir_fd)


async def _end_job(driver: QemuDriver, vm_id: str, job: str) -> None:
    """Cancel the job (a ``sync: none`` backup never ends by itself), wait until it concluded, dismiss it."""
    with contextlib.suppress(HypervisorError):
        await driver.execute(vm_id, "job-cancel", {"id": job})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT
    while True:
        jobs: list[dict[str, Any]] = await driver.execute(vm_id, "query-jobs")
        found = next((j for j in jobs if j.get("id") == job), None)
        if found is None:
            return
        if found.get("status") == "concluded":
            await driver.execute(vm_id, "job-dismiss", {"id": job})
            return
        if loop.time() > deadline:
            raise HypervisorError(f"job {job} did not conclude within {SETTLE_TIMEOUT:g}s after its cancel")
        await asyncio.sleep(POLL_INTERVAL)


async def clear_leftovers(driver: QemuDriver, vm_id: str) -> None:
    """Remove what a disk capture whose agent died left behind: its export (and then the NBD server, if it serves
    nothing else), its job, nodes and secrets in QEMU, then its files. Idempotent; errors are logged. Every disk
    capture runs it first; call it otherwise only while no capture of the VM runs (e.g. when the agent starts)."""
    try:
        exports: list[dict[str, Any]] = await driver.execute(vm_id, "query-block-exports")
        ours = [str(e["id"]) for e in exports if str(e.get("id", "")).startswith(EXPORT_PREFIX)]
        for export in ours:
            await driver.execute(vm_id, "block-export-del", {"id": export, "mode": "hard"})
        if ours and len(ours) == len(exports):
            with contextlib.suppress(HypervisorError):
                await driver.execute(vm_id, "nbd-server-stop")
        jobs: list[dict[str, Any]] = await driver.execute(vm_id, "query-jobs")
        for job in jobs:
            if str(job.get("id", "")).startswith(PREFIX):
                await _end_job(driver, vm_id, str(job["id"]))
        nodes: list[dict[str, Any]] = await driver.execute(vm_id, "query-named-block-nodes")
        for node in nodes:
            if str(node.get("node-name", "")).startswith(PREFIX):
                await driver.execute(vm_id, "blockdev-del", {"node-name": node["node-name"]})
        objects: list[dict[str, Any]] = await driver.execute(vm_id, "qom-list", {"path": "/objects"})
        for obj in objects:
            if str(obj.get("name", "")).startswith(PREFIX):
                await driver.execute(vm_id, "object-del", {"id": obj["name"]})
    except HypervisorError as err:
        log.error("could not clear what an earlier disk capture left in QEMU", vm=vm_id, error=err.message)
        return
    stale = await asyncio.to_thread(lambda: sorted(driver.vm_dir(vm_id).glob(f"{FILE_PREFIX}*")))
    if stale:
        log.warning("scrubbing what an earlier disk capture left", vm=vm_id, files=[p.name for p in stale])
        try:
            await asyncio.to_thread(scrub_tree, stale, ScrubMode.CRYPTO)
        except ScrubError as err:
            log.error("could not scrub what an earlier disk capture left", vm=vm_id, error=err.message)


# -- NBD --------------------------------------------------------------------------------------------------------------

_NBD_MAGIC = 0x4E42444D41474943  # "NBDMAGIC"
_IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
_FLAG_FIXED_NEWSTYLE, _FLAG_NO_ZEROES = 1, 2
_OPT_GO = 7
_REPLY_MAGIC = 0x3E889045565A9
_REP_ACK, _REP_INFO, _REP_ERROR_BIT = 1, 3, 1 << 31
_INFO_EXPORT = 0
_REQUEST_MAGIC, _SIMPLE_REPLY_MAGIC = 0x25609513, 0x67446698
_CMD_READ, _CMD_DISC = 0, 2


class _Nbd:
    """The least of an NBD client (fixed newstyle, ``NBD_OPT_GO``, simple replies, one read in flight): enough to
    read QEMU's export sequentially without a plaintext copy anywhere but in this process's memory."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def _recv(self, size: int) -> bytes:
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        while got < size:
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise HypervisorError("QEMU's NBD server closed the connection")
            got += n
        return bytes(buffer)

    def go(self, export: str) -> int:
        """Handshake and select ``export``; returns its size in bytes."""
        magic, opt_magic, flags = struct.unpack(">QQH", self._recv(18))
        if magic != _NBD_MAGIC or opt_magic != _IHAVEOPT or not flags & _FLAG_FIXED_NEWSTYLE:
            raise HypervisorError("the NBD server does not speak fixed newstyle")
        self.sock.sendall(struct.pack(">I", _FLAG_FIXED_NEWSTYLE | (flags & _FLAG_NO_ZEROES)))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", _IHAVEOPT, _OPT_GO, len(data)) + data)
        size: int | None = None
        while True:
            magic, _, reply, length = struct.unpack(">QIII", self._recv(20))
            body = self._recv(length)
            if magic != _REPLY_MAGIC:
                raise HypervisorError("bad NBD option reply")
            if reply & _REP_ERROR_BIT:
                raise HypervisorError(f"NBD server refused export {export}: {body.decode(errors='replace')}")
            if reply == _REP_INFO and len(body) >= 12 and struct.unpack(">H", body[:2])[0] == _INFO_EXPORT:
                size = struct.unpack(">Q", body[2:10])[0]
            elif reply == _REP_ACK:
                break
        if size is None:
            raise HypervisorError(f"NBD server did not say the size of export {export}")
        return size

    def read(self, offset: int, length: int) -> bytes:
        self.sock.sendall(struct.pack(">IHHQQI", _REQUEST_MAGIC, 0, _CMD_READ, offset, offset, length))
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != _SIMPLE_REPLY_MAGIC or handle != offset:
            raise HypervisorError(f"bad NBD reply to the read at {offset}")
        if error:
            raise HypervisorError(f"NBD read of {length} bytes at {offset} failed: error {error}")
        return self._recv(length)

    def disconnect(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(struct.pack(">IHHQQI", _REQUEST_MAGIC, 0, _CMD_DISC, 0, 0, 0))


def _pump_nbd(sock: socket.socket, export: str, size: int, evidence: _Evidence, stop: threading.Event) -> None:
    """Read the whole export into the evidence, unless ``stop`` is set first; always closes the socket."""
    nbd = _Nbd(sock)
    try:
        served = nbd.go(export)
        if served != size:
            raise HypervisorError(f"the export has {served} bytes, the disk {size}")
        for offset in range(0, size, NBD_READ_BYTES):
            if stop.is_set():
                raise HypervisorError("stopped")
            evidence.write(nbd.read(offset, min(NBD_READ_BYTES, size - offset)))
        nbd.disconnect()
    except OSError as err:
        raise HypervisorError(f"reading the disk over NBD failed: {err}") from err
    finally:
        sock.close()
