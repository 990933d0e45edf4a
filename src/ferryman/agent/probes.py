"""Evidence that a guest runs on this host: the checks behind a migration's validation after the switch-over.

A :class:`GuestProbe` looks at one VM from the host side and says whether, by its own evidence, the guest runs here.
These are always used (:meth:`GuestChecks.standard`): :class:`RunStateProbe` (QEMU's ``query-status`` says
``running``), :class:`VcpuProgressProbe` (the CPU time of QEMU's vCPU threads advances) and, for an image that
declares a guest agent, :class:`GuestAgentProbe` (``qemu-guest-agent`` answers ``guest-ping``). Whoever deploys the
agent may hand it more, which know the guest's workload (the lab hands it the reader of its guest's disk records);
the agent names them by import path only (``--guest-probe module:factory``, :func:`load_probe`) and knows none of
them.

Each probe may take a *mark* right after activation, which the agent keeps with the migration: a check soon after
measures from it and need not wait for new evidence after it starts. A mark counts only while fresh (the probe says
how long), so old evidence never passes for new.

Probes read; they never change a VM, and a check that cannot read what it looks for fails rather than raises when the
guest's QEMU is gone (the controller then boots the committed copy again).

    GuestProbe          the protocol: name, mark(), check()
      RunStateProbe     QMP query-status
      VcpuProgressProbe query-cpus-fast + /proc/<pid>/task/<tid>/schedstat
      GuestAgentProbe   qemu-guest-agent's guest-ping, for an image that declares a guest agent
    GuestChecks         a run-state probe and progress probes, run together: the validation
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import structlog

from ferryman.core.errors import FerrymanError, HypervisorError, InvalidInput
from ferryman.core.models import VMSpec
from ferryman.wire.migration import Validation

log = structlog.get_logger(__name__)

Qmp = Callable[[str], Awaitable[Any]]
PROC = Path("/proc")
GUEST_AGENT_SOCKET = "qga.sock"  # in the VM's directory
_AGENT_MAX_LINES = 64
_AGENT_MAX_LINE = 4096


@dataclass(frozen=True)
class Guest:
    """What a probe may look at: one VM of this host, its disks (with the copy's key for this request, if the VM is
    encrypted), its QEMU process and a way to ask that QEMU a QMP query."""

    spec: VMSpec
    disks: tuple[Path, ...]
    key: bytes | None = field(repr=False)  # never in a repr, so never in a log line
    pid: int | None
    qmp: Qmp
    agent_socket: Path | None = None  # the guest agent's socket, for an image that declares one

    @property
    def vm_id(self) -> str:
        return self.spec.vm_id


@dataclass(frozen=True)
class Mark:
    """A probe's reading right after activation. ``value`` is kept as JSON with the migration and used as the
    starting point of a check at most ``fresh_s`` seconds later. ``last_seq``: the guest's own progress counter at
    that moment, for a probe that reads one (the controller records it)."""

    value: Any
    fresh_s: float
    last_seq: int | None = None


@dataclass(frozen=True)
class ProbeResult:
    """One probe's verdict; ``detail`` is one short phrase for the operator."""

    ok: bool
    detail: str
    last_seq: int | None = None


@runtime_checkable
class GuestProbe(Protocol):
    """One kind of evidence that a guest runs on this host."""

    name: str  # unique among the probes of an agent: marks are kept under it

    async def mark(self, guest: Guest) -> Mark | None:
        """A reading right after activation (None: nothing to keep); may raise FerrymanError if it cannot read."""
        ...

    async def check(self, guest: Guest, since: Any, wait_s: float) -> ProbeResult:
        """Whether the guest runs here by this evidence, measured from ``since`` (a fresh mark's value, else None).
        It may wait up to ``wait_s`` seconds (longer if its evidence cannot come sooner) for the evidence."""
        ...


class HostView(Protocol):
    """What :func:`guest_view` needs of the hypervisor driver."""

    def load_spec(self, vm_id: str) -> VMSpec: ...
    def disk_paths(self, vm_id: str) -> list[Path]: ...
    def key_of(self, vm_id: str) -> bytes | None: ...
    def pid_of(self, vm_id: str) -> int | None: ...
    def vm_dir(self, vm_id: str) -> Path: ...
    async def execute(self, vm_id: str, command: str, arguments: dict[str, Any] | None = None) -> Any: ...


def guest_view(driver: HostView, vm_id: str) -> Guest:
    """The VM as probes see it (InvalidInput for an encrypted VM whose key this request did not bring)."""
    spec = driver.load_spec(vm_id)
    key = driver.key_of(vm_id)

    async def qmp(command: str) -> Any:
        return await driver.execute(vm_id, command)

    agent = spec.image is not None and spec.image.guest_agent
    return Guest(
        spec=spec,
        disks=tuple(driver.disk_paths(vm_id)),
        key=key,
        pid=driver.pid_of(vm_id),
        qmp=qmp,
        agent_socket=driver.vm_dir(vm_id) / GUEST_AGENT_SOCKET if agent else None,
    )


class RunStateProbe:
    """QEMU runs the guest: ``query-status`` says ``running`` (not paused, not waiting for a migration)."""

    name = "runstate"

    async def mark(self, guest: Guest) -> Mark | None:
        return None

    async def check(self, guest: Guest, since: Any, wait_s: float) -> ProbeResult:
        try:
            status = str((await guest.qmp("query-status")).get("status"))
        except FerrymanError as err:
            return ProbeResult(False, f"running=False (QMP: {err})")
        running = status == "running"
        return ProbeResult(running, "running=True" if running else f"running=False ({status})")


class GuestAgentProbe:
    """The guest's own userland answers: ``qemu-guest-agent`` replies to ``guest-ping`` on its virtio-serial port.
    Only for a VM whose image declares a guest agent; for the others it has nothing to say (and says nothing)."""

    name = "guest-agent"
    ATTEMPT_S = 2.0
    RETRY_S = 0.25

    async def mark(self, guest: Guest) -> Mark | None:
        return None

    async def check(self, guest: Guest, since: Any, wait_s: float) -> ProbeResult:
        if guest.agent_socket is None:
            return ProbeResult(True, "")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait_s, self.ATTEMPT_S)
        problem = "no answer"
        while True:
            try:
                await asyncio.wait_for(guest_ping(guest.agent_socket), self.ATTEMPT_S)
                return ProbeResult(True, "guest agent answered")
            except (OSError, TimeoutError, ValueError, HypervisorError) as err:
                problem = str(err) or type(err).__name__
            if loop.time() + self.RETRY_S >= deadline:
                return ProbeResult(False, f"guest agent silent ({problem})")
            await asyncio.sleep(self.RETRY_S)


async def guest_ping(socket: Path) -> None:
    """``guest-sync`` (which discards whatever an earlier client left unread) then ``guest-ping`` on the guest agent's
    socket, reached through its directory's descriptor (a socket path has at most 107 bytes)."""
    fd = os.open(socket.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        reader, writer = await asyncio.open_unix_connection(f"/proc/self/fd/{fd}/{socket.name}")
    finally:
        os.close(fd)
    try:
        token = secrets.randbelow(1 << 31)
        writer.write(json.dumps({"execute": "guest-sync", "arguments": {"id": token}}).encode() + b"\n")
        await writer.drain()
        for _ in range(_AGENT_MAX_LINES):  # what an earlier client left unread, then the sync's answer
            if await _agent_line(reader) == {"return": token}:
                break
        else:
            raise HypervisorError("the guest agent never answered guest-sync")
        writer.write(b'{"execute": "guest-ping"}\n')
        await writer.drain()
        answer = await _agent_line(reader)
        if answer != {"return": {}}:
            raise HypervisorError(f"guest-ping answered {str(answer)[:200]!r}")
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _agent_line(reader: asyncio.StreamReader) -> Any:
    """One JSON line from the guest agent: the guest controls these bytes, so anything but a short, well-formed line
    is a failure (HypervisorError), never a crash or a loop that does not yield."""
    line = await reader.readline()
    if not line:
        raise HypervisorError("the guest agent closed its port")
    if len(line) > _AGENT_MAX_LINE:
        raise HypervisorError("the guest agent sent an overlong line")
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as err:
        raise HypervisorError(f"the guest agent sent malformed JSON: {type(err).__name__}") from None


@dataclass(frozen=True)
class _CpuTime:
    pid: int
    threads: tuple[int, ...]
    ns: int

    def as_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "threads": list(self.threads), "ns": self.ns}

    @classmethod
    def from_json(cls, value: Any) -> _CpuTime | None:
        try:
            return cls(int(value["pid"]), tuple(int(t) for t in value["threads"]), int(value["ns"]))
        except (TypeError, KeyError, ValueError):
            return None


class VcpuProgressProbe:
    """The guest's vCPUs execute: the CPU time of QEMU's vCPU threads advances.

    ``query-cpus-fast`` names each vCPU's host thread without interrupting the vCPUs; the kernel counts each thread's
    time on a CPU in nanoseconds (the first field of ``/proc/<pid>/task/<tid>/schedstat``). This holds under TCG and
    KVM alike, where QEMU 7.2's ``query-stats`` has vCPU statistics only for KVM. A paused guest's vCPU threads sleep
    and gain nothing; a running guest's gain some within a fraction of a second even when it idles (each timer
    interrupt wakes a vCPU). A mark of another QEMU process (the VM was booted again since) is no starting point."""

    name = "vcpus"
    POLL_S = 0.05
    MARK_FRESH_S = 5.0

    async def mark(self, guest: Guest) -> Mark | None:
        return Mark((await self._sample(guest)).as_json(), self.MARK_FRESH_S)

    async def check(self, guest: Guest, since: Any, wait_s: float) -> ProbeResult:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            first = await self._sample(guest)
        except FerrymanError as err:
            return ProbeResult(False, f"vcpus unreadable ({err})")
        marked = _CpuTime.from_json(since) if since is not None else None
        if marked is not None and (marked.pid, marked.threads) != (first.pid, first.threads):
            marked = None
        base = marked or first
        now = first
        try:
            while now.ns <= base.ns and loop.time() < started + wait_s:
                await asyncio.sleep(self.POLL_S)
                now = self._times(first.pid, first.threads)
        except FerrymanError as err:
            return ProbeResult(False, f"vcpus unreadable ({err})")
        if now.ns <= base.ns:
            return ProbeResult(False, f"vcpus did not run in {loop.time() - started:.1f}s")
        since_when = "since activation" if base is marked else f"in {loop.time() - started:.2f}s"
        return ProbeResult(True, f"vcpus ran {(now.ns - base.ns) / 1e6:.1f} ms {since_when}")

    async def _sample(self, guest: Guest) -> _CpuTime:
        if guest.pid is None:
            raise HypervisorError(f"no QEMU process of VM {guest.vm_id}")
        cpus = await guest.qmp("query-cpus-fast")
        try:
            threads = tuple(sorted(int(cpu["thread-id"]) for cpu in cpus))
        except (TypeError, KeyError, ValueError) as err:
            raise HypervisorError(f"QEMU of VM {guest.vm_id} names no vCPU threads: {err!r}") from err
        if not threads:
            raise HypervisorError(f"QEMU of VM {guest.vm_id} reports no vCPU")
        return self._times(guest.pid, threads)

    @staticmethod
    def _times(pid: int, threads: tuple[int, ...]) -> _CpuTime:
        total = 0
        for tid in threads:
            try:
                total += int((PROC / str(pid) / "task" / str(tid) / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError) as err:
                raise HypervisorError(f"cannot read the CPU time of vCPU thread {tid} of pid {pid}: {err}") from err
        return _CpuTime(pid, threads, total)


@dataclass(frozen=True)
class Verdict:
    """The validation: ``ok`` when every probe passed; ``running`` is the run-state probe's verdict."""

    ok: bool
    running: bool
    detail: str
    last_seq: int | None
    results: Mapping[str, ProbeResult]

    def report(self) -> Validation:
        """The validation as the controller reads it."""
        return Validation(ok=self.ok, running=self.running, detail=self.detail, last_seq=self.last_seq)


class GuestChecks:
    """A run-state probe and progress probes, as one validation.

    The progress probes run concurrently (each may wait for its evidence); the run state is read last, so a QEMU that
    dies meanwhile reads as not running. The detail gives the run state, the finding of every progress probe that
    failed, and that of the last one that passed (the most specific evidence, as they are ordered)."""

    def __init__(self, progress: Sequence[GuestProbe], runstate: GuestProbe) -> None:
        self.progress = tuple(progress)
        self.runstate = runstate
        names = [probe.name for probe in self.probes]
        if len(set(names)) != len(names):
            raise InvalidInput(f"guest probes need distinct names, got {names}")

    @classmethod
    def standard(cls, extra: Sequence[GuestProbe] = ()) -> GuestChecks:
        """Run state and vCPU progress, then ``extra`` (which know the guest's workload)."""
        return cls((VcpuProgressProbe(), GuestAgentProbe(), *extra), RunStateProbe())

    @property
    def probes(self) -> tuple[GuestProbe, ...]:
        return (self.runstate, *self.progress)

    async def mark(self, guest: Guest) -> dict[str, Mark]:
        """Every probe's mark that could be taken now."""
        marks = {}
        for probe in self.probes:
            try:
                mark = await probe.mark(guest)
            except FerrymanError as err:
                log.warning("guest probe cannot mark the activation", probe=probe.name, vm=guest.vm_id, error=str(err))
                continue
            if mark is not None:
                marks[probe.name] = mark
        return marks

    async def check(self, guest: Guest, since: Mapping[str, Any], wait_s: float) -> Verdict:
        """Run every probe, each from its mark in ``since`` if there is one."""
        tasks = [asyncio.create_task(p.check(guest, since.get(p.name), wait_s)) for p in self.progress]
        try:
            progress = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one raised: the others stop waiting (a probe that answers "not ok" does not)
                task.cancel()
        state = await self.runstate.check(guest, since.get(self.runstate.name), wait_s)
        passing = [result for result in progress if result.ok]
        telling = [result for result in passing if result.detail]  # a probe with nothing to say is not shown
        shown = [state, *(r for r in progress if not r.ok or (telling and r is telling[-1]))]
        seqs = [r.last_seq for r in (state, *progress) if r.last_seq is not None]
        return Verdict(
            ok=state.ok and len(passing) == len(progress),
            running=state.ok,
            detail=", ".join(r.detail for r in shown),
            last_seq=seqs[-1] if seqs else None,
            results={p.name: r for p, r in zip(self.probes, (state, *progress), strict=True)},
        )


def last_seq_of(marks: Mapping[str, Mark]) -> int | None:
    """The guest's progress counter among ``marks``, if a probe read one."""
    seqs = [mark.last_seq for mark in marks.values() if mark.last_seq is not None]
    return seqs[-1] if seqs else None


def load_probe(ref: str) -> GuestProbe:
    """The probe that ``module:factory`` makes (the factory is called without arguments); InvalidInput if it cannot
    be loaded or is not a :class:`GuestProbe`."""
    module_name, _, attribute = ref.partition(":")
    if not module_name or not attribute:
        raise InvalidInput(f"bad guest probe {ref!r}: name it as module:factory")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise InvalidInput(f"cannot load guest probe {ref!r}: {err}") from err
    probe = factory()
    if not isinstance(probe, GuestProbe) or not isinstance(probe.name, str):
        raise InvalidInput(f"guest probe {ref!r} makes {probe!r}, which is not a guest probe")
    return probe
