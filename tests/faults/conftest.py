"""The fault-injection lab and the table of its results.

One lab for the session, on its own ports: a controller started with failpoints on (``FERRYMAN_FAILPOINTS_DIR``) and
two hosts. When the run is root, host-b's storage is a small loop-mounted ext4 filesystem, so a test can fill the
destination's disk for real. Every case appends a :class:`Row`; the table is printed at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ferryman.lab.lab import Lab
from ferryman.testing.loopfs import loop_mount

PORT, AGENT_PORT = 21443, 21444
HOST_B_FS_MIB = 256
INVARIANTS = ("one_copy", "generation", "records", "residue", "alarm", "nic_rules")


@dataclass
class FaultLab:
    lab: Lab
    failpoints: Path
    host_b_fs: Path | None  # mount point of host-b's own filesystem; None when loop devices are not available

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.lab.controller_dir / 'cmdb.sqlite'}"


@dataclass
class Row:
    """One case of the matrix as it ran: outcome, time from the fault to the outcome, and each invariant's check."""

    fault: str
    phase: str
    expected: str
    outcome: str = "-"
    seconds: float | None = None
    acked: int = 0  # records the guest acknowledged (all must be on the disk of record)
    checks: dict[str, str] = field(default_factory=dict)  # invariant -> "ok", "FAIL: why", "waived: why"
    verdict: str = "pass"
    note: str = ""


TABLE = pytest.StashKey[list[Row]]()


@pytest.fixture(scope="session")
def fault_table(request: pytest.FixtureRequest) -> list[Row]:
    return request.config.stash.setdefault(TABLE, [])


def _loop_devices_usable() -> bool:
    return os.geteuid() == 0 and all(shutil.which(tool) for tool in ("losetup", "mkfs.ext4", "mount"))


@pytest.fixture(scope="session")
def fault_lab(
    tmp_path_factory: pytest.TempPathFactory, release_after_last_user: Callable[[str, Callable[[], None]], None]
) -> Iterator[FaultLab]:
    """Controller with failpoints on port 21443, host-a and host-b (agents on 21444), no VM yet; shut down after
    the last case."""
    base = tmp_path_factory.mktemp("faults")
    failpoints = base / "failpoints"
    failpoints.mkdir()
    with contextlib.ExitStack() as stack:
        mount = None
        if _loop_devices_usable():
            mount = stack.enter_context(loop_mount(base / "host-b.img", size_mib=HOST_B_FS_MIB, remove_image=True))
        lab = Lab(
            base / "lab",
            say=lambda msg: print(msg, file=sys.stderr),
            host_storage={"host-b": mount / "host"} if mount else None,
            # the matrix disrupts one host pair on purpose, case after case: the breaker would stop it after three
            controller_env={"FERRYMAN_FAILPOINTS_DIR": str(failpoints), "FERRYMAN_GOVERNOR_BREAKER_THRESHOLD": "1000"},
        )
        stack.callback(lab.down, quiet=True)
        lab.up(hosts=2, vms=0, port=PORT, agent_port=AGENT_PORT)
        release_after_last_user("fault_lab", stack.close)
        yield FaultLab(lab, failpoints, mount)


def _cell(check: str | None) -> str:
    if check is None:
        return "-"
    if check == "ok":
        return "ok"
    return "waived" if check.startswith("waived") else "FAIL"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    rows = config.stash.get(TABLE, [])
    if not rows:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fault injection: fault x phase -> outcome, invariants")
    header = ["fault", "phase", "expected", "outcome", "secs", "acked", *INVARIANTS, "verdict"]
    lines = [
        [
            r.fault,
            r.phase,
            r.expected,
            r.outcome,
            "-" if r.seconds is None else f"{r.seconds:.0f}",
            r.acked,
            *(_cell(r.checks.get(name)) for name in INVARIANTS),
            r.verdict,
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines, strict=True)]
    for line in [header, ["-" * w for w in widths], *lines]:
        write("| " + " | ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)) + " |")
    notes = [(r, r.note, {k: v for k, v in r.checks.items() if v != "ok"}) for r in rows]
    if any(note or details for _, note, details in notes):
        write("")
        write("notes:")
        for r, note, details in notes:
            if note or details:
                text = "; ".join([*([note] if note else []), *(f"{k}: {v}" for k, v in details.items())])
                write(f"  {r.fault} @ {r.phase}: {text}")
