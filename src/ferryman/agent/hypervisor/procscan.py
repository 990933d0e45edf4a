"""Finding QEMU processes through /proc, independent of who started them.

The agent does not own its QEMU processes (they are daemonized so they outlive it), so it learns what runs from the
kernel: pidfiles say which process a VM should be, /proc says what is really there. Reading /proc is racy by nature:
a process may vanish between two reads, which every function here treats as "not there". Nothing here signals or
changes a process except :func:`kill` and :func:`kill_all` (lab teardown and tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ferryman.core.errors import HypervisorError

PROC = Path("/proc")


@dataclass(frozen=True)
class QemuProcess:
    """One live ``qemu-system-*`` process and its command line."""

    pid: int
    argv: tuple[str, ...]

    def option(self, flag: str) -> str | None:
        """The value following ``flag`` (e.g. ``-uuid``) on the command line, or None."""
        return option_value(self.argv, flag)

    @property
    def uuid(self) -> str | None:
        return self.option("-uuid")

    @property
    def name(self) -> str | None:
        """The guest name from ``-name <name>[,opts]``."""
        value = self.option("-name")
        if value is None:
            return None
        for part in value.split(","):
            if part.startswith("guest="):
                return part.removeprefix("guest=")
            if "=" not in part:
                return part
        return None

    def references(self, directory: Path) -> bool:
        """Whether any argument names ``directory`` or a path below it."""
        # The path must start an argument or an option value, and end there or continue with '/'.
        pattern = re.compile(r"(?:^|[=:,])" + re.escape(str(directory)) + r"(?:/|,|$)")
        return any(pattern.search(arg) for arg in self.argv)


def option_value(argv: Sequence[str], flag: str) -> str | None:
    for index, arg in enumerate(argv[:-1]):
        if arg in (flag, f"-{flag}"):
            return argv[index + 1]
    return None


def read_argv(pid: int) -> tuple[str, ...] | None:
    """The command line of a live process, or None if it is gone or a zombie."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None
    return tuple(part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0"))


def is_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    # The state letter follows the command name, which is in parentheses and may itself contain ')'.
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] not in ("Z", "X")


def scan_qemu() -> list[QemuProcess]:
    """Every live ``qemu-system-*`` process on this host."""
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        argv = read_argv(pid)
        if argv and Path(argv[0]).name.startswith("qemu-system-") and is_alive(pid):
            found.append(QemuProcess(pid=pid, argv=argv))
    return found


def read_pidfile(path: Path) -> int | None:
    """The pid in a pidfile, or None if the file is missing or malformed."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def qemu_at(pidfile: Path) -> QemuProcess | None:
    """The live QEMU process a pidfile names, if it is still the one that wrote it (guards against pid reuse)."""
    pid = read_pidfile(pidfile)
    if pid is None or not is_alive(pid):
        return None
    argv = read_argv(pid)
    if argv is None or option_value(argv, "-pidfile") != str(pidfile):
        return None
    return QemuProcess(pid=pid, argv=argv)


def kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Send ``sig`` to ``pid``; a process that is already gone is not an error."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


async def wait_exit(pid: int, seconds: float) -> bool:
    """Poll until ``pid`` is gone (it is not our child, so it cannot be awaited); False after ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while is_alive(pid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def kill_all(state_dir: Path, wait_seconds: float = 10.0) -> list[int]:
    """SIGKILL every QEMU process that references ``state_dir`` (its VMs and any stray copy); returns their pids.

    For lab teardown and tests only: no QMP, no grace period.
    """
    root = await asyncio.to_thread(state_dir.resolve)
    victims = [proc.pid for proc in await asyncio.to_thread(scan_qemu) if proc.references(root)]
    for pid in victims:
        kill(pid, signal.SIGKILL)
    for pid in victims:
        if not await wait_exit(pid, wait_seconds):
            raise HypervisorError(f"QEMU pid {pid} survived SIGKILL")
    return victims
