"""Forensic capture from the host against real QEMU (TCG, 1 vCPU, 128 MiB, one 64 MiB disk): memory as an ELF core
and a disk at one instant, sealed from the first byte, the guest running on (ferryman.agent.forensics)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import shutil
import stat
import struct
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ferryman.agent.forensics import capture_disk, capture_memory, disk_artefact, memory_artefact
from ferryman.agent.hypervisor.protocol import HypervisorEvent
from ferryman.agent.hypervisor.qmp import QemuDriver
from ferryman.core.errors import Conflict, HypervisorError, NotFound, StorageError
from ferryman.core.models import DiskSpec, VMSpec
from ferryman.forensics.sealed import MAGIC, SealInfo, WrongKey, new_key, unseal_to
from ferryman.lab.records import SECTOR, Record, missing_seqs, parse_record, read_records

pytestmark = pytest.mark.qemu

BOOT_TIMEOUT = 60.0
MEMORY_MB = 128
DISK_BYTES = 64 * 1024 * 1024
ET_CORE, EM_X86_64, PT_LOAD, PT_NOTE, NT_PRSTATUS = 4, 62, 1, 4, 1


# -- helpers -------------------------------------------------------------------------------------------------------


def make_spec(name: str, **overrides: Any) -> VMSpec:
    values: dict[str, Any] = {
        "vm_id": str(uuid.uuid4()),
        "name": name,
        "vcpus": 1,
        "memory_mb": MEMORY_MB,
        "disks": (DiskSpec(DISK_BYTES),),
        "canary": f"canary-{uuid.uuid4().hex[:12]}",
        "record_interval_ms": 250,
    }
    values.update(overrides)
    return VMSpec(**values)


async def boot(driver: QemuDriver, spec: VMSpec, key: bytes | None = None) -> None:
    """Create the VM (with its disk key, in a request of its own) and wait until it has written a few records."""

    async def create() -> None:
        driver.use_key(spec.vm_id, key)
        await driver.create(spec)

    await asyncio.create_task(create())
    console = driver.console_log(spec.vm_id)
    deadline = time.monotonic() + BOOT_TIMEOUT
    while not (console.exists() and b"FERRYMAN-GUEST-READY" in console.read_bytes()):
        if time.monotonic() > deadline:
            pytest.fail(f"guest {spec.vm_id} did not boot: {console.read_text()[-2000:]}")
        await asyncio.sleep(0.1)
    await wait_seq_above(driver, spec.vm_id, 2, key)


async def records(driver: QemuDriver, vm_id: str, key: bytes | None = None) -> list[Record]:
    return await asyncio.to_thread(read_records, driver.disk_paths(vm_id)[0], key=key)


async def wait_seq_above(driver: QemuDriver, vm_id: str, seq: int, key: bytes | None = None) -> list[Record]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = await records(driver, vm_id, key)
        if found and found[-1].seq > seq:
            return found
        await asyncio.sleep(0.25)
    pytest.fail(f"records of {vm_id} did not pass seq {seq}")


async def status(driver: QemuDriver, vm_id: str) -> str:
    return str((await driver.execute(vm_id, "query-status"))["status"])


async def collect(stream: AsyncIterator[HypervisorEvent], vm_id: str, driver: QemuDriver) -> list[str]:
    """The names of the VM's events so far (a query-status first: every earlier event has been delivered)."""
    await driver.execute(vm_id, "query-status")
    names = []
    with contextlib.suppress(TimeoutError):
        while True:
            event = await asyncio.wait_for(anext(stream), 0.5)
            if event.vm_id == vm_id:
                names.append(event.event)
    return names


def evidence_dir(tmp_path: Path) -> Path:
    path = tmp_path / "evidence"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def unseal(path: Path, key: bytes, artefact: str, info: SealInfo) -> bytes:
    out = io.BytesIO()
    with path.open("rb") as fh:
        assert unseal_to(fh, out, key, artefact=artefact, expect_sha256=info.plaintext_sha256) == info
    return out.getvalue()


def check_sealed_file(path: Path, info: SealInfo, *needles: bytes) -> None:
    """Owner-only, a sealed header, the hashes the capture reported, and none of ``needles`` anywhere in it."""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    assert (len(data), hashlib.sha256(data).hexdigest()) == (info.sealed_bytes, info.sealed_sha256)
    for needle in needles:
        assert needle not in data


def elf_core(data: bytes) -> tuple[list[tuple[int, int, int]], list[tuple[bytes, int]]]:
    """Check an ELF64 little-endian x86-64 core and return its program headers (type, offset, size) and notes
    (name, type)."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1  # ELFCLASS64, little-endian
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    assert (e_type, e_machine) == (ET_CORE, EM_X86_64)
    e_phoff = struct.unpack_from("<Q", data, 32)[0]
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    headers = []
    for i in range(e_phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, e_phoff + i * e_phentsize)
        assert p_offset + p_filesz <= len(data)
        headers.append((p_type, p_offset, p_filesz))
    notes = []
    for p_type, start, size in headers:
        offset, end = start, start + size
        while p_type == PT_NOTE and offset + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", data, offset)
            notes.append((data[offset + 12 : offset + 12 + namesz].rstrip(b"\0"), n_type))
            offset += 12 + -(-namesz // 4) * 4 + -(-descsz // 4) * 4
    return headers, notes


def records_of(raw: bytes) -> tuple[int, list[Record]]:
    """The header's last seq and the records of a bare raw disk (sector 0 header, record N in sector N)."""
    header = raw[:SECTOR]
    assert header.startswith(b"FMHDR last=")
    last = int(header.split(b"=", 1)[1].split(b" ", 1)[0])
    found = []
    for offset in range(SECTOR, len(raw), SECTOR):
        record = parse_record(raw[offset : offset + SECTOR])
        if record is None:
            break
        found.append(record)
    return last, found


async def capture_leftovers(driver: QemuDriver, vm_id: str) -> list[str]:
    """Whatever a disk capture may leave in QEMU or in the VM's directory."""
    left = [f"job {j['id']}" for j in await driver.execute(vm_id, "query-jobs")]
    left += [f"export {e['id']}" for e in await driver.execute(vm_id, "query-block-exports")]
    nodes = await driver.execute(vm_id, "query-named-block-nodes")
    left += [f"node {n['node-name']}" for n in nodes if str(n["node-name"]).startswith("fm-")]
    objects = await driver.execute(vm_id, "qom-list", {"path": "/objects"})
    left += [f"object {o['name']}" for o in objects if str(o["name"]).startswith("fm-")]
    left += [f"file {p.name}" for p in driver.vm_dir(vm_id).iterdir() if p.name.startswith("forensic-")]
    return left


# -- memory --------------------------------------------------------------------------------------------------------


async def test_memory_of_a_running_guest_is_a_sealed_elf_core_holding_its_canary(
    driver: QemuDriver, tmp_path: Path
) -> None:
    """The sealed dump on disk holds no canary; unsealed it is an ELF core (notes with the vCPU's registers, loads
    of all RAM) holding it; the guest is stopped only for the dump and runs on, writing records."""
    spec = make_spec("mem-running")
    await boot(driver, spec)
    events = driver.events()
    seq = (await records(driver, spec.vm_id))[-1].seq
    key, path = new_key(), evidence_dir(tmp_path) / "memory.sealed"

    info = await capture_memory(driver, spec.vm_id, path, key)

    assert await status(driver, spec.vm_id) == "running"
    assert await collect(events, spec.vm_id, driver) == ["STOP", "DUMP_COMPLETED", "RESUME"]
    check_sealed_file(path, info, spec.canary.encode(), b"FERRYMAN-CANARY", b"\x7fELF")
    core = unseal(path, key, memory_artefact(spec.vm_id), info)
    assert spec.canary.encode() in core
    headers, notes = elf_core(core)
    loads = [size for kind, _, size in headers if kind == PT_LOAD]
    assert [kind for kind, _, _ in headers].count(PT_NOTE) >= 1
    assert sum(loads) >= MEMORY_MB << 20
    assert notes.count((b"CORE", NT_PRSTATUS)) == spec.vcpus
    if shutil.which("readelf"):
        raw = tmp_path / "core.elf"  # the test's own plaintext copy, for binutils to read
        raw.write_bytes(core)
        argv = ["readelf", "-h", str(raw)]
        header = (await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, check=True)).stdout
        assert "CORE (Core file)" in header
        raw.unlink()
    with pytest.raises(WrongKey), path.open("rb") as fh:
        unseal_to(fh, None, new_key())
    await wait_seq_above(driver, spec.vm_id, seq)

    with pytest.raises(StorageError):  # evidence is never overwritten
        await capture_memory(driver, spec.vm_id, path, new_key())
    assert path.read_bytes().startswith(MAGIC) and path.stat().st_size == info.sealed_bytes


async def test_a_paused_guest_stays_paused_and_a_failed_capture_leaves_nothing(
    driver: QemuDriver, tmp_path: Path
) -> None:
    """A paused VM's memory is captured without resuming it; a capture that cannot finish in time is aborted, its
    partial file scrubbed, and the VM is in its earlier state, running or paused."""
    spec = make_spec("mem-paused")
    await boot(driver, spec)
    await driver.pause(spec.vm_id)
    frozen = (await records(driver, spec.vm_id))[-1].seq
    key, path = new_key(), evidence_dir(tmp_path) / "paused.sealed"
    info = await capture_memory(driver, spec.vm_id, path, key)
    assert await status(driver, spec.vm_id) == "paused"
    assert spec.canary.encode() in unseal(path, key, memory_artefact(spec.vm_id), info)
    await asyncio.sleep(0.6)
    assert (await records(driver, spec.vm_id))[-1].seq == frozen

    failed = evidence_dir(tmp_path) / "failed.sealed"
    for expected in ("paused", "running"):
        with pytest.raises(HypervisorError, match="did not finish within"):
            await capture_memory(driver, spec.vm_id, failed, new_key(), within=0.0)
        assert not failed.exists()
        assert await status(driver, spec.vm_id) == expected
        assert (await driver.execute(spec.vm_id, "query-dump"))["status"] == "failed"
        if expected == "paused":
            await driver.resume(spec.vm_id)
    await wait_seq_above(driver, spec.vm_id, frozen)


# -- disks ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
async def test_disk_of_a_running_guest_is_captured_at_one_instant_and_sealed(
    driver: QemuDriver, tmp_path: Path, encrypted: bool
) -> None:
    """The sealed disk holds no record or canary; unsealed it is the guest-visible disk (decrypted for an encrypted
    VM) at one instant: header and records agree, and they are the live disk's past. The guest never stops, keeps
    writing to its own disk, and nothing of the capture is left in QEMU or on the host."""
    disk_key = os.urandom(32) if encrypted else None
    spec = make_spec("disk-capture", encrypted=encrypted)
    await boot(driver, spec, disk_key)
    events = driver.events()
    before = await records(driver, spec.vm_id, disk_key)
    key, path = new_key(), evidence_dir(tmp_path) / "disk0.sealed"

    info = await capture_disk(driver, spec.vm_id, 0, path, key)

    assert "STOP" not in await collect(events, spec.vm_id, driver)  # the guest ran throughout
    assert await status(driver, spec.vm_id) == "running"
    check_sealed_file(path, info, spec.canary.encode(), b"FMREC", b"FMHDR")
    raw = unseal(path, key, disk_artefact(spec.vm_id, 0), info)
    assert len(raw) == info.plaintext_bytes == DISK_BYTES
    last, captured = records_of(raw)
    assert captured[-1].seq in (last, last + 1)  # one instant: the header lags its newest record by one at most
    assert missing_seqs(captured) == [] and {r.canary for r in captured} == {spec.canary}
    assert captured[: len(before)] == before
    after = await wait_seq_above(driver, spec.vm_id, captured[-1].seq + 2, disk_key)
    assert after[: len(captured)] == captured  # the capture is the disk's past, and the disk went on from it
    assert missing_seqs(after) == []
    assert await capture_leftovers(driver, spec.vm_id) == []


async def test_a_failed_disk_capture_and_an_earlier_ones_leftovers_leave_nothing(
    driver: QemuDriver, tmp_path: Path
) -> None:
    """What a capture whose agent died left behind is cleared by the next capture; a capture that cannot finish in
    time is torn down (export, server, job, node, secret, overlay) and its partial file scrubbed; the guest writes
    on. Unknown disks and concurrent captures are refused."""
    spec = make_spec("disk-failure")
    await boot(driver, spec)
    vm_dir = driver.vm_dir(spec.vm_id)
    leftover = vm_dir / "forensic-fleece0.qcow2"  # as a dead agent left it: a node on its overlay in QEMU
    await asyncio.to_thread(
        subprocess.run, ["qemu-img", "create", "-q", "-f", "qcow2", str(leftover), "1M"], check=True
    )
    node = {"driver": "qcow2", "node-name": "fm-fleece0", "file": {"driver": "file", "filename": str(leftover)}}
    await driver.execute(spec.vm_id, "blockdev-add", node)
    assert await capture_leftovers(driver, spec.vm_id) == ["node fm-fleece0", "file forensic-fleece0.qcow2"]
    seq = (await records(driver, spec.vm_id))[-1].seq
    path = evidence_dir(tmp_path) / "failed.sealed"

    with pytest.raises(HypervisorError, match="not read within"):
        await capture_disk(driver, spec.vm_id, 0, path, new_key(), within=0.0)

    assert not path.exists()
    assert await capture_leftovers(driver, spec.vm_id) == []
    assert await status(driver, spec.vm_id) == "running"
    await wait_seq_above(driver, spec.vm_id, seq)
    with pytest.raises(NotFound):
        await capture_disk(driver, spec.vm_id, 1, path, new_key())
    first = asyncio.create_task(capture_disk(driver, spec.vm_id, 0, path, new_key()))
    await asyncio.sleep(0)
    with pytest.raises(Conflict, match="already running"):
        await capture_memory(driver, spec.vm_id, evidence_dir(tmp_path) / "other.sealed", new_key())
    assert (await first).plaintext_bytes == DISK_BYTES
    assert await capture_leftovers(driver, spec.vm_id) == []
