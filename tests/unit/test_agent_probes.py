"""Guest probes and the validation after a switch-over: composition, marks and freshness, the vCPU and run-state
probes, and the lab's disk-records probe, with fakes instead of QEMU."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from ferryman.agent import probes as probes_mod
from ferryman.agent.migration import MigrationAgent
from ferryman.agent.probes import (
    Guest,
    GuestAgentProbe,
    GuestChecks,
    GuestProbe,
    Mark,
    ProbeResult,
    RunStateProbe,
    VcpuProgressProbe,
    last_seq_of,
    load_probe,
)
from ferryman.agent.settings import AgentSettings
from ferryman.core.errors import FerrymanError, HypervisorError, InvalidInput
from ferryman.core.models import DiskSpec, VMSpec
from ferryman.lab.lab import RECORDS_PROBE
from ferryman.lab.records import SECTOR, DiskRecordsProbe
from ferryman.pki.ca import CertificateAuthority
from ferryman.pki.tickets import issue_ticket
from ferryman.testing.clock import FakeClock
from ferryman.wire import migration as w

VM_ID = str(uuid.uuid4())
SPEC = VMSpec(vm_id=VM_ID, name="web-1", vcpus=1, memory_mb=128, disks=(DiskSpec(1 << 20),), canary="c")


def guest(status: str = "running", pid: int | None = 1, disks: tuple[Path, ...] = (), spec: VMSpec = SPEC) -> Guest:
    async def qmp(command: str) -> Any:
        if command == "query-status":
            return {"status": status}
        raise HypervisorError(f"no {command} here")

    return Guest(spec=spec, disks=disks, key=None, pid=pid, qmp=qmp)


class FakeProbe:
    """Passes or fails as told, after ``delay`` seconds; remembers what it was asked."""

    def __init__(self, name: str, ok: bool = True, *, delay: float = 0.0, seq: int | None = None, log=None) -> None:
        self.name, self.ok, self.delay, self.seq = name, ok, delay, seq
        self.since: list[Any] = []
        self.log = log if log is not None else []
        self.cancelled = False

    async def mark(self, guest: Guest) -> Mark | None:
        return Mark({"probe": self.name}, fresh_s=1.0, last_seq=self.seq)

    async def check(self, guest: Guest, since: Any, wait_s: float) -> ProbeResult:
        self.since.append(since)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        self.log.append(self.name)
        return ProbeResult(self.ok, f"{self.name} {'ok' if self.ok else 'stuck'}", last_seq=self.seq)


class FakeRunState(FakeProbe):
    async def mark(self, guest: Guest) -> Mark | None:
        return None

    async def check(self, guest: Guest, since: Any, wait_s: float) -> ProbeResult:
        self.log.append(self.name)
        return ProbeResult(self.ok, f"running={self.ok}")


# -- composition -------------------------------------------------------------------------------------------------


async def test_all_probes_pass_and_the_detail_names_the_run_state_and_the_most_specific_evidence() -> None:
    """Every probe passes: ok and running; the detail is the run state and the last progress probe's finding, and
    last_seq comes from the probe that counts the guest's progress."""
    checks = GuestChecks([FakeProbe("vcpus"), FakeProbe("records", seq=7)], FakeRunState("runstate"))
    verdict = await checks.check(guest(), {}, wait_s=1)
    assert verdict.report().model_dump() == {
        "ok": True,
        "running": True,
        "detail": "running=True, records ok",
        "last_seq": 7,
    }
    assert set(verdict.results) == {"runstate", "vcpus", "records"}


async def test_a_failing_progress_probe_fails_the_validation_and_is_named() -> None:
    """One progress probe fails: not ok, still running; the detail names it beside the evidence that passed."""
    checks = GuestChecks([FakeProbe("vcpus", ok=False), FakeProbe("records", seq=3)], FakeRunState("runstate"))
    verdict = await checks.check(guest(), {}, wait_s=1)
    assert (verdict.ok, verdict.running) == (False, True)
    assert verdict.detail == "running=True, vcpus stuck, records ok"


async def test_a_guest_that_is_not_running_fails_however_it_progressed() -> None:
    """The run state fails: not ok and not running (the controller then boots the committed copy again)."""
    checks = GuestChecks([FakeProbe("vcpus")], FakeRunState("runstate", ok=False))
    verdict = await checks.check(guest(), {}, wait_s=1)
    assert verdict.report().model_dump() == {
        "ok": False,
        "running": False,
        "detail": "running=False, vcpus ok",
        "last_seq": None,
    }


async def test_progress_probes_run_together_and_the_run_state_is_read_last() -> None:
    """Progress probes wait concurrently (the slow one does not wait for the fast one); the run state is read after
    both, so a QEMU that died while they waited reads as not running."""
    order: list[str] = []
    slow, fast = FakeProbe("slow", delay=0.3, log=order), FakeProbe("fast", delay=0.2, log=order)
    checks = GuestChecks([slow, fast], FakeRunState("runstate", log=order))
    started = asyncio.get_running_loop().time()
    await checks.check(guest(), {}, wait_s=1)
    assert asyncio.get_running_loop().time() - started < 0.45
    assert order == ["fast", "slow", "runstate"]


async def test_each_probe_measures_from_its_own_mark() -> None:
    """Marks are taken from every probe that has one and handed back to it by name; probes without a mark get None."""
    vcpus, records = FakeProbe("vcpus"), FakeProbe("records", seq=4)
    checks = GuestChecks([vcpus, records], FakeRunState("runstate"))
    marks = await checks.mark(guest())
    assert set(marks) == {"vcpus", "records"} and last_seq_of(marks) == 4
    await checks.check(guest(), {"records": marks["records"].value}, wait_s=1)
    assert (vcpus.since, records.since) == ([None], [{"probe": "records"}])


async def test_a_probe_that_cannot_mark_is_left_out_of_the_marks() -> None:
    """A mark that cannot be read is skipped (validation then reads its own starting point); the others stay."""

    class Unreadable(FakeProbe):
        async def mark(self, guest: Guest) -> Mark | None:
            raise HypervisorError("disk unreadable")

    checks = GuestChecks([FakeProbe("vcpus"), Unreadable("records")], FakeRunState("runstate"))
    assert set(await checks.mark(guest())) == {"vcpus"}


async def test_a_probe_that_raises_fails_the_check_and_stops_the_others() -> None:
    """An error in one probe surfaces as itself, and the probes still waiting are cancelled."""

    class Broken(FakeProbe):
        async def check(self, guest: Guest, since: Any, wait_s: float) -> ProbeResult:
            raise HypervisorError("qemu-io failed")

    waiting = FakeProbe("waiting", delay=30)
    checks = GuestChecks([waiting, Broken("broken")], FakeRunState("runstate"))
    with pytest.raises(HypervisorError, match="qemu-io failed"):
        await checks.check(guest(), {}, wait_s=1)
    await asyncio.sleep(0.01)
    assert waiting.cancelled


def test_probe_names_must_be_distinct() -> None:
    """Marks are kept by probe name, so two probes of one name are refused."""
    with pytest.raises(InvalidInput, match="distinct"):
        GuestChecks([FakeProbe("records"), FakeProbe("records")], RunStateProbe())
    names = [p.name for p in GuestChecks.standard([FakeProbe("records")]).probes]
    assert names == ["runstate", "vcpus", "guest-agent", "records"]


def test_probes_are_loaded_by_import_path() -> None:
    """The lab's records probe loads from the path the lab hands its agents; a bad path or object is refused."""
    probe = load_probe(RECORDS_PROBE)
    assert isinstance(probe, DiskRecordsProbe) and isinstance(probe, GuestProbe)
    for ref, message in [
        ("ferryman.lab.records", "module:factory"),
        ("ferryman.no_such_module:Probe", "cannot load"),
        ("ferryman.lab.records:NoSuchProbe", "cannot load"),
        ("builtins:object", "not a guest probe"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            load_probe(ref)


# -- built-in probes ---------------------------------------------------------------------------------------------


async def test_run_state_probe_reads_query_status() -> None:
    """running passes; paused, or a QMP that does not answer, fails with the reason."""
    assert (await RunStateProbe().check(guest("running"), None, 1)) == ProbeResult(True, "running=True")
    assert (await RunStateProbe().check(guest("paused"), None, 1)) == ProbeResult(False, "running=False (paused)")

    async def gone(command: str) -> Any:
        raise HypervisorError("QMP connection lost")

    result = await RunStateProbe().check(Guest(SPEC, (), None, 1, gone), None, 1)
    assert not result.ok and "QMP connection lost" in result.detail


class FakeVcpus:
    """A QEMU process under a fake /proc whose vCPU threads' CPU time the test sets."""

    def __init__(self, root: Path, pid: int = 4242, threads: tuple[int, ...] = (4243, 4244)) -> None:
        self.root, self.pid, self.threads = root, pid, threads
        self.set(0)

    def set(self, ns: int) -> None:
        for tid in self.threads:
            path = self.root / str(self.pid) / "task" / str(tid) / "schedstat"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{ns} 0 0\n")

    def guest(self) -> Guest:
        async def qmp(command: str) -> Any:
            assert command == "query-cpus-fast"
            return [{"cpu-index": i, "thread-id": tid} for i, tid in enumerate(self.threads)]

        return Guest(SPEC, (), None, self.pid, qmp)


@pytest.fixture
def vcpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeVcpus:
    monkeypatch.setattr(probes_mod, "PROC", tmp_path)
    return FakeVcpus(tmp_path)


async def test_vcpu_probe_passes_once_the_vcpu_threads_gain_cpu_time(vcpus: FakeVcpus) -> None:
    """A check passes as soon as the vCPU threads' CPU time rises above its first reading."""
    probe = VcpuProgressProbe()
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, vcpus.set, 1_500_000)
    result = await probe.check(vcpus.guest(), None, wait_s=5)
    assert result.ok and result.detail.startswith("vcpus ran 3.0 ms in ")


async def test_vcpu_probe_fails_when_the_vcpus_do_not_run(vcpus: FakeVcpus) -> None:
    """Threads that gain no CPU time within the wait (a paused guest) fail the check."""
    result = await VcpuProgressProbe().check(vcpus.guest(), None, wait_s=0.2)
    assert not result.ok and result.detail.startswith("vcpus did not run in ")


async def test_vcpu_probe_measures_from_its_mark_of_the_same_qemu_only(vcpus: FakeVcpus) -> None:
    """Time gained since the activation's mark passes at once; a mark of another QEMU process is no starting point."""
    probe = VcpuProgressProbe()
    mark = await probe.mark(vcpus.guest())
    assert mark is not None and mark.fresh_s == probe.MARK_FRESH_S
    vcpus.set(1_000)
    result = await probe.check(vcpus.guest(), mark.value, wait_s=5)
    assert result.ok and result.detail == "vcpus ran 0.0 ms since activation"
    other = {**mark.value, "pid": vcpus.pid + 1}
    assert not (await probe.check(vcpus.guest(), other, wait_s=0.2)).ok


async def test_vcpu_probe_fails_without_raising_when_qemu_is_gone(vcpus: FakeVcpus) -> None:
    """No process, or threads that vanished: the check fails with the reason; a mark cannot be taken."""
    probe = VcpuProgressProbe()
    assert not (await probe.check(Guest(SPEC, (), None, None, vcpus.guest().qmp), None, 1)).ok
    with pytest.raises(FerrymanError):
        await probe.mark(Guest(SPEC, (), None, vcpus.pid + 1, vcpus.guest().qmp))
    result = await probe.check(Guest(SPEC, (), None, vcpus.pid + 1, vcpus.guest().qmp), None, 1)
    assert not result.ok and "unreadable" in result.detail


async def test_vcpu_probe_reads_real_threads_of_a_running_process() -> None:
    """Against this very process (its thread as the "vCPU"): the kernel's per-thread CPU time advances."""
    tid = threading.get_native_id()

    async def qmp(command: str) -> Any:
        return [{"cpu-index": 0, "thread-id": tid}]

    result = await VcpuProgressProbe().check(Guest(SPEC, (), None, os.getpid(), qmp), None, wait_s=5)
    assert result.ok


# -- the lab's records probe -------------------------------------------------------------------------------------


def write_header(disk: Path, last: int) -> None:
    with disk.open("r+b") as fh:
        fh.write(f"FMHDR last={last} vm=v\n".encode().ljust(SECTOR, b"\0"))


async def test_records_probe_passes_on_a_record_written_after_its_mark(tmp_path: Path) -> None:
    """The mark is the newest record (also reported as last_seq, fresh for three intervals); a newer one passes, and
    without a newer one within the wait the check fails."""
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(SECTOR * 8))
    write_header(disk, 5)
    spec = VMSpec(vm_id=VM_ID, name="v", vcpus=1, memory_mb=128, disks=(), canary="c", record_interval_ms=100)
    probe, view = DiskRecordsProbe(), guest(disks=(disk,), spec=spec)
    mark = await probe.mark(view)
    assert (mark.value, mark.last_seq, mark.fresh_s) == (5, 5, pytest.approx(0.3))
    assert await probe.check(view, 5, wait_s=0.1) == ProbeResult(False, "disk records 5 -> 5", last_seq=5)
    asyncio.get_running_loop().call_later(0.1, write_header, disk, 6)
    assert await probe.check(view, 5, wait_s=2) == ProbeResult(True, "disk records 5 -> 6", last_seq=6)
    assert await probe.check(view, 4, wait_s=2) == ProbeResult(True, "disk records 4 -> 6", last_seq=6)


# -- MigrationAgent.validate -------------------------------------------------------------------------------------


class FakeDriver:
    """The driver calls validation makes, over one VM whose run state and vCPU thread the test controls."""

    def __init__(self) -> None:
        self.status = "running"
        self.alive = True

    def use_key(self, vm_id: str, key: bytes | None) -> None:
        pass

    def load_spec(self, vm_id: str) -> VMSpec:
        return SPEC

    def disk_paths(self, vm_id: str) -> list[Path]:
        return [Path("/nonexistent/disk0.qcow2")]

    def key_of(self, vm_id: str) -> bytes | None:
        return None

    def is_alive(self, vm_id: str) -> bool:
        return self.alive

    def pid_of(self, vm_id: str) -> int | None:
        return os.getpid() if self.alive else None

    async def execute(self, vm_id: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if command == "query-status":
            return {"status": self.status}
        if command == "query-cpus-fast":  # the test's own thread stands in for the vCPU: it runs the event loop
            return [{"cpu-index": 0, "thread-id": threading.get_native_id()}]
        raise HypervisorError(command)


class Counter:
    """A guest progress counter, as the lab's records probe would read it, with that probe's freshness."""

    name = "records"

    def __init__(self) -> None:
        self.seq = 5

    async def mark(self, guest: Guest) -> Mark:
        return Mark(self.seq, fresh_s=3.0, last_seq=self.seq)

    async def check(self, guest: Guest, since: Any, wait_s: float) -> ProbeResult:
        before = since if since is not None else self.seq
        return ProbeResult(self.seq > before, f"disk records {before} -> {self.seq}", last_seq=self.seq)


@pytest.fixture
def destination(tmp_path: Path):
    clock = FakeClock()
    ca = CertificateAuthority.load_or_create(tmp_path / "pki", clock)
    settings = AgentSettings(
        name="host-b",
        state_dir=tmp_path,
        listen_host="127.0.0.3",
        listen_port=8444,
        controller_url="https://127.0.0.1:8443",
        controller_ca=tmp_path / "pki" / "ca.pem",
    )
    _, token = issue_ticket(
        ca,
        migration_id="m-1",
        vm_id=VM_ID,
        source="host-a",
        destination="host-b",
        generation=1,
        shared_storage=False,
    )

    def make(*extra: GuestProbe) -> tuple[MigrationAgent, FakeDriver]:
        driver = FakeDriver()
        agent = MigrationAgent(settings, driver, clock, probes=extra)  # type: ignore[arg-type]
        agent.open("m-1", token, "destination")
        return agent, driver

    return make, token, clock


async def test_validation_with_the_records_probe_counts_from_the_activation(destination) -> None:
    """With a records probe: the record read at activation is the bar while fresh, so one written since passes at
    once (today's semantics); once stale, the bar is the newest record when validation starts."""
    make, token, clock = destination
    counter = Counter()
    agent, _ = make(counter)
    assert await agent._note_activation("m-1", VM_ID) == 5
    counter.seq = 6
    report = (await agent.validate("m-1", w.Validate(ticket=token))).model_dump()
    assert report == {"ok": True, "running": True, "detail": "running=True, disk records 5 -> 6", "last_seq": 6}
    w.Validation.model_validate(report)
    clock.advance(10)
    assert set(agent._activation_bar("m-1")) == set()
    stale = (await agent.validate("m-1", w.Validate(ticket=token))).model_dump()
    assert (stale["ok"], stale["running"], stale["last_seq"]) == (False, True, 6)
    assert stale["detail"].startswith("running=True, vcpus ran ") and stale["detail"].endswith(", disk records 6 -> 6")


async def test_validation_without_extra_probes_is_run_state_and_vcpu_progress(destination) -> None:
    """Without the records probe a running guest whose vCPUs advance passes; a paused one fails and reads as not
    running; a VM without QEMU fails at once."""
    make, token, _ = destination
    agent, driver = make()
    assert await agent._note_activation("m-1", VM_ID) is None
    assert set(agent._activation_bar("m-1")) == {"vcpus"}
    report = (await agent.validate("m-1", w.Validate(ticket=token))).model_dump()
    assert report["ok"] and report["running"] and report["last_seq"] is None
    assert report["detail"].startswith("running=True, vcpus ran ")
    w.Validation.model_validate(report)
    driver.status = "paused"
    paused = (await agent.validate("m-1", w.Validate(ticket=token))).model_dump()
    assert (paused["ok"], paused["running"]) == (False, False)
    assert paused["detail"].startswith("running=False (paused)")
    driver.alive = False
    assert (await agent.validate("m-1", w.Validate(ticket=token))).model_dump() == {
        "ok": False,
        "running": False,
        "detail": "no QEMU of the VM runs here",
        "last_seq": None,
    }


async def fake_guest_agent(socket: Path, answers: dict[str, object]) -> asyncio.AbstractServer:
    """A qemu-guest-agent stand-in: a line of stale output first, then JSON answers per command."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"return": "stale"}\n')
        while line := await reader.readline():
            request = json.loads(line)
            if request["execute"] == "guest-sync":
                writer.write(json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n")
            elif request["execute"] in answers:
                writer.write(json.dumps(answers[request["execute"]]).encode() + b"\n")
            await writer.drain()
        writer.close()

    fd = os.open(socket.parent, os.O_PATH | os.O_DIRECTORY)
    try:  # bound through the directory's descriptor: the path is longer than a socket path may be
        return await asyncio.start_unix_server(serve, path=f"/proc/self/fd/{fd}/{socket.name}")
    finally:
        os.close(fd)


async def test_the_guest_agent_probe_pings_the_agent_of_an_image_that_declares_one(tmp_path: Path) -> None:
    """guest-sync discards stale output; guest-ping must answer {}; a VM without a declared agent is not asked."""
    socket = tmp_path / ("deep-" * 20) / "qga.sock"  # deeper than a UNIX socket path may be
    socket.parent.mkdir(parents=True)
    probe = GuestAgentProbe()
    assert await probe.check(dataclasses.replace(guest(), agent_socket=None), None, 1) == ProbeResult(True, "")
    silent = await probe.check(dataclasses.replace(guest(), agent_socket=socket), None, 0.3)
    assert not silent.ok and "guest agent silent" in silent.detail
    server = await fake_guest_agent(socket, {"guest-ping": {"return": {}}})
    try:
        answered = await probe.check(dataclasses.replace(guest(), agent_socket=socket), None, 1)
    finally:
        server.close()
        await server.wait_closed()
    assert answered == ProbeResult(True, "guest agent answered")
    socket.unlink(missing_ok=True)
    server = await fake_guest_agent(socket, {"guest-ping": {"error": {"class": "CommandDisabled"}}})
    try:
        refused = await probe.check(dataclasses.replace(guest(), agent_socket=socket), None, 0.3)
    finally:
        server.close()
        await server.wait_closed()
    assert not refused.ok and "CommandDisabled" in refused.detail


async def test_a_probe_with_nothing_to_say_is_not_in_the_detail() -> None:
    checks = GuestChecks([FakeProbe("records"), GuestAgentProbe()], FakeRunState("runstate"))
    verdict = await checks.check(guest(), {}, wait_s=1)
    assert verdict.ok and verdict.detail == "running=True, records ok"


async def test_a_guest_agent_that_hangs_up_or_babbles_fails_the_probe_without_stalling(tmp_path: Path) -> None:
    """The guest controls its agent's bytes: a closed port or garbage is a failed check within its time, while the
    event loop keeps running (a ticker advances meanwhile)."""
    socket = tmp_path / "qga.sock"
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    for reply in (b"", b"[" * 70000 + b"\n", b"{not json}\n"):

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: bytes = reply) -> None:
            writer.write(reply)
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(serve, path=str(socket))
        running = asyncio.create_task(ticker())
        try:
            before = ticks
            result = await asyncio.wait_for(
                GuestAgentProbe().check(dataclasses.replace(guest(), agent_socket=socket), None, 0.3), 10
            )
        finally:
            running.cancel()
            server.close()
            await server.wait_closed()
            socket.unlink(missing_ok=True)
        assert not result.ok and "guest agent silent" in result.detail, reply[:20]
        assert ticks > before
