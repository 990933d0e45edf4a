"""Host-side reader of what the lab guest wrote: disk records and serial-console acks.

The guest (``guest_init.sh``) writes record N as the 512-byte sector N of its records area, keeps the last number
written in sector 0 of the area, and prints ``FMACK N`` on its console only once record N is flushed. A migration,
stop or restart is correct for the guest's data when every acknowledged record is on disk and the numbers have no
gap: :func:`missing_seqs` computes exactly that.

The records area is the first MBR partition of type 0xda on a bootable disk image (:mod:`ferryman.lab.disk_image`),
else the whole raw disk of a guest booted by direct kernel boot. The reader tells them apart by the disk's first
sector, as the guest does; on a bare disk that sector is the records header, so finding the area costs no extra read.

Disks are read with ``qemu-io -r -U`` (shared, read-only), so reading while the VM runs is safe; only the sectors
that hold records are read, and they go through a pipe, never a temporary file. An encrypted image is read with its
disk key (``key=``), given to qemu-io through a pipe as well. This module never writes to a disk.

:class:`DiskRecordsProbe` is the lab's guest probe: the lab hands it to every agent it starts
(``--guest-probe ferryman.lab.records:DiskRecordsProbe``), so a migration's validation also sees the guest's records
continue on the destination.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferryman.agent.probes import Guest, Mark, ProbeResult
from ferryman.agent.storage.images import KEY_OBJECT_ID, open_args_for_encrypted, run_qemu_tool
from ferryman.core.errors import HypervisorError
from ferryman.lab.disk_image import records_region

SECTOR = 512
_QCOW2_MAGIC = b"QFI\xfb"
_RECORD_RE = re.compile(rb"^FMREC seq=(\d+) vm=(\S+) canary=(\S+) up=([0-9.]+)\n")
_HEADER_RE = re.compile(rb"^FMHDR last=(\d+) ")
_ACK_RE = re.compile(r"FMACK (\d+)\r?\n")
_HEX_RE = re.compile(r"^[0-9a-f]{8}:\s+((?:[0-9a-f]{2} ?){1,16})")
# Records past the header's count exist when a guest stopped between writing a record and updating the header.
_SLACK = 16
_TIMEOUT = 60.0


@dataclass(frozen=True)
class Record:
    """One record the guest wrote; ``uptime`` is the guest's uptime in seconds when it wrote it."""

    seq: int
    vm: str
    canary: str
    uptime: float


def read_records(disk: Path, *, qemu_img: str = "qemu-img", key: bytes | None = None) -> list[Record]:
    """The records on ``disk`` (qcow2 or raw) in sector order, stopping at the first sector that holds none."""
    header, area = _records_area(disk, qemu_img, key)
    count = _parse_header(header) + _SLACK
    if area.sectors is not None:
        count = min(count, area.sectors - 1)
    data = _read_sectors(disk, 1, count, qemu_img, key, base=area.offset) if count > 0 else b""
    records = []
    for offset in range(0, len(data), SECTOR):
        record = parse_record(data[offset : offset + SECTOR])
        if record is None:
            break
        records.append(record)
    return records


def read_last_seq(disk: Path, *, qemu_img: str = "qemu-img", key: bytes | None = None) -> int:
    """The last sequence number the guest's header claims (0 for a fresh disk)."""
    return _parse_header(_records_area(disk, qemu_img, key)[0])


def parse_record(sector: bytes) -> Record | None:
    """The record in one sector, or None if the sector holds none."""
    match = _RECORD_RE.match(sector)
    if match is None:
        return None
    seq, vm, canary, uptime = match.groups()
    return Record(seq=int(seq), vm=vm.decode(), canary=canary.decode(), uptime=float(uptime))


def read_acks(console_log: Path) -> list[int]:
    """Sequence numbers the guest acknowledged on its console, in order (a partly written last line is ignored)."""
    try:
        text = console_log.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [int(m.group(1)) for m in _ACK_RE.finditer(text)]


def missing_seqs(records: Iterable[Record], acks: Iterable[int] = ()) -> list[int]:
    """Sequence numbers from 1 up to the highest one on disk or acknowledged that are not on disk.

    Empty means no acknowledged write was lost and the disk has no gap.
    """
    on_disk = {r.seq for r in records}
    highest = max(on_disk | set(acks), default=0)
    return [seq for seq in range(1, highest + 1) if seq not in on_disk]


class DiskRecordsProbe:
    """The guest runs here if it writes a record after activation: a record newer than the one read at activation
    (or, without a fresh mark, than the newest one when the check starts) can only come from this copy."""

    name = "records"
    FRESH_INTERVALS = 3  # the activation's record counts as the starting point this many record intervals on
    POLL_S = 0.1  # between two reads of the records (each a qemu-io run)

    async def mark(self, guest: Guest) -> Mark:
        seq = await asyncio.to_thread(read_last_seq, guest.disks[0], key=guest.key)
        fresh_s = self.FRESH_INTERVALS * guest.spec.record_interval_ms / 1000
        return Mark(seq, fresh_s=fresh_s, last_seq=seq)

    async def check(self, guest: Guest, since: Any, wait_s: float) -> ProbeResult:
        disk, key = guest.disks[0], guest.key
        after = await asyncio.to_thread(read_last_seq, disk, key=key)
        before = since if isinstance(since, int) else after
        # a guest still booting needs longer than one interval for its next record
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(3 * guest.spec.record_interval_ms / 1000, wait_s)
        while after <= before and loop.time() < deadline:
            await asyncio.sleep(self.POLL_S)
            after = await asyncio.to_thread(read_last_seq, disk, key=key)
        return ProbeResult(after > before, f"disk records {before} -> {after}", last_seq=after)


@dataclass(frozen=True)
class _Area:
    """Where the records lie on a disk: from ``offset`` bytes, for ``sectors`` sectors (None: to the disk's end)."""

    offset: int
    sectors: int | None


def _records_area(disk: Path, qemu_img: str, key: bytes | None) -> tuple[bytes, _Area]:
    """The records header sector and the area it heads: a 0xda partition if sector 0 is an MBR naming one."""
    first = _read_sectors(disk, 0, 1, qemu_img, key)
    region = records_region(first)
    if region is None:
        return first, _Area(0, None)
    area = _Area(region[0], region[1] // SECTOR)
    return _read_sectors(disk, 0, 1, qemu_img, key, base=area.offset), area


def _parse_header(sector: bytes) -> int:
    match = _HEADER_RE.match(sector)
    return int(match.group(1)) if match else 0


def _read_sectors(
    disk: Path, first: int, count: int, qemu_img: str, key: bytes | None = None, *, base: int = 0
) -> bytes:
    """``count`` sectors from sector ``first`` of the area that starts ``base`` bytes into the disk."""
    start = base + first * SECTOR
    try:
        with disk.open("rb") as fh:
            is_qcow2 = fh.read(4) == _QCOW2_MAGIC
            if not is_qcow2:
                fh.seek(start)
                return fh.read(count * SECTOR)
    except OSError as err:
        raise HypervisorError(f"cannot read disk {disk}: {err}") from err
    # qemu-io prints the sectors as a hex dump on stdout: the guest's data never lands in a temporary file
    qemu_io = str(Path(qemu_img).with_name("qemu-io")) if "/" in qemu_img else "qemu-io"
    argv = [qemu_io, "-r", "-U"]
    argv += open_args_for_encrypted(disk, KEY_OBJECT_ID) if key is not None else ["-f", "qcow2", str(disk)]
    argv += ["-c", f"read -v {start} {count * SECTOR}"]
    out = run_qemu_tool(argv, key=key, timeout=_TIMEOUT)
    data = bytearray()
    for line in out.splitlines():
        if (match := _HEX_RE.match(line)) is not None:
            data += bytes.fromhex(match.group(1))
    if len(data) != count * SECTOR:
        raise HypervisorError(f"qemu-io read {len(data)} of {count * SECTOR} bytes from {disk}")
    return bytes(data)
