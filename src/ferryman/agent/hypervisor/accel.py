"""Choosing the accelerator: KVM only when it is proven to boot the guest, else TCG.

An openable /dev/kvm is not proof: under some nested setups a Linux guest hangs in early boot under KVM, or QEMU
aborts setting MSRs. So the verdict comes from booting the boot image this host was handed under KVM, with exactly the
machine options the driver uses, and waiting for the image's ready marker on the serial console; an image without one
cannot prove a KVM boot, so it runs under TCG. The probe QEMU is always killed. The verdict is cached per QEMU
version, host kernel and guest kernel; ``FERRYMAN_ACCEL=kvm|tcg`` overrides everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal, cast

import structlog

from ferryman.agent.hypervisor.boot import BootImage, disable_core_dumps, machine_args
from ferryman.core.errors import InvalidInput
from ferryman.core.models import DiskSpec, VMSpec

Accel = Literal["kvm", "tcg"]
ACCEL_ENV = "FERRYMAN_ACCEL"
_PROBE_VM = VMSpec(
    vm_id="00000000-0000-0000-0000-00000000ac01",
    name="kvm-probe",
    vcpus=1,
    memory_mb=128,
    disks=(DiskSpec(1024 * 1024),),
    canary="kvm-probe",
    dirty_kib_per_s=0,
)

log = structlog.get_logger("ferryman.agent.accel")


def detect_accel(
    image: BootImage,
    cache_dir: Path,
    qemu_binary: str = "qemu-system-x86_64",
    timeout: float = 15.0,
) -> Accel:
    """``"kvm"`` if a KVM boot of ``image`` shows its ready marker within ``timeout`` s, else ``"tcg"`` (cached)."""
    override = os.environ.get(ACCEL_ENV, "").strip()
    if override:
        if override not in ("kvm", "tcg"):
            raise InvalidInput(f"bad {ACCEL_ENV}={override!r}: use kvm or tcg")
        return cast(Accel, override)
    if not kvm_usable():
        return "tcg"
    if image.ready_marker is None:
        log.warning("the boot image names no ready marker, so a KVM boot cannot be proven; using tcg")
        return "tcg"
    cache_file = cache_dir / "accel" / f"{_cache_key(image, qemu_binary)}.json"
    try:
        cached = json.loads(cache_file.read_text())["accel"]
        if cached in ("kvm", "tcg"):
            return cast(Accel, cached)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    verdict: Accel = "kvm" if probe_kvm(image, qemu_binary, timeout) else "tcg"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"accel": verdict, "qemu": _qemu_version(qemu_binary), "kernel": str(image.kernel)}))
    tmp.replace(cache_file)
    log.info("accelerator probed", accel=verdict, cache=str(cache_file))
    return verdict


def kvm_usable() -> bool:
    """Whether /dev/kvm exists and this process may open it read-write."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def probe_kvm(image: BootImage, qemu_binary: str, timeout: float) -> bool:
    """Boot the guest under KVM as a child process; True once it prints its ready marker. The child never outlives
    this call."""
    if image.ready_marker is None:
        return False
    with tempfile.TemporaryDirectory(prefix="ferryman-kvm-probe-") as tmp:
        console, disk = Path(tmp) / "console.log", Path(tmp) / "disk.raw"
        with disk.open("wb") as fh:
            fh.truncate(_PROBE_VM.disks[0].size_bytes)
        argv = [qemu_binary, "-uuid", _PROBE_VM.vm_id]
        argv += machine_args(
            "kvm",
            memory_mb=_PROBE_VM.memory_mb,
            vcpus=_PROBE_VM.vcpus,
            console=console,
            disks=[disk],
            boot=image.kernel_boot(_PROBE_VM),
        )
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=disable_core_dumps,  # noqa: PLW1509 - the child must not dump guest memory if it aborts
                start_new_session=True,
            )
        except OSError as err:
            log.warning("kvm probe could not start qemu", error=str(err))
            return False
        try:
            return _wait_ready(proc, console, image.ready_marker.encode(), timeout)
        finally:
            proc.kill()
            _, stderr = proc.communicate(timeout=10)
            if stderr.strip():
                log.debug("kvm probe qemu stderr", stderr=stderr.decode(errors="replace").strip())


def _wait_ready(proc: subprocess.Popen[bytes], console: Path, marker: bytes, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if console.exists() and marker in console.read_bytes():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def _qemu_version(qemu_binary: str) -> str:
    try:
        done = subprocess.run([qemu_binary, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.splitlines()[0] if done.stdout else "unknown"


def _cache_key(image: BootImage, qemu_binary: str) -> str:
    kernel = image.kernel.stat()
    parts = (_qemu_version(qemu_binary), platform.release(), str(image.kernel.resolve()), str(kernel.st_size))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
