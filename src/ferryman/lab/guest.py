"""Builds the lab's test guest: a Debian cloud kernel plus a tiny busybox initramfs.

The guest exists to be migrated and checked (see ``guest_init.sh``): it dirties memory, keeps a canary in RAM and
appends acknowledged, numbered records to its raw disk. It gives each virtio-net NIC the static addresses its SMBIOS
serial names (:func:`ferryman.core.bootparams.nic_words`) and has busybox's ``ip``, ``ping``, ``arping``, ``nc``,
``udhcpc`` and ``udhcpd`` on the guest agent's PATH, for network tests to run through ``guest-exec``
(:mod:`ferryman.testing.guest_exec`). Agents know nothing of it: the lab hands each agent the image
as a boot image (:class:`GuestImage`, whose command line carries the guest's workload parameters) and the reader of
its records as a guest probe (:class:`ferryman.lab.records.DiskRecordsProbe`). The kernel comes from the Debian package
``linux-image-cloud-amd64`` resolved through apt, downloaded and unpacked into the cache; nothing is installed on the
host. Builds are keyed on a hash of the init script and builder version (bump it when the archive's contents change,
e.g. :data:`MODULES`), so an edit to the script yields a new image while an unchanged one is returned at once without
calling apt.

This module must not start VMs; :mod:`ferryman.agent.hypervisor` does that.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ferryman.agent.hypervisor.boot import BootImage
from ferryman.core.errors import PermanentError

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
# Dependency order; guest_init.sh loads them in this order with insmod (the three network modules only when the VM
# has a virtio-net device).
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",  # failover, net_failover: what virtio_net links against
    "net_failover",
    "virtio_net",  # the VM's NICs
    "virtio_blk",
    "virtio_console",  # the guest agent's virtio-serial port
)
GUEST_AGENT_PACKAGE = "qemu-guest-agent"
GUEST_AGENT = "usr/sbin/qemu-ga"
BUSYBOX = Path("/bin/busybox")
_BUILDER_VERSION = "3"
_PT_INTERP = 3
_COMMAND_TIMEOUT = 300.0
READY_MARKER = "FERRYMAN-GUEST-READY"  # guest_init.sh prints it on the serial console once it runs
# Boots fast on a serial console and passes the workload knobs guest_init.sh reads; each VM's values fill ${...}.
GUEST_CMDLINE = (
    "console=ttyS0 quiet panic=-1 i8042.noaux i8042.nokbd i8042.nopnp no_timer_check"
    " ferryman.vm=${vm_id} ferryman.canary=${canary} ferryman.dirty_kib=${dirty_kib_per_s}"
    " ferryman.interval_ms=${record_interval_ms} ferryman.resident_mib=${resident_mib}"
)


class GuestBuildError(PermanentError):
    """The guest image could not be built (apt, dpkg-deb or a missing file)."""


@dataclass(frozen=True)
class GuestImage(BootImage):
    """The lab guest as a boot image: its kernel and initrd, and the command line that passes each VM's workload."""

    cmdline: str = GUEST_CMDLINE
    ready_marker: str | None = READY_MARKER


def default_cache_dir() -> Path:
    """``$FERRYMAN_CACHE_DIR`` or ``~/.cache/ferryman``."""
    env = os.environ.get("FERRYMAN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "ferryman"


def init_script() -> bytes:
    """The guest's /init, shipped as package data."""
    return resources.files("ferryman.lab").joinpath("guest_init.sh").read_bytes()


def ensure_guest(cache_dir: Path | None = None) -> GuestImage:
    """Return the guest image for the current init script, building it into ``<cache>/guest/`` if needed."""
    root = (cache_dir or default_cache_dir()) / "guest"
    root.mkdir(parents=True, exist_ok=True)
    script = init_script()
    key = hashlib.sha256(_BUILDER_VERSION.encode() + b"\0" + script).hexdigest()[:16]
    out = root / key
    image = GuestImage(kernel=out / "vmlinuz", initrd=out / "initrd.img")
    if (out / "manifest.json").exists():
        return image
    with locked(root / ".lock"):
        if (out / "manifest.json").exists():
            return image
        work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))
        try:
            _build(script, root / "debs", work)
            work.chmod(0o755)
            work.rename(out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return image


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if needed) for the block: one build of a cache entry at a time."""
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(script: bytes, debs: Path, work: Path) -> None:
    package = resolve_kernel_package()
    deb = fetch_deb(package, debs)
    tree = work / "tree"
    _run(["dpkg-deb", "-x", str(deb), str(tree)])
    vmlinuz = _single(sorted((tree / "boot").glob("vmlinuz-*")), "vmlinuz", deb)
    modules = {name: _module_bytes(tree, name) for name in MODULES}
    busybox = _static_busybox(BUSYBOX)
    agent_deb = fetch_deb(GUEST_AGENT_PACKAGE, debs)
    _run(["dpkg-deb", "-x", str(agent_deb), str(tree)])
    extra = guest_agent_files(tree / GUEST_AGENT)
    shutil.copyfile(vmlinuz, work / "vmlinuz")
    (work / "initrd.img").write_bytes(build_initramfs(script, busybox, modules, extra))
    shutil.rmtree(tree)
    manifest = {
        "package": package,
        "deb": deb.name,
        "kernel": vmlinuz.name,
        "modules": list(MODULES),
        "guest_agent": agent_deb.name,
        "files": sorted(extra),
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def guest_agent_files(binary: Path) -> dict[str, bytes]:
    """``qemu-ga`` and the shared libraries it needs (with the loader), by their path in the guest: the guest runs
    Debian's own agent, linked against this Debian's libraries."""
    files = {GUEST_AGENT: binary.read_bytes()}
    out = _run(["ldd", str(binary)])
    for line in out.splitlines():
        if "not found" in line:
            raise GuestBuildError(f"qemu-ga needs a library this host lacks: {line.strip()}")
        match = re.search(r"(/\S+) \(0x", line)
        if match is None:
            continue  # linux-vdso: the kernel's
        library = Path(match.group(1))
        files[str(library).lstrip("/")] = library.resolve().read_bytes()
    return files


def resolve_kernel_package(meta: str = KERNEL_META_PACKAGE) -> str:
    """The versioned kernel package the meta package depends on, e.g. ``linux-image-6.1.0-56-cloud-amd64``."""
    out = _run(["apt-cache", "depends", meta])
    for line in out.splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if match:
            return match.group(1)
    raise GuestBuildError(f"apt-cache depends {meta} names no linux-image package:\n{out}")


def fetch_deb(package: str, debs: Path) -> Path:
    """The package's .deb in ``debs``: reuse one already there or in apt's cache, else ``apt-get download``."""
    debs.mkdir(parents=True, exist_ok=True)
    pattern = f"{package}_*.deb"
    found = sorted(debs.glob(pattern)) or sorted(Path("/var/cache/apt/archives").glob(pattern))
    if found:
        if found[-1].parent != debs:
            shutil.copyfile(found[-1], debs / found[-1].name)
        return debs / found[-1].name
    _run(["apt-get", "download", "-q", package], cwd=debs)
    return _single(sorted(debs.glob(pattern)), f"{package} .deb", debs)


def _module_bytes(tree: Path, name: str) -> bytes:
    candidates = [p for p in (tree / "lib" / "modules").rglob(f"{name}.ko*") if p.name.split(".ko")[0] == name]
    path = _single(candidates, f"module {name}", tree)
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    return data


def _static_busybox(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise GuestBuildError(f"cannot read {path}: {err}; install busybox-static") from err
    if data[:5] != b"\x7fELF\x02":
        raise GuestBuildError(f"{path} is not a 64-bit ELF binary; install busybox-static")
    # A dynamically linked binary has a PT_INTERP program header naming its loader; the guest has no loader.
    phoff, phentsize, phnum = struct.unpack_from("<Q", data, 0x20)[0], *struct.unpack_from("<HH", data, 0x36)
    for index in range(phnum):
        if struct.unpack_from("<I", data, phoff + index * phentsize)[0] == _PT_INTERP:
            raise GuestBuildError(f"{path} is dynamically linked; install busybox-static")
    return data


def _single(paths: list[Path], what: str, where: Path) -> Path:
    if len(paths) != 1:
        raise GuestBuildError(f"expected one {what} in {where}, found {[str(p) for p in paths]}")
    return paths[0]


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise GuestBuildError(f"{argv[0]} failed: {err}") from err
    if done.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def build_initramfs(
    init: bytes, busybox: bytes, modules: dict[str, bytes], extra: dict[str, bytes] | None = None
) -> bytes:
    """A gzip-compressed cpio (newc) archive: /init, /bin/busybox, /dev/console, ``/lib/modules/<name>.ko`` and the
    ``extra`` files (path in the guest -> bytes, executable), with every directory they need.

    /dev/console is in the archive because the kernel opens it for PID 1's stdio before /init can mount devtmpfs.
    """
    archive = _Cpio()
    directories = {"bin", "dev", "proc", "sys", "run", "tmp", "lib", "lib/modules"}
    for path in extra or {}:
        parts = path.split("/")[:-1]
        directories.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    for directory in sorted(directories, key=lambda d: (d.count("/"), d)):
        archive.add(directory, _S_IFDIR | 0o755)
    archive.add("dev/console", _S_IFCHR | 0o600, rdev=(5, 1))
    archive.add("init", _S_IFREG | 0o755, init)
    archive.add("bin/busybox", _S_IFREG | 0o755, busybox)
    for name, data in modules.items():
        archive.add(f"lib/modules/{name}.ko", _S_IFREG | 0o644, data)
    for path, data in sorted((extra or {}).items()):
        archive.add(path, _S_IFREG | 0o755, data)
    return gzip.compress(archive.finish(), compresslevel=6, mtime=0)


_S_IFDIR = 0o040000
_S_IFREG = 0o100000
_S_IFCHR = 0o020000


class _Cpio:
    """Writes the "newc" cpio format the kernel unpacks; deterministic (mtime 0, uid/gid 0)."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._ino += 1
        self._buf.write(b"070701" + b"".join(b"%08X" % value for value in fields))
        self._buf.write(encoded)
        self._pad()
        self._buf.write(data)
        self._pad()

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return self._buf.getvalue()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))
