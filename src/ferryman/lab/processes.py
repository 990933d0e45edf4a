"""Starting and stopping the lab's daemons, and finding QEMU processes that belong to a directory.

Every wait is bounded; a process that ignores SIGTERM gets SIGKILL. A pid is only signalled after checking, in
/proc, that it still is the process we started (pids are reused).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def spawn(args: list[str], log_file: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a daemon in its own session (it outlives the CLI), stdout and stderr appended to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    return proc


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _run_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def is_alive(pid: int, marker: str) -> bool:
    """True if ``pid`` runs and its command line contains ``marker`` (guards against pid reuse)."""
    # a process that has just exec'd can show an empty command line for a moment: look again, a bounded number of times
    for _ in range(40):
        state = _run_state(pid)
        if state is None or state == "Z":
            return False
        args = cmdline(pid)
        if args:
            return any(marker in a for a in args)
        time.sleep(0.025)
    return False


def stop(pid: int, marker: str, timeout_s: float = 10.0) -> bool:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL. Returns True if the process is gone."""
    if not is_alive(pid, marker):
        return True
    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            if not is_alive(pid, marker):
                return True
            time.sleep(0.1)
    return not is_alive(pid, marker)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def qemu_pids_under(directory: Path) -> list[int]:
    """Pids of every qemu-system process whose command line mentions ``directory``."""
    needle = str(directory.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        args = cmdline(int(entry.name))
        if args and Path(args[0]).name.startswith("qemu-system") and any(needle in a for a in args):
            found.append(int(entry.name))
    return found


def kill_qemus_under(directory: Path, timeout_s: float = 10.0) -> int:
    """Stop every QEMU of ``directory``; returns how many there were. Raises RuntimeError if one survives."""
    pids = qemu_pids_under(directory)
    for pid in pids:
        stop(pid, str(directory.resolve()), timeout_s)
    left = qemu_pids_under(directory)
    if left:
        raise RuntimeError(f"QEMU processes survived SIGKILL: {left}")
    return len(pids)
