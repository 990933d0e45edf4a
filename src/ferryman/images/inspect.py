"""What a disk file is, read from its headers and ``qemu-img info``: its format, virtual size, and whether it points
at other files.

An image a tenant or publisher hands over must stand alone: a qcow2 whose header names a backing file or an external
data file would make QEMU open a file of the host's choosing (``/etc/shadow``, another tenant's disk) as the guest's
disk, so :func:`check_importable` refuses it, as it refuses an encrypted image (the registry's images are public to
their tenants; secrecy is the per-VM overlay's). The format is decided from the file's magic, never by letting
``qemu-img`` probe a raw file.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ferryman.core.errors import HypervisorError, InvalidInput

QCOW2_MAGIC = b"QFI\xfb"
_TIMEOUT = 120.0


@dataclass(frozen=True)
class DiskFacts:
    format: str  # raw | qcow2
    virtual_size: int
    backing_file: str | None = None
    data_file: str | None = None
    encrypted: bool = False


def disk_format(path: Path) -> str:
    with path.open("rb") as fh:
        return "qcow2" if fh.read(4) == QCOW2_MAGIC else "raw"


def describe(path: Path, *, qemu_img: str = "qemu-img") -> DiskFacts:
    """The disk's facts; a qcow2's from ``qemu-img info``, a raw file's from its size."""
    fmt = disk_format(path)
    if fmt == "raw":
        return DiskFacts("raw", path.stat().st_size)
    argv = [qemu_img, "info", "-f", "qcow2", "--output=json", "-U", str(path)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise HypervisorError(f"qemu-img info failed: {err}") from err
    if done.returncode != 0:
        raise InvalidInput(f"not a readable qcow2 image: {done.stderr.strip() or done.stdout.strip()}")
    info = json.loads(done.stdout)
    specific = (info.get("format-specific") or {}).get("data") or {}
    return DiskFacts(
        "qcow2",
        int(info["virtual-size"]),
        backing_file=info.get("backing-filename") or info.get("full-backing-filename"),
        data_file=specific.get("data-file"),
        encrypted=bool(info.get("encrypted")),
    )


def check_importable(facts: DiskFacts) -> DiskFacts:
    """``facts`` if an image with them may enter the registry, else InvalidInput saying why."""
    if facts.backing_file:
        raise InvalidInput(f"a qcow2 image with a backing file ({facts.backing_file}) cannot be imported: flatten it")
    if facts.data_file:
        raise InvalidInput(f"a qcow2 image with an external data file ({facts.data_file}) cannot be imported")
    if facts.encrypted:
        raise InvalidInput("an encrypted image cannot be imported: images are shared, each VM's overlay is encrypted")
    if facts.virtual_size <= 0:
        raise InvalidInput("the image's disk is empty")
    return facts
