"""The lab guest and the QEMU driver, against real QEMU (TCG, 1 vCPU, 128 MiB, one 64 MiB disk)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferryman.agent.hypervisor import accel as accel_mod
from ferryman.agent.hypervisor import procscan
from ferryman.agent.hypervisor.backup import live_snapshot
from ferryman.agent.hypervisor.protocol import HypervisorEvent
from ferryman.agent.hypervisor.qmp import GONE, QemuDriver
from ferryman.agent.probes import GuestChecks, guest_view
from ferryman.agent.storage.images import is_encrypted_image, luks_passphrase, run_qemu_tool
from ferryman.core.errors import Conflict, HypervisorError, InvalidInput, NotFound
from ferryman.core.models import DiskSpec, RunState, VMSpec
from ferryman.lab import guest as guest_mod
from ferryman.lab.guest import GuestImage, ensure_guest
from ferryman.lab.records import SECTOR, DiskRecordsProbe, Record, missing_seqs, read_acks, read_last_seq, read_records

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 60.0
DISK_BYTES = 64 * 1024 * 1024


# -- helpers -------------------------------------------------------------------------------------------------------


def make_spec(name: str = "vm", **overrides: object) -> VMSpec:
    """A small test VM: 1 vCPU, 128 MiB, one 64 MiB disk, records every 250 ms."""
    values: dict[str, object] = {
        "vm_id": str(uuid.uuid4()),
        "name": name,
        "vcpus": 1,
        "memory_mb": 128,
        "disks": (DiskSpec(DISK_BYTES),),
        "canary": f"canary-{uuid.uuid4().hex[:12]}",
        "record_interval_ms": 250,
    }
    values.update(overrides)
    return VMSpec(**values)  # type: ignore[arg-type]


async def wait_ready(driver: QemuDriver, vm_id: str, boots: int = 1) -> None:
    """Wait until the console shows the READY line of the ``boots``-th boot."""
    console = driver.console_log(vm_id)
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        if console.exists() and console.read_bytes().count(b"FERRYMAN-GUEST-READY") >= boots:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"guest {vm_id} did not print READY #{boots} in {BOOT_TIMEOUT}s: {console.read_text()[-2000:]}")


async def records(driver: QemuDriver, vm_id: str) -> list[Record]:
    return await asyncio.to_thread(read_records, driver.disk_paths(vm_id)[0])


async def last_seq(driver: QemuDriver, vm_id: str) -> int:
    return max((r.seq for r in await records(driver, vm_id)), default=0)


async def wait_seq_above(driver: QemuDriver, vm_id: str, seq: int, within: float = 30.0) -> list[Record]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = await records(driver, vm_id)
        if found and found[-1].seq > seq:
            return found
        await asyncio.sleep(0.25)
    pytest.fail(f"records of {vm_id} did not pass seq {seq} within {within}s")


async def poll_records(disk: Path, key: bytes | None = None, within: float = 30.0) -> list[Record]:
    """The disk's records once there are some (read with ``key`` for an encrypted image)."""
    deadline = time.monotonic() + within
    while True:
        found = await asyncio.to_thread(read_records, disk, key=key)
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.25)


def files_holding(paths: list[Path], *needles: bytes) -> list[Path]:
    """The regular files among ``paths`` that contain any of ``needles``."""
    return [p for p in paths if p.is_file() and any(n in p.read_bytes() for n in needles)]


async def next_event(stream: AsyncIterator[HypervisorEvent], name: str, vm_id: str) -> HypervisorEvent:
    async def find() -> HypervisorEvent:
        async for event in stream:
            if event.event == name and event.vm_id == vm_id:
                return event
        raise AssertionError("event stream ended")

    return await asyncio.wait_for(find(), 30)


async def boot(driver: QemuDriver, spec: VMSpec) -> int:
    """Create the VM, wait for it to boot and write a record; return its pid."""
    runtime = await driver.create(spec)
    assert runtime.pid is not None
    await wait_ready(driver, spec.vm_id)
    await wait_seq_above(driver, spec.vm_id, 0)
    return runtime.pid


# -- no QEMU needed ------------------------------------------------------------------------------------------------


def test_records_and_gaps_are_read_from_a_raw_disk(tmp_path: Path) -> None:
    """read_records stops at the first non-record sector and missing_seqs names acked or skipped seqs not on disk."""
    disk = tmp_path / "disk.raw"
    sectors = [b"FMHDR last=3 vm=v\n"] + [f"FMREC seq={n} vm=v canary=c up={n}.5\n".encode() for n in (1, 2, 3)]
    disk.write_bytes(b"".join(s.ljust(SECTOR, b"\0") for s in sectors) + bytes(SECTOR * 4))
    found = read_records(disk)
    assert [r.seq for r in found] == [1, 2, 3]
    assert found[0] == Record(seq=1, vm="v", canary="c", uptime=1.5)
    console = tmp_path / "console.log"
    console.write_text("boot noise\nFMACK 1\nFMACK 2\r\nFMACK 3\nFMACK 5\nFMACK 6")
    assert read_acks(console) == [1, 2, 3, 5]
    assert missing_seqs(found, read_acks(console)) == [4, 5]
    assert missing_seqs(found, [1, 2]) == []


def test_process_references_match_whole_path_components() -> None:
    """A QEMU command line references a state dir only through that exact directory, not a sibling prefix."""
    proc = procscan.QemuProcess(
        pid=1, argv=("qemu", "-pidfile", "/srv/host1/vms/x/qemu.pid", "-name", "web,debug-threads=on")
    )
    assert proc.references(Path("/srv/host1"))
    assert not proc.references(Path("/srv/host"))
    assert not proc.references(Path("/host1"))
    assert proc.name == "web"


# -- guest image ---------------------------------------------------------------------------------------------------


@pytest.mark.qemu
def test_guest_image_builds_and_is_reused(guest: GuestImage) -> None:
    """ensure_guest yields a kernel and a gzip cpio holding /init and busybox, and returns at once when built."""
    assert guest.kernel.stat().st_size > 1_000_000
    initrd = gzip.decompress(guest.initrd.read_bytes())
    assert initrd.startswith(b"070701")
    assert b"FERRYMAN-GUEST-READY" in initrd and b"virtio_blk.ko" in initrd
    started = time.monotonic()
    assert ensure_guest() == guest
    assert time.monotonic() - started < 1.0


@pytest.mark.qemu
def test_guest_image_is_rebuilt_when_the_init_script_changes(
    guest: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A changed init script produces a new image next to the old one, from the already downloaded kernel."""
    cache = tmp_path / "cache"
    (cache / "guest" / "debs").mkdir(parents=True)
    for deb in (guest.kernel.parent.parent / "debs").glob("*.deb"):
        (cache / "guest" / "debs" / deb.name).symlink_to(deb)
    (cache / "guest" / guest.kernel.parent.name).symlink_to(guest.kernel.parent)
    assert ensure_guest(cache).initrd.resolve() == guest.initrd.resolve()
    script = guest_mod.init_script()
    monkeypatch.setattr(guest_mod, "init_script", lambda: script + b"\n# changed\n")
    changed = ensure_guest(cache)
    assert changed.initrd.parent != guest.initrd.parent
    assert b"# changed" in gzip.decompress(changed.initrd.read_bytes())


# -- driver --------------------------------------------------------------------------------------------------------


@pytest.mark.qemu
async def test_vm_boots_and_its_records_advance_with_the_canary(driver: QemuDriver) -> None:
    """A booted VM appends records carrying its id and canary, readable while it runs; SIGKILL yields GONE."""
    spec = make_spec("boots")
    events = driver.events()
    pid = await boot(driver, spec)
    first = await records(driver, spec.vm_id)
    later = await wait_seq_above(driver, spec.vm_id, first[-1].seq)
    assert {(r.vm, r.canary) for r in later} == {(spec.vm_id, spec.canary)}
    assert missing_seqs(later) == []
    assert [r.uptime for r in later] == sorted(r.uptime for r in later)
    listed = await driver.list()
    assert [(v.vm_id, v.pid, v.run_state, v.managed, v.generation) for v in listed] == [
        (spec.vm_id, pid, RunState.RUNNING, True, 1)
    ]
    with pytest.raises(Conflict):
        await driver.create(spec)
    os.kill(pid, signal.SIGKILL)
    gone = await next_event(events, GONE, spec.vm_id)
    assert gone.data == {"pid": pid, "expected": False}


@pytest.mark.qemu
async def test_pause_freezes_records_and_resume_restarts_them(driver: QemuDriver) -> None:
    """While paused (query-status says so) no record is written; after resume records advance again."""
    spec = make_spec("pauses")
    events = driver.events()
    await boot(driver, spec)
    paused = await driver.pause(spec.vm_id)
    assert paused.run_state is RunState.PAUSED
    assert (await driver.execute(spec.vm_id, "query-status"))["status"] == "paused"
    await next_event(events, "STOP", spec.vm_id)
    frozen = await last_seq(driver, spec.vm_id)
    await asyncio.sleep(1.5)
    assert await last_seq(driver, spec.vm_id) == frozen
    resumed = await driver.resume(spec.vm_id)
    assert resumed.run_state is RunState.RUNNING
    await next_event(events, "RESUME", spec.vm_id)
    await wait_seq_above(driver, spec.vm_id, frozen)


@pytest.mark.qemu
async def test_stop_keeps_every_acked_record_and_restart_continues_the_sequence(driver: QemuDriver) -> None:
    """After stop every acked seq is on disk with no gap; a restarted guest goes on at last+1."""
    spec = make_spec("restarts")
    events = driver.events()
    await boot(driver, spec)
    await wait_seq_above(driver, spec.vm_id, 3)
    await driver.stop(spec.vm_id)
    await next_event(events, "SHUTDOWN", spec.vm_id)
    assert (await next_event(events, GONE, spec.vm_id)).data["expected"] is True
    assert await driver.list() == []
    before = await records(driver, spec.vm_id)
    acks = read_acks(driver.console_log(spec.vm_id))
    assert acks and missing_seqs(before, acks) == []
    last = before[-1]

    runtime = await driver.start(spec.vm_id)
    assert runtime.run_state is RunState.RUNNING
    await wait_ready(driver, spec.vm_id, boots=2)
    after = await wait_seq_above(driver, spec.vm_id, last.seq)
    following = after[last.seq]
    assert following.seq == last.seq + 1
    assert following.uptime < last.uptime  # written by the new boot
    assert missing_seqs(after, read_acks(driver.console_log(spec.vm_id))) == []


AGENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from ferryman.agent.hypervisor.qmp import QemuDriver
    from ferryman.core.models import DiskSpec, VMSpec
    from ferryman.lab.guest import GuestImage

    async def main():
        state, kernel, initrd, vm_id = sys.argv[1:5]
        driver = QemuDriver(Path(state), GuestImage(Path(kernel), Path(initrd)), "tcg")
        spec = VMSpec(vm_id=vm_id, name="survivor", vcpus=1, memory_mb=128, disks=(DiskSpec(64 << 20),),
                      canary="survivor-canary", record_interval_ms=250)
        runtime = await driver.create(spec)
        print("PID", runtime.pid, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def read_pid(agent: asyncio.subprocess.Process) -> int:
    assert agent.stdout is not None
    async for line in agent.stdout:
        if line.startswith(b"PID "):
            return int(line.split()[1])
    raise AssertionError("the agent exited without starting the VM")


@pytest.mark.qemu
async def test_vm_survives_agent_death_and_a_new_driver_reattaches(state_dir: Path, guest: GuestImage) -> None:
    """QEMU outlives a SIGKILLed agent; a new driver on the same state dir reattaches without restarting it."""
    vm_id = str(uuid.uuid4())
    argv = [sys.executable, "-c", AGENT_SCRIPT, str(state_dir), str(guest.kernel), str(guest.initrd), vm_id]
    agent = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    try:
        pid = await asyncio.wait_for(read_pid(agent), 60)
    finally:
        agent.kill()
        await agent.wait()
    assert procscan.is_alive(pid)

    driver = QemuDriver(state_dir, guest, "tcg")
    try:
        await wait_ready(driver, vm_id)
        attached = await driver.reattach()
        assert [(v.vm_id, v.pid, v.run_state) for v in attached] == [(vm_id, pid, RunState.RUNNING)]
        seq = await last_seq(driver, vm_id)
        await wait_seq_above(driver, vm_id, seq)
        assert [v.pid for v in await driver.list()] == [pid]
        assert await driver.reattach() == attached
    finally:
        await driver.close()
    assert procscan.is_alive(pid)


@pytest.mark.qemu
async def test_list_reports_hand_started_qemu_as_unmanaged(driver: QemuDriver, state_dir: Path, tmp_path: Path) -> None:
    """A QEMU referencing the state dir that the driver did not start (other uuid, or a copy of a VM) is unmanaged."""
    spec = make_spec("managed")
    runtime = await driver.create(spec)
    stranger, copy = str(uuid.uuid4()), spec.vm_id
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    hand_started = [
        ["-uuid", stranger, "-name", "rogue", "-pidfile", str(state_dir / "rogue.pid")],
        ["-uuid", copy, "-name", "copy", "-pidfile", str(state_dir / "copy.pid")],
        ["-uuid", str(uuid.uuid4()), "-name", "unrelated", "-pidfile", str(elsewhere / "other.pid")],
    ]
    base = [QEMU, "-S", "-nodefaults", "-no-user-config", "-display", "none", "-machine", "q35,accel=tcg", "-m", "32"]
    procs = [await asyncio.create_subprocess_exec(*base, *extra, stdin=subprocess.DEVNULL) for extra in hand_started]
    try:
        for _ in range(200):
            listed = await driver.list()
            if len(listed) >= 3:
                break
            await asyncio.sleep(0.1)
        by_name = {v.name: v for v in listed}
        assert set(by_name) == {"managed", "rogue", "copy"}
        assert (by_name["managed"].managed, by_name["managed"].pid) == (True, runtime.pid)
        assert (by_name["rogue"].vm_id, by_name["rogue"].managed, by_name["rogue"].pid) == (
            stranger,
            False,
            procs[0].pid,
        )
        assert (by_name["copy"].vm_id, by_name["copy"].managed, by_name["copy"].pid) == (copy, False, procs[1].pid)
    finally:
        for proc in procs:
            proc.kill()
            await proc.wait()


@pytest.mark.qemu
async def test_resident_set_fills_guest_memory_with_data(driver: QemuDriver, tmp_path: Path) -> None:
    """``resident_mib`` makes the guest hold that much non-zero RAM, which a migration must carry; a resident set
    the VM cannot hold is refused before QEMU starts."""
    with pytest.raises(InvalidInput, match="resident set"):
        await driver.create(make_spec("too-full", memory_mb=256, resident_mib=200))
    spec = make_spec("resident", memory_mb=320, resident_mib=160)
    await boot(driver, spec)
    assert b"FERRYMAN-GUEST-RESIDENT mib=160" in driver.console_log(spec.vm_id).read_bytes()
    dump = tmp_path / "ram"
    await driver.execute(spec.vm_id, "pmemsave", {"val": 0, "size": 320 << 20, "filename": str(dump)})
    page = 4096
    with dump.open("rb") as fh:
        used = sum(1 for chunk in iter(lambda: fh.read(page), b"") if chunk.count(0) != page)
    dump.unlink()
    # the kernel and initramfs alone fill well under 160 MiB of a fresh guest
    assert used * page >= 160 << 20


@pytest.mark.qemu
async def test_qemu_and_lifecycle_errors_are_typed(driver: QemuDriver) -> None:
    """QEMU's own message surfaces in HypervisorError, nothing is left behind; unknown or malformed ids are refused."""
    spec = make_spec("too-big", memory_mb=64 * 1024 * 1024)
    with pytest.raises(HypervisorError, match="cannot set up guest memory"):
        await driver.create(spec)
    assert not (driver.state_dir / "vms" / spec.vm_id).exists()
    with pytest.raises(NotFound):
        await driver.stop(spec.vm_id)
    with pytest.raises(NotFound):
        await driver.destroy(spec.vm_id)
    with pytest.raises(InvalidInput):
        await driver.destroy("../../etc")


@pytest.mark.qemu
async def test_destroy_stops_the_vm_and_removes_its_files(driver: QemuDriver) -> None:
    """destroy quits a running VM and deletes its directory."""
    spec = make_spec("destroyed")
    runtime = await driver.create(spec)
    assert runtime.pid is not None
    await driver.destroy(spec.vm_id)
    assert not procscan.is_alive(runtime.pid)
    assert not (driver.state_dir / "vms" / spec.vm_id).exists()
    assert await driver.list() == []


@pytest.mark.qemu
async def test_encrypted_vm_runs_only_with_its_key_and_never_shows_it(driver: QemuDriver) -> None:
    """An encrypted VM's image is LUKS qcow2; it boots with the key, which appears neither on any command line nor in
    the VM's directory, and which the agent forgets once QEMU runs (a restart needs it again); its records read
    back only with the key; destroying it crypto-erases the image."""
    key = os.urandom(32)
    spec = make_spec("sealed", encrypted=True)
    with pytest.raises(InvalidInput, match="disk key"):
        await driver.create(spec)
    assert not (driver.state_dir / "vms" / spec.vm_id).exists()

    async def create_with_key() -> int | None:  # one API request: the key lives only as long as it does
        driver.use_key(spec.vm_id, key)
        return (await driver.create(spec)).pid

    async def start_with_key() -> None:
        driver.use_key(spec.vm_id, key)
        await driver.start(spec.vm_id)

    pid = await asyncio.create_task(create_with_key())
    assert pid is not None
    await wait_ready(driver, spec.vm_id)
    disk = driver.disk_paths(spec.vm_id)[0]
    assert is_encrypted_image(disk)
    found = await poll_records(disk, key)
    assert found and {r.canary for r in found} == {spec.canary}
    with pytest.raises(HypervisorError):
        await asyncio.to_thread(read_records, disk)  # without the key qemu-io cannot open it
    with pytest.raises(HypervisorError):
        await asyncio.to_thread(read_records, disk, key=os.urandom(32))
    passphrase = luks_passphrase(key)
    secrets = (key, passphrase, base64.b64encode(passphrase))
    cmdline = Path(f"/proc/{pid}/cmdline")
    vm_files = [cmdline, *(driver.state_dir / "vms" / spec.vm_id).iterdir()]
    assert await asyncio.to_thread(files_holding, vm_files, *secrets) == []
    assert await asyncio.to_thread(files_holding, [disk], spec.canary.encode()) == []  # ciphertext only at rest
    await driver.stop(spec.vm_id)
    with pytest.raises(InvalidInput, match="disk key"):  # a later request without the key
        await driver.start(spec.vm_id)
    await asyncio.create_task(start_with_key())
    await wait_ready(driver, spec.vm_id, boots=2)
    await driver.destroy(spec.vm_id)
    assert not (driver.state_dir / "vms" / spec.vm_id).exists()


@pytest.mark.qemu
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_live_snapshot_never_pauses_the_guest_and_holds_a_point_in_time(
    driver: QemuDriver, tmp_path: Path, encrypted: bool
) -> None:
    """blockdev-backup snapshots a running disk: the guest is never paused (QEMU emits no STOP), the snapshot holds
    a gap-free prefix of the records as of the job's start, and an encrypted disk's snapshot is encrypted under the
    same key and unreadable without it. Nothing is left in QEMU (no job, no target node)."""
    key = os.urandom(32) if encrypted else None
    spec = make_spec("live-snap", encrypted=encrypted)
    driver.use_key(spec.vm_id, key)
    await driver.create(spec)
    await wait_ready(driver, spec.vm_id)
    disk = driver.disk_paths(spec.vm_id)[0]
    assert len(await poll_records(disk, key)) > 0
    # what an earlier snapshot whose agent died left in QEMU: its target node
    leftover = tmp_path / "leftover.qcow2"
    await asyncio.to_thread(run_qemu_tool, ["qemu-img", "create", "-q", "-f", "qcow2", str(leftover), "1M"])
    node = {"driver": "qcow2", "node-name": "snapshot-target0", "file": {"driver": "file", "filename": str(leftover)}}
    await driver.execute(spec.vm_id, "blockdev-add", node)
    events = driver.events()
    path = await live_snapshot(driver, spec.vm_id, 0, disk, DISK_BYTES, tmp_path / "snaps", "pre-test", key=key)
    await driver.execute(spec.vm_id, "query-status")  # a marker: every event before it has been delivered
    stops = []
    with contextlib.suppress(TimeoutError):
        stops.append(await asyncio.wait_for(next_event(events, "STOP", spec.vm_id), 1.0))
    assert stops == []
    assert (await driver.execute(spec.vm_id, "query-status"))["status"] == "running"
    assert [p.name for p in (tmp_path / "snaps").iterdir()] == [path.name]  # no partial left
    snap = await asyncio.to_thread(read_records, path, key=key)
    assert snap and missing_seqs(snap) == [] and {r.canary for r in snap} == {spec.canary}
    later = await wait_seq_above(driver, spec.vm_id, snap[-1].seq) if not encrypted else None
    if later is not None:
        assert later[: len(snap)] == snap  # the snapshot is the disk's past: the same records, in order
    assert is_encrypted_image(path) is encrypted
    if encrypted:
        with pytest.raises(HypervisorError):
            await asyncio.to_thread(read_records, path)
    assert await driver.execute(spec.vm_id, "query-jobs") == []
    nodes = {n["node-name"] for n in await driver.execute(spec.vm_id, "query-named-block-nodes")}
    assert not any(n.startswith("snapshot-target") for n in nodes)


# -- guest probes --------------------------------------------------------------------------------------------------


@pytest.mark.qemu
async def test_a_running_guest_passes_on_run_state_and_vcpu_progress_alone(driver: QemuDriver) -> None:
    """Without any probe that knows the guest: QEMU runs it and its vCPU threads gain CPU time, even with the guest
    idle (no memory dirtied), measured from a mark as at activation or from a reading of its own; paused, it fails
    and reads as not running."""
    spec = make_spec("probed", dirty_kib_per_s=0)
    await boot(driver, spec)
    checks = GuestChecks.standard()
    view = guest_view(driver, spec.vm_id)
    marks = await checks.mark(view)
    assert set(marks) == {"vcpus"}
    cold = await checks.check(view, {}, wait_s=10)
    assert (cold.ok, cold.running, cold.last_seq) == (True, True, None), cold.detail
    assert cold.detail.startswith("running=True, vcpus ran ")
    marked = await checks.check(view, {"vcpus": marks["vcpus"].value}, wait_s=10)
    assert marked.ok and marked.detail.endswith(" since activation")
    await driver.pause(spec.vm_id)
    paused = await checks.check(view, {}, wait_s=1)
    assert (paused.ok, paused.running) == (False, False)
    assert paused.detail.startswith("running=False (paused), vcpus did not run in ")


@pytest.mark.qemu
async def test_a_running_guest_passes_with_the_records_probe_from_its_activation_mark(driver: QemuDriver) -> None:
    """With the lab's records probe: the mark is the newest record, and a record written after it passes; the
    validation reports the run state and the records, and the newest record number."""
    spec = make_spec("recorded")
    await boot(driver, spec)
    # the guest's record header (what the probe reads) follows its first record a moment later
    disk = driver.disk_paths(spec.vm_id)[0]
    for _ in range(120):
        if await asyncio.to_thread(read_last_seq, disk) >= 1:
            break
        await asyncio.sleep(0.25)
    checks = GuestChecks.standard([DiskRecordsProbe()])
    view = guest_view(driver, spec.vm_id)
    marks = await checks.mark(view)
    assert set(marks) == {"vcpus", "records"}
    at_mark = marks["records"].last_seq
    assert at_mark is not None and at_mark == marks["records"].value >= 1
    verdict = await checks.check(view, {name: mark.value for name, mark in marks.items()}, wait_s=30)
    assert (verdict.ok, verdict.running) == (True, True), verdict.detail
    assert verdict.last_seq is not None and verdict.last_seq > at_mark
    assert verdict.detail == f"running=True, disk records {at_mark} -> {verdict.last_seq}"
    await driver.pause(spec.vm_id)
    frozen = await checks.check(view, {}, wait_s=1)
    assert not frozen.ok and not frozen.running
    assert frozen.detail.endswith(f"disk records {frozen.last_seq} -> {frozen.last_seq}")


# -- accelerator ---------------------------------------------------------------------------------------------------


@pytest.mark.qemu
def test_accel_detection_probes_once_and_caches(
    guest: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """detect_accel returns kvm or tcg, caches a probed verdict, and FERRYMAN_ACCEL overrides it."""
    monkeypatch.delenv(accel_mod.ACCEL_ENV, raising=False)
    verdict = accel_mod.detect_accel(guest, tmp_path, timeout=8)
    assert verdict in ("kvm", "tcg")
    if accel_mod.kvm_usable():
        assert len(list((tmp_path / "accel").glob("*.json"))) == 1
        started = time.monotonic()
        assert accel_mod.detect_accel(guest, tmp_path, timeout=8) == verdict
        assert time.monotonic() - started < 2.0
    monkeypatch.setenv(accel_mod.ACCEL_ENV, "tcg")
    assert accel_mod.detect_accel(guest, tmp_path) == "tcg"
