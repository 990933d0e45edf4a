"""The QEMU driver: runs VMs as daemonized QEMU processes and drives them over QMP with ``qemu.qmp``.

Each VM owns a directory, ``<state_dir>/vms/<vm_id>/``::

    spec.json      the VMSpec (with its generation), written before anything is started
    disk0.qcow2    one qcow2 image per DiskSpec, made with qemu-img (LUKS-encrypted for an encrypted VM)
    disks.json     only for a VM on shared storage: the image paths it uses instead (never created or deleted here)
    incoming       present while the VM is a migration destination that has not been activated
    qmp.sock       the QMP monitor socket
    qga.sock       the guest agent's port, for an image that declares one
    qemu.pid       written by QEMU (-pidfile)
    console.log    the guest's serial console, appended to across boots

An encrypted VM's images open only with its copy's disk key, which the controller sends with the request that needs it
(create, start, prepare, restart); the driver holds it in memory (:meth:`QemuDriver.use_key`) for that request only,
and passes it to QEMU and qemu-img through a pipe, never on a command line or in a file. The agent therefore cannot
boot an encrypted VM again on its own: every boot needs the controller's key.

A migration destination is started by :meth:`QemuDriver.create_incoming`: the same machine, paused (``-S``) and
waiting for an incoming migration (``-incoming defer``); it is a managed VM like any other. What it must not do is
resume on its own: only an explicit ``cont`` (see :mod:`ferryman.agent.hypervisor.migrate`) runs it.

QEMU is started with ``-daemonize``, so it is not a child of the agent and survives the agent's death; a new driver
finds it again through the pidfile and /proc (:meth:`QemuDriver.reattach`). The driver decides nothing: it never
restarts a VM on its own, and it never kills a process it finds unless told to stop or destroy that VM. Processes
that reference this state directory without being one of its VMs are reported as ``managed=False`` so that the
controller can see a copy started behind its back.

Errors from QEMU, QMP and qemu-img surface as :class:`HypervisorError` carrying QEMU's own message. Every wait has a
bound.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import contextvars
import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import structlog
from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError, Runstate

from ferryman.agent.hypervisor import procscan
from ferryman.agent.hypervisor.boot import BootImage, ImageBoot, disable_core_dumps, image_boot, key_pipe, qemu_argv
from ferryman.agent.hypervisor.nics import VMNics
from ferryman.agent.hypervisor.procscan import QemuProcess
from ferryman.agent.hypervisor.protocol import HypervisorEvent
from ferryman.agent.probes import GUEST_AGENT_SOCKET
from ferryman.agent.storage.image_cache import ImageCache
from ferryman.agent.storage.images import KEY_OBJECT_ID, copy_image, create_encrypted_qcow2
from ferryman.core.bootparams import boot_parameters
from ferryman.core.clock import Clock, SystemClock
from ferryman.core.errors import Conflict, HypervisorError, InvalidInput, NotFound, StorageError
from ferryman.core.models import DiskSpec, ImageRef, NicSpec, RunState, VMRuntime, VMSpec, check_name, check_resident
from ferryman.durable import write_atomic
from ferryman.wire.network import NetworkReport, NicState

if TYPE_CHECKING:
    from ferryman.agent.network.host import HostNetwork

GONE = "GONE"
SHARED_DISKS = "disks.json"
INCOMING_MARK = "incoming"
QMP_LOST = "QMP_LOST"
# PBKDF2 time of a LUKS header. The passphrase derives from a random 256-bit key, so key stretching adds no strength;
# a short time keeps every QEMU start and qemu-img run fast.
LUKS_ITER_TIME_MS = 10
_RUN_STATES = {state.value: state for state in RunState}


def _via_fd(dir_fd: int, name: str) -> str:
    """A short path to ``name`` in an open directory.

    A UNIX socket path is limited to 107 bytes and state dirs can be deeper than that; going through the directory's
    file descriptor keeps the path short. QEMU inherits the descriptor, so it binds (and at exit removes) the socket
    in the VM directory.
    """
    return f"/proc/self/fd/{dir_fd}/{name}"


@dataclasses.dataclass
class _Session:
    """The driver's live QMP connection to one QEMU process."""

    vm_id: str
    pid: int
    client: QMPClient
    listener: EventListener
    pump: asyncio.Task[None] | None = None
    watch: asyncio.Task[None] | None = None
    expect_exit: bool = False


class _EventStream:
    """One subscriber's queue of events; it ends when the driver closes."""

    def __init__(self, subscribers: list[_EventStream], maxsize: int) -> None:
        self._queue: asyncio.Queue[HypervisorEvent | None] = asyncio.Queue(maxsize=maxsize)
        self._subscribers = subscribers
        subscribers.append(self)

    def put(self, event: HypervisorEvent | None) -> bool:
        """Queue ``event``; when full, drop the oldest one and return False."""
        dropped = False
        if self._queue.full():
            self._queue.get_nowait()
            dropped = True
        self._queue.put_nowait(event)
        return not dropped

    def __aiter__(self) -> _EventStream:
        return self

    async def __anext__(self) -> HypervisorEvent:
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        if self in self._subscribers:
            self._subscribers.remove(self)


class QemuDriver:
    """Runs this host's VMs as QEMU processes, each booted from the :class:`BootImage` the driver is handed (see the
    module docstring for the on-disk layout)."""

    LAUNCH_TIMEOUT = 30.0
    CONNECT_TIMEOUT = 10.0
    COMMAND_TIMEOUT = 15.0
    STOP_TIMEOUT = 15.0
    KILL_TIMEOUT = 5.0
    EVENT_QUEUE = 10_000

    def __init__(
        self,
        state_dir: Path,
        boot: BootImage,
        accel: str,
        *,
        qemu_binary: str = "qemu-system-x86_64",
        qemu_img: str = "qemu-img",
        log: Any = None,
        clock: Clock | None = None,
        network: HostNetwork | None = None,
    ) -> None:
        if accel not in ("kvm", "tcg"):
            raise InvalidInput(f"bad accelerator {accel!r}: use kvm or tcg")
        self.state_dir = state_dir.resolve()
        self.boot = boot
        self.accel = accel
        self.qemu_binary = qemu_binary
        self.qemu_img = qemu_img
        self.images = ImageCache(self.state_dir / "images")
        self.nics = VMNics(network)
        self._log = log if log is not None else structlog.get_logger("ferryman.agent.qemu")
        self._clock = clock or SystemClock()
        self._sessions: dict[str, _Session] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._subscribers: list[_EventStream] = []
        # disk keys live in the context of the request that brought them (each API request runs in a task of its
        # own): they are gone when it ends, and no other request sees them
        self._keys: contextvars.ContextVar[Mapping[str, bytes]] = contextvars.ContextVar(
            f"ferryman_disk_keys_{id(self)}", default=MappingProxyType({})
        )

    # -- layout ---------------------------------------------------------------------------------------------------

    def _vm_dir(self, vm_id: str) -> Path:
        if not _is_uuid(vm_id):
            raise InvalidInput(f"bad VM id {vm_id!r}: use a lowercase UUID")
        return self.state_dir / "vms" / vm_id

    def console_log(self, vm_id: str) -> Path:
        """The VM's serial console log."""
        return self._vm_dir(vm_id) / "console.log"

    def vm_dir(self, vm_id: str) -> Path:
        """The directory holding everything this host keeps for the VM (see the module docstring)."""
        return self._vm_dir(vm_id)

    def disk_paths(self, vm_id: str) -> list[Path]:
        """The VM's disk images, in device order (disk0 is the guest's /dev/vda)."""
        return self._disks(self.load_spec(vm_id))

    def _disks(self, spec: VMSpec) -> list[Path]:
        vm_dir = self._vm_dir(spec.vm_id)
        try:
            shared = json.loads((vm_dir / SHARED_DISKS).read_text())
        except FileNotFoundError:
            return [vm_dir / f"disk{i}.qcow2" for i in range(len(spec.disks))]
        except (OSError, ValueError) as err:
            raise HypervisorError(f"corrupt {SHARED_DISKS} for VM {spec.vm_id}: {err}") from err
        if not isinstance(shared, list) or len(shared) != len(spec.disks):
            raise HypervisorError(f"{SHARED_DISKS} of VM {spec.vm_id} does not list one image per disk")
        return [Path(str(path)) for path in shared]

    def load_spec(self, vm_id: str) -> VMSpec:
        """The VM's stored spec; NotFound if this host has no such VM."""
        path = self._vm_dir(vm_id) / "spec.json"
        try:
            raw = json.loads(path.read_text())
            image = ImageRef(**raw["image"]) if raw.get("image") else None
            nics = tuple(NicSpec(**{**nic, "peers": tuple(nic.get("peers", ()))}) for nic in raw.get("nics", ()))
            disks = tuple(DiskSpec(**disk) for disk in raw["disks"])
            return VMSpec(**{**raw, "disks": disks, "image": image, "nics": nics})
        except FileNotFoundError:
            raise NotFound(f"VM {vm_id} does not exist on this host") from None
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise HypervisorError(f"corrupt spec for VM {vm_id} at {path}: {err}") from err

    def _save_spec(self, spec: VMSpec) -> None:
        path = self._vm_dir(spec.vm_id) / "spec.json"
        try:  # the spec holds the copy's generation (fencing): it must survive a crash whole
            write_atomic(path, json.dumps(dataclasses.asdict(spec), indent=2).encode(), mode=0o600)
        except OSError as err:
            raise StorageError(f"cannot save the spec of VM {spec.vm_id} at {path}: {err}") from err

    def set_generation(self, vm_id: str, generation: int) -> VMSpec:
        """Record a new generation for the VM (after a migration commit); returns the updated spec."""
        spec = dataclasses.replace(self.load_spec(vm_id), generation=generation)
        self._save_spec(spec)
        return spec

    # -- disk keys ------------------------------------------------------------------------------------------------

    def use_key(self, vm_id: str, key: bytes | None) -> None:
        """Hold the disk key the controller sent for the VM's copy here, for the rest of the current request (task)
        only (None: nothing sent)."""
        if key is not None:
            self._keys.set({**self._keys.get(), self._vm_dir(vm_id).name: key})

    def key_of(self, vm_id: str) -> bytes | None:
        """The VM's disk key if it is encrypted (NotFound: no such VM; InvalidInput: encrypted but no key given)."""
        return self._key_for(self.load_spec(vm_id))

    def _key_for(self, spec: VMSpec) -> bytes | None:
        if not spec.encrypted:
            return None
        key = self._keys.get().get(spec.vm_id)
        if key is None:
            raise InvalidInput(f"VM {spec.vm_id} is encrypted: this needs its disk key from the controller")
        return key

    async def _make_disk(self, spec: VMSpec, path: Path, size: int, index: int = 0, *, incoming: bool = False) -> None:
        """Disk ``index`` of the VM, empty; the first disk of a VM booted from an image is an overlay on the verified
        image in this host's cache, or a full copy of it (``full_copy``; a migration destination's stays empty: the
        mirror carries the whole disk)."""
        key = self._key_for(spec)
        base: tuple[Path, str] | None = None
        if index == 0 and spec.image is not None and not (incoming and spec.image.full_copy):
            files = await asyncio.to_thread(self.images.verified, spec.image)
            base = (files.disk, spec.image.format)
            if spec.image.full_copy:
                await asyncio.to_thread(
                    copy_image, *base, path, size, key=key, iter_time_ms=LUKS_ITER_TIME_MS, qemu_img=self.qemu_img
                )
                await asyncio.to_thread(path.chmod, 0o600)
                return
        if key is None:
            chain = ["-F", base[1], "-b", str(base[0])] if base is not None else []
            await self._qemu_img("create", "-q", "-f", "qcow2", *chain, str(path), size)
            return
        await asyncio.to_thread(
            create_encrypted_qcow2,
            path,
            size,
            key,
            iter_time_ms=LUKS_ITER_TIME_MS,
            qemu_img=self.qemu_img,
            backing=base,
        )
        await asyncio.to_thread(path.chmod, 0o600)

    async def _boot_of(self, spec: VMSpec) -> ImageBoot | None:
        """How ``spec`` boots: from its image, verified again now (ImageUnverified: it must not boot), or (None)
        from this host's boot image."""
        if spec.image is None:
            return None
        files = await asyncio.to_thread(self.images.verified, spec.image)
        return image_boot(spec, files.kernel, files.initrd)

    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def create(self, spec: VMSpec) -> VMRuntime:
        """Store the spec, create the disks and boot the VM; on failure nothing of it is left behind."""
        _validate(spec)
        async with self._lock(spec.vm_id):
            vm_dir = self._vm_dir(spec.vm_id)
            vm_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                # Owner-only: the disks hold tenant data.
                vm_dir.mkdir(mode=0o700)
            except FileExistsError:
                raise Conflict(f"VM {spec.vm_id} already exists on this host") from None
            try:
                self._save_spec(spec)
                for index, disk in enumerate(spec.disks):
                    await self._make_disk(spec, vm_dir / f"disk{index}.qcow2", disk.size_bytes, index)
                runtime = await self._launch(spec)
            except BaseException:
                shutil.rmtree(vm_dir, ignore_errors=True)
                raise
            self._log.info("vm created", vm=spec.vm_id, pid=runtime.pid, generation=spec.generation)
            return runtime

    async def create_incoming(
        self, spec: VMSpec, shared_disks: Sequence[Path] | None = None, *, owner: str | None = None
    ) -> VMRuntime:
        """Store the spec and start QEMU paused, waiting for an incoming migration (``-incoming defer -S``).

        Without ``shared_disks`` the VM gets fresh, empty qcow2 images of the spec's sizes (the mirror fills them over
        NBD); with them it opens those existing images in place (shared storage). On failure nothing is left behind.
        """
        _validate(spec)
        if shared_disks is not None and (
            len(shared_disks) != len(spec.disks) or not all(Path(p).is_absolute() for p in shared_disks)
        ):
            raise InvalidInput(f"VM {spec.vm_id} needs one absolute shared image path per disk, got {shared_disks}")
        async with self._lock(spec.vm_id):
            vm_dir = self._vm_dir(spec.vm_id)
            vm_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                vm_dir.mkdir(mode=0o700)
            except FileExistsError:
                raise Conflict(f"VM {spec.vm_id} already exists on this host") from None
            try:
                self._save_spec(spec)
                # the mark names the migration that owns this destination from its first moment
                (vm_dir / INCOMING_MARK).touch(mode=0o600)
                if owner is not None:
                    (vm_dir / INCOMING_MARK).write_text(owner)
                if shared_disks is not None:
                    (vm_dir / SHARED_DISKS).write_text(json.dumps([str(p) for p in shared_disks]))
                else:
                    for index, disk in enumerate(spec.disks):
                        path = vm_dir / f"disk{index}.qcow2"
                        await self._make_disk(spec, path, disk.size_bytes, index, incoming=True)
                runtime = await self._launch(spec, incoming=True)
            except BaseException:
                shutil.rmtree(vm_dir, ignore_errors=True)
                raise
            self._log.info("incoming vm prepared", vm=spec.vm_id, pid=runtime.pid, shared=shared_disks is not None)
            return runtime

    def is_incoming(self, vm_id: str) -> bool:
        """Whether the VM was started by :meth:`create_incoming` and has not been activated since."""
        return (self._vm_dir(vm_id) / INCOMING_MARK).exists()

    def is_alive(self, vm_id: str) -> bool:
        """Whether the VM's own QEMU process (the one its pidfile names) is alive."""
        return self.pid_of(vm_id) is not None

    def pid_of(self, vm_id: str) -> int | None:
        """The pid of the VM's own QEMU process (the one its pidfile names), None if it is not alive."""
        proc = procscan.qemu_at(self._vm_dir(vm_id) / "qemu.pid")
        return proc.pid if proc is not None else None

    def incoming_owner(self, vm_id: str) -> str | None:
        """The migration that claimed this unactivated destination (None: unclaimed or not a destination)."""
        try:
            return (self._vm_dir(vm_id) / INCOMING_MARK).read_text().strip() or None
        except FileNotFoundError:
            return None

    def mark_activated(self, vm_id: str) -> None:
        """Record that the incoming VM now is this host's copy of record: it may no longer be discarded as a residue."""
        (self._vm_dir(vm_id) / INCOMING_MARK).unlink(missing_ok=True)

    def _refuse_incoming(self, vm_id: str) -> None:
        # An unactivated destination may hold a partial copy: it runs only through activation (after the commit).
        if self.is_incoming(vm_id):
            raise Conflict(f"VM {vm_id} is a migration destination that has not been activated; it cannot run yet")

    async def start(self, vm_id: str) -> VMRuntime:
        """Boot an existing, stopped VM from its disks; Conflict if it already runs."""
        async with self._lock(vm_id):
            spec = self.load_spec(vm_id)
            self._refuse_incoming(vm_id)
            if procscan.qemu_at(self._vm_dir(vm_id) / "qemu.pid") is not None:
                raise Conflict(f"VM {vm_id} is already running")
            runtime = await self._launch(spec)
            self._log.info("vm started", vm=vm_id, pid=runtime.pid)
            return runtime

    async def stop(self, vm_id: str) -> None:
        """Quit QEMU (the guest's acknowledged writes are already on disk); SIGKILL it if it does not exit in time."""
        async with self._lock(vm_id):
            self.load_spec(vm_id)
            await self._terminate(vm_id)

    async def kill(self, vm_id: str) -> None:
        """SIGKILL the VM's QEMU at once, without QMP: for a destination that must not live on. Its files stay."""
        async with self._lock(vm_id):
            self.load_spec(vm_id)
            session = self._sessions.get(vm_id)
            if session is not None:
                session.expect_exit = True
            proc = procscan.qemu_at(self._vm_dir(vm_id) / "qemu.pid")
            if proc is not None:
                procscan.kill(proc.pid)
                if not await procscan.wait_exit(proc.pid, self.KILL_TIMEOUT):
                    raise HypervisorError(f"QEMU pid {proc.pid} of VM {vm_id} survived SIGKILL")
            if session is not None and session.watch is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(session.watch), self.KILL_TIMEOUT)
            await self._detach(vm_id)
            self._log.info("vm killed", vm=vm_id, pid=proc.pid if proc else None)

    async def pause(self, vm_id: str) -> VMRuntime:
        async with self._lock(vm_id):
            await self._execute(vm_id, "stop")
            return await self._runtime(vm_id)

    async def resume(self, vm_id: str) -> VMRuntime:
        async with self._lock(vm_id):
            self._refuse_incoming(vm_id)
            await self._execute(vm_id, "cont")
            return await self._runtime(vm_id)

    async def destroy(self, vm_id: str) -> None:
        """Stop the VM if it runs and scrub its directory (spec, disks, console log): nothing is merely unlinked."""
        from ferryman.agent.storage.scrub import ScrubMode, scrub_tree

        async with self._lock(vm_id):
            vm_dir = self._vm_dir(vm_id)
            if not vm_dir.is_dir():
                raise NotFound(f"VM {vm_id} does not exist on this host")
            await self._terminate(vm_id)
            with contextlib.suppress(NotFound, HypervisorError):  # a corrupt spec: reconciliation reports the rules
                await self.nics.release(self.load_spec(vm_id))
            # crypto-erase applies only to images named and made as such (scrub_tree checks); the rest is zeroed
            mode = ScrubMode.CRYPTO
            receipts = await asyncio.to_thread(scrub_tree, [vm_dir], mode)
            self._log.info("vm destroyed", vm=vm_id, scrubbed_bytes=sum(r.bytes for r in receipts))

    async def update_nics(self, vm_id: str, nics: Sequence[NicSpec]) -> builtins.list[NicState]:
        """Replace the VM's NIC specs (the same NICs, by id and MAC, with new rules) and install the rules now if its
        QEMU runs (else at its next launch)."""
        async with self._lock(vm_id):
            spec = self.load_spec(vm_id)
            if [(n.id, n.mac) for n in nics] != [(n.id, n.mac) for n in spec.nics]:
                raise Conflict(
                    f"VM {vm_id} has NICs {[n.id for n in spec.nics]}; a rule change cannot add or swap NICs"
                )
            self._save_spec(dataclasses.replace(spec, nics=tuple(nics)))
            if not self.is_alive(vm_id):
                return []
            return await self.nics.install(nics)

    async def nic_states(self, vm_id: str) -> builtins.list[NicState]:
        return await self.nics.states(self.load_spec(vm_id))

    async def network_report(self) -> NetworkReport | None:
        return await self.nics.report()

    async def sync_segments(self, peers: Sequence[str]) -> builtins.list[str]:
        return await self.nics.sync_segments(peers)

    async def execute(self, vm_id: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one QMP command on an attached VM and return its result (for migration and storage code)."""
        return await self._execute(vm_id, command, arguments)

    async def send_fd(self, vm_id: str, fdname: str, fd: int) -> None:
        """Give the VM's QEMU a copy of ``fd`` as ``fdname`` (SCM_RIGHTS, then ``getfd``); the caller closes its own."""
        if (session := self._sessions.get(vm_id)) is not None:  # without one, _execute says why
            try:
                session.client.send_fd_scm(fd)
            except (QMPError, OSError) as err:
                raise HypervisorError(f"cannot pass a descriptor to VM {vm_id}: {err}") from err
        await self._execute(vm_id, "getfd", {"fdname": fdname})

    # -- inventory ------------------------------------------------------------------------------------------------

    async def list(self) -> list[VMRuntime]:
        """Every live QEMU process of this host: its own VMs, and any other process that references this state dir
        (a copy started behind our back), except VMs another host runs on an image kept here (shared storage)."""
        found = await asyncio.to_thread(procscan.scan_qemu)
        return [
            await self._describe(proc)
            for proc in found
            if proc.references(self.state_dir) and not self._vm_of_another_host(proc)
        ]

    def _vm_of_another_host(self, proc: QemuProcess) -> bool:
        """A VM that another host's driver runs (its pidfile is ``<other state dir>/vms/<its uuid>/qemu.pid``)."""
        pidfile, vm_id = proc.option("-pidfile"), proc.uuid or ""
        if pidfile is None or not _is_uuid(vm_id):
            return False
        path = Path(pidfile)
        mine = path.is_relative_to(self.state_dir)
        return not mine and path.name == "qemu.pid" and path.parent.name == vm_id and path.parent.parent.name == "vms"

    async def reattach(self) -> builtins.list[VMRuntime]:
        """Reconnect QMP to every VM of this state dir whose process still runs; never starts or kills one."""
        attached = []
        for spec_file in sorted((self.state_dir / "vms").glob("*/spec.json")):
            vm_id = spec_file.parent.name
            proc = procscan.qemu_at(spec_file.parent / "qemu.pid")
            if not _is_uuid(vm_id) or proc is None or proc.uuid != vm_id:
                continue
            async with self._lock(vm_id):
                if vm_id not in self._sessions:
                    try:
                        await self._attach(vm_id, proc.pid)
                    except HypervisorError as err:
                        self._log.error("reattach failed", vm=vm_id, pid=proc.pid, error=str(err))
                        continue
                    await self.nics.resume(self.load_spec(vm_id))
                attached.append(await self._runtime(vm_id))
        self._log.info("reattached", count=len(attached))
        return attached

    def events(self) -> AsyncIterator[HypervisorEvent]:
        """A new subscription to every VM's events, starting now; it ends when the driver closes."""
        return _EventStream(self._subscribers, self.EVENT_QUEUE)

    async def close(self) -> None:
        """Disconnect from every QMP socket and end event subscriptions; QEMU processes keep running."""
        for vm_id in list(self._sessions):
            await self._detach(vm_id)
        for stream in list(self._subscribers):
            stream.put(None)
            await stream.aclose()

    async def _describe(self, proc: QemuProcess) -> VMRuntime:
        vm_id = proc.uuid or ""
        spec: VMSpec | None = None
        managed = False
        if _is_uuid(vm_id) and (self._vm_dir(vm_id) / "spec.json").exists():
            spec = self.load_spec(vm_id)
            pidfile = self._vm_dir(vm_id) / "qemu.pid"
            managed = proc.option("-pidfile") == str(pidfile) and procscan.read_pidfile(pidfile) == proc.pid
        if not managed or spec is None:
            return VMRuntime(vm_id=vm_id, name=proc.name or "", run_state=RunState.OTHER, pid=proc.pid, managed=False)
        run_state = RunState.OTHER
        session = self._sessions.get(vm_id)
        if session is not None and session.pid == proc.pid:
            with contextlib.suppress(HypervisorError):
                run_state = await self._run_state(vm_id)
        return VMRuntime(vm_id, spec.name, run_state, proc.pid, generation=spec.generation)

    # -- processes ------------------------------------------------------------------------------------------------

    def _argv(
        self,
        spec: VMSpec,
        dir_fd: int,
        incoming: bool,
        key_fd: int | None = None,
        boot: ImageBoot | None = None,
        tap_fds: Sequence[int] = (),
    ) -> builtins.list[str]:
        vm_dir = self._vm_dir(spec.vm_id)
        if boot is not None and spec.image is not None and spec.image.guest_agent:
            boot = dataclasses.replace(boot, agent_socket=_via_fd(dir_fd, GUEST_AGENT_SOCKET))
        return qemu_argv(
            self.boot,
            spec,
            qemu_binary=self.qemu_binary,
            accel=self.accel,
            console=vm_dir / "console.log",
            disks=self._disks(spec),
            qmp_socket=_via_fd(dir_fd, "qmp.sock"),
            pidfile=vm_dir / "qemu.pid",
            incoming=incoming,
            key=(KEY_OBJECT_ID, key_fd) if key_fd is not None else None,
            boot=boot,
            tap_fds=tap_fds,
        )

    async def _launch(self, spec: VMSpec, incoming: bool = False) -> VMRuntime:
        """Start QEMU and attach to it; if attaching fails the fresh process is killed, never left unmanaged."""
        pid = await self._spawn(spec, incoming, await self._boot_of(spec))
        try:
            # the monitor's tasks outlive this request: they start in an empty context, without its disk keys
            await asyncio.create_task(self._attach(spec.vm_id, pid), context=contextvars.Context())
            return await self._runtime(spec.vm_id)
        except BaseException:
            procscan.kill(pid)
            await procscan.wait_exit(pid, self.KILL_TIMEOUT)
            await self._detach(spec.vm_id)
            raise

    async def _spawn(self, spec: VMSpec, incoming: bool, boot: ImageBoot | None) -> int:
        """Run QEMU with -daemonize and return the daemon's pid (it is not our child: it outlives the agent)."""
        vm_dir = self._vm_dir(spec.vm_id)
        for stale in ("qmp.sock", "qemu.pid"):
            (vm_dir / stale).unlink(missing_ok=True)
        key = self._key_for(spec)
        # the NICs' taps and verified rules exist before QEMU does: no frame of the VM ever passes unfiltered
        tap_fds = await self.nics.plumb(spec)
        dir_fd = os.open(vm_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        key_fd = key_pipe(key) if key is not None else None
        try:
            argv = self._argv(spec, dir_fd, incoming, key_fd, boot, tap_fds)
            self._log.debug("launching qemu", vm=spec.vm_id, argv=argv)
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                preexec_fn=disable_core_dumps,
                start_new_session=True,
                pass_fds=(dir_fd, *tap_fds) if key_fd is None else (dir_fd, key_fd, *tap_fds),
            )
        except OSError as err:
            raise HypervisorError(f"cannot run {self.qemu_binary}: {err}") from err
        finally:
            os.close(dir_fd)
            if key_fd is not None:
                os.close(key_fd)
            for fd in tap_fds:  # QEMU holds its own copies: a tap lives exactly as long as its QEMU
                os.close(fd)
        try:
            # The launching process exits once QEMU is set up, reporting setup errors on stderr.
            _, stderr = await asyncio.wait_for(proc.communicate(), self.LAUNCH_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            if (daemon := procscan.qemu_at(vm_dir / "qemu.pid")) is not None:
                procscan.kill(daemon.pid)
            raise HypervisorError(f"QEMU for VM {spec.vm_id} did not start within {self.LAUNCH_TIMEOUT}s") from None
        if proc.returncode != 0:
            message = stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
            raise HypervisorError(f"QEMU failed to start VM {spec.vm_id}: {message}")
        daemon = procscan.qemu_at(vm_dir / "qemu.pid")
        if daemon is None:
            raise HypervisorError(f"QEMU for VM {spec.vm_id} exited right after starting; see {vm_dir}/console.log")
        return daemon.pid

    async def _terminate(self, vm_id: str) -> None:
        """Make sure no process of this VM runs: QMP quit, then SIGKILL; waits for the watcher's GONE event."""
        proc = procscan.qemu_at(self._vm_dir(vm_id) / "qemu.pid")
        if proc is None:
            await self._detach(vm_id)
            return
        session = self._sessions.get(vm_id)
        if session is None or session.pid != proc.pid:
            await self._detach(vm_id)
            with contextlib.suppress(HypervisorError):
                await self._attach(vm_id, proc.pid)
            session = self._sessions.get(vm_id)
        if session is not None:
            session.expect_exit = True
            try:
                await self._execute(vm_id, "quit")
            except HypervisorError as err:
                self._log.warning("qmp quit failed; waiting for exit", vm=vm_id, pid=proc.pid, error=str(err))
        if not await procscan.wait_exit(proc.pid, self.STOP_TIMEOUT if session else 0.0):
            self._log.warning("qemu did not quit; sending SIGKILL", vm=vm_id, pid=proc.pid)
            procscan.kill(proc.pid)
            if not await procscan.wait_exit(proc.pid, self.KILL_TIMEOUT):
                raise HypervisorError(f"QEMU pid {proc.pid} of VM {vm_id} survived SIGKILL")
        if session is not None and session.watch is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(session.watch), self.KILL_TIMEOUT)
        await self._detach(vm_id)
        self._log.info("vm stopped", vm=vm_id, pid=proc.pid)

    # -- QMP ------------------------------------------------------------------------------------------------------

    async def _attach(self, vm_id: str, pid: int) -> None:
        client = QMPClient(vm_id)
        listener = EventListener()
        client.register_listener(listener)
        try:
            dir_fd = os.open(self._vm_dir(vm_id), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                await asyncio.wait_for(client.connect(_via_fd(dir_fd, "qmp.sock")), self.CONNECT_TIMEOUT)
            finally:
                os.close(dir_fd)
        except (QMPError, OSError, TimeoutError) as err:
            with contextlib.suppress(QMPError, OSError, EOFError):
                await client.disconnect()
            raise HypervisorError(f"cannot connect to QMP of VM {vm_id} (pid {pid}): {err}") from err
        session = _Session(vm_id=vm_id, pid=pid, client=client, listener=listener)
        session.pump = asyncio.create_task(self._pump(session), name=f"qmp-events-{vm_id}")
        session.watch = asyncio.create_task(self._watch(session), name=f"qmp-watch-{vm_id}")
        self._sessions[vm_id] = session
        self._log.debug("qmp attached", vm=vm_id, pid=pid)

    async def _detach(self, vm_id: str) -> None:
        session = self._sessions.pop(vm_id, None)
        if session is None:
            return
        for task in (session.watch, session.pump):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(QMPError, OSError, EOFError):
            await session.client.disconnect()

    async def _pump(self, session: _Session) -> None:
        async for message in session.listener:
            self._publish_message(session.vm_id, message)

    def _publish_message(self, vm_id: str, message: Any) -> None:
        stamp = message.get("timestamp", {})
        when = stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6
        self._publish(HypervisorEvent(vm_id, str(message["event"]), dict(message.get("data", {})), when))

    def _publish(self, event: HypervisorEvent) -> None:
        for stream in self._subscribers:
            if not stream.put(event):
                self._log.warning("event queue full; dropped the oldest event", vm=event.vm_id)

    async def _watch(self, session: _Session) -> None:
        """Wait for the QMP connection to drop, then report GONE (or QMP_LOST if the process still runs)."""
        client = session.client
        while client.runstate in (Runstate.CONNECTING, Runstate.RUNNING):
            await client.runstate_changed()
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()
        if session.pump is not None:
            session.pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await session.pump
        for message in session.listener.clear():
            self._publish_message(session.vm_id, message)
        gone = await procscan.wait_exit(session.pid, self.STOP_TIMEOUT)
        data = {"pid": session.pid, "expected": session.expect_exit}
        now = self._clock.now().timestamp()
        self._publish(HypervisorEvent(session.vm_id, GONE if gone else QMP_LOST, data, now))
        if not session.expect_exit:
            self._log.warning("qemu gone" if gone else "qmp connection lost", vm=session.vm_id, pid=session.pid)
        if self._sessions.get(session.vm_id) is session:
            del self._sessions[session.vm_id]

    async def _execute(self, vm_id: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        session = self._sessions.get(vm_id)
        if session is None:
            self.load_spec(vm_id)
            raise Conflict(f"VM {vm_id} is not running (or not attached) on this host")
        try:
            return await asyncio.wait_for(session.client.execute(command, arguments), self.COMMAND_TIMEOUT)
        except ExecuteError as err:
            raise HypervisorError(f"QEMU refused {command} for VM {vm_id}: {err}") from err
        except (QMPError, OSError, EOFError, TimeoutError) as err:
            raise HypervisorError(f"QMP {command} to VM {vm_id} failed: {err or type(err).__name__}") from err

    async def _run_state(self, vm_id: str) -> RunState:
        status = await self._execute(vm_id, "query-status")
        return _RUN_STATES.get(str(status.get("status")), RunState.OTHER)

    async def _runtime(self, vm_id: str) -> VMRuntime:
        spec = self.load_spec(vm_id)
        session = self._sessions.get(vm_id)
        pid = session.pid if session else None
        return VMRuntime(vm_id, spec.name, await self._run_state(vm_id), pid, generation=spec.generation)

    async def _qemu_img(self, *args: str | int) -> None:
        argv = [self.qemu_img, *map(str, args)]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            _, stderr = await asyncio.wait_for(proc.communicate(), self.LAUNCH_TIMEOUT)
        except OSError as err:
            raise HypervisorError(f"cannot run {self.qemu_img}: {err}") from err
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise HypervisorError(f"qemu-img {args[0]} timed out after {self.LAUNCH_TIMEOUT}s") from None
        if proc.returncode != 0:
            raise HypervisorError(f"qemu-img {args[0]} failed: {stderr.decode(errors='replace').strip()}")


def _is_uuid(value: str) -> bool:
    """Whether ``value`` is a UUID in canonical form, so it is safe as a directory name and has no aliases."""
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _validate(spec: VMSpec) -> None:
    if not _is_uuid(spec.vm_id):
        raise InvalidInput(f"bad VM id {spec.vm_id!r}: QEMU needs a UUID")
    check_name("VM", spec.name)
    if spec.memory_mb < 16 or spec.vcpus < 1:
        raise InvalidInput(f"bad VM size: memory_mb={spec.memory_mb} vcpus={spec.vcpus}")
    if any(disk.size_bytes < 512 for disk in spec.disks):
        raise InvalidInput("every disk needs at least 512 bytes")
    check_resident(spec.resident_mib, spec.memory_mb)
    boot_parameters(spec)
