"""The migration protocol under fault injection: hold the runner in one phase, strike, let go, and check the
invariants of DESIGN.md once the migration has ended.

Faults: SIGKILL of the controller (restarted: recovery), of the source or destination agent (restarted once the
runner has tripped over its absence), of the source or destination QEMU; a failing pre-migration hook; the
destination's filesystem full. After the migration ended (within a bound) every case checks:

* one_copy    exactly one live QEMU of the VM, on the host the CMDB names, and it runs (its disk records advance);
* generation  the CMDB places the VM on the source at generation 1 (not committed) or on the destination at 2
              (committed), and the running copy's own spec carries that generation;
* records     every record the guest acknowledged on either console is on that host's disk, with no gap;
* residue     the losing host keeps no directory or snapshot of the VM;
* alarm       a STUCK migration raised an operator alarm;
* nic_rules   (a VM with a NIC) its NIC's nftables table is on the host of record, verified, and on no other host.

Each VM is fresh (so no back-off carries over), and the lab's controller runs with the circuit breaker's threshold
raised (``FERRYMAN_GOVERNOR_BREAKER_THRESHOLD``): the matrix disrupts the same host pair on purpose dozens of times,
and every case is an experiment of its own, not an attempt at thrashing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from ferryman.agent.hypervisor import procscan
from ferryman.client import CliError
from ferryman.cmdb.engine import create_engine
from ferryman.cmdb.sql import SqlRepository
from ferryman.controller.keys import Copy, DiskKeys
from ferryman.core.clock import SystemClock
from ferryman.core.errors import NotFound
from ferryman.lab import processes
from ferryman.lab.records import missing_seqs, read_acks, read_last_seq, read_records
from ferryman.testing.wait import wait_for

from .conftest import FaultLab, Row

pytestmark = [pytest.mark.lab, pytest.mark.qemu]

Fault = Literal["controller", "source-agent", "dest-agent", "source-qemu", "dest-qemu", "pre-hook", "disk-full"]
SOURCE, DEST = "host-a", "host-b"
OUTCOME_WITHIN_S = 240.0  # from the fault to the migration's outcome: post-commit retries take ~30 s at most
AGENT_DOWN_AT_MOST_S = 30.0
TRANSFER_MIB_S = 8  # slow enough that a fault held in TRANSFERRING strikes while RAM is still on the wire

REBOOTED = "the copy of record's QEMU died and was booted again from its disks"


@dataclass(frozen=True)
class Case:
    """One cell of the matrix. ``phase`` is where the runner is held; ``rolling_back/<step>``: held in the rollback
    before that step, the rollback started by a cancel in MIRRORING or, with ``rollback_from="switched_over"``, by a
    controller restart in SWITCHED_OVER. ``waive``: invariants the expected outcome cannot meet, with the reason
    printed in the table. ``bug``: a defect this case reveals (strict xfail; ``expect`` is the correct outcome)."""

    fault: Fault
    phase: str
    expect: str
    waive: dict[str, str] = field(default_factory=dict)
    bug: str | None = None
    note: str = ""
    rollback_from: str = "mirroring"
    encrypted: bool = False  # the VM's disks are LUKS-encrypted: every restart needs its copy's key
    networked: bool = False  # the VM has a NIC: its tap and rules are made on the destination at its preparation

    @property
    def label(self) -> str:
        label = self.phase + (f" (from {self.rollback_from})" if self.rollback_from != "mirroring" else "")
        return label + (" +encrypted" if self.encrypted else "") + (" +nic" if self.networked else "")

    @property
    def id(self) -> str:
        return f"{self.fault}@{self.label}".replace(" +", "+")

    def param(self, *marks: pytest.MarkDecorator) -> Any:
        extra = [pytest.mark.xfail(reason=self.bug, strict=True)] if self.bug else []
        return pytest.param(self, id=self.id, marks=[*marks, *extra])


# ---------------------------------------------------------------------------------------------------------- matrix

CASES: list[Case] = [
    # the controller dies: recovery rolls back before the commit, forward after it
    *(
        Case("controller", p, "rolled_back")
        for p in ["admitted", "snapshotted", "dest_prepared", "pre_hooks_passed", "mirroring", "transferring"]
    ),
    Case("controller", "switched_over", "rolled_back"),
    *(
        Case("controller", p, "done")
        for p in ["committed", "activated", "source_retired", "scrubbed", "post_hooks_passed"]
    ),
    Case("controller", "rolling_back/kill_destination", "rolled_back"),
    Case("controller", "rolling_back/resume_source", "rolled_back"),
    Case(
        "controller",
        "rolling_back/resume_source",
        "rolled_back",
        rollback_from="switched_over",
        note="the source was paused by the switch-over; the restarted rollback resumes it",
    ),
    # an agent dies and comes back once the runner has tripped over its absence
    Case("source-agent", "admitted", "rolled_back", note="the snapshot finds no source agent"),
    *(Case("source-agent", p, "rolled_back") for p in ["snapshotted", "mirroring", "transferring"]),
    *(
        Case("source-agent", p, "done", note="the runner needs the source again only after the commit")
        for p in ["switched_over"]
    ),
    *(Case("source-agent", p, "done") for p in ["committed", "activated", "source_retired"]),
    Case("source-agent", "rolling_back/kill_destination", "rolled_back"),
    Case("dest-agent", "dest_prepared", "rolled_back", note="the destination's pre-hook finds no agent"),
    *(
        Case(
            "dest-agent",
            p,
            "rolled_back",
            note="the commit needs the destination's word that it holds the complete paused copy; with no agent "
            "to give it, the source resumes rather than keep the guest paused",
        )
        for p in ["mirroring", "transferring", "switched_over"]
    ),
    *(Case("dest-agent", p, "done") for p in ["committed", "activated", "scrubbed"]),
    Case("dest-agent", "rolling_back/kill_destination", "rolled_back"),
    # a QEMU dies
    *(Case("source-qemu", p, "rolled_back", note=REBOOTED) for p in ["dest_prepared", "mirroring", "transferring"]),
    *(
        Case("source-qemu", p, "done", note="the destination already holds the complete copy")
        for p in ["switched_over", "committed", "activated"]
    ),
    *(Case("dest-qemu", p, "rolled_back") for p in ["dest_prepared", "mirroring", "transferring"]),
    Case("dest-qemu", "switched_over", "rolled_back", note="the commit checks the destination first"),
    *(Case("dest-qemu", p, "done", note=REBOOTED) for p in ["committed", "activated"]),
    Case("dest-qemu", "rolling_back/kill_destination", "rolled_back"),
    # a hook vetoes, the destination's disk is full
    Case("pre-hook", "dest_prepared", "rolled_back", note="a pre-migrate-source hook exits 1: a veto"),
    Case("disk-full", "admitted", "rolled_back", note="host-b full before prepare: its nonce store cannot be written"),
    Case("disk-full", "dest_prepared", "rolled_back", note="host-b full before the disk mirror"),
    # an encrypted VM: restarts, validation and scrubs need or destroy its copies' keys
    Case("controller", "activated", "done", encrypted=True),
    Case("source-qemu", "mirroring", "rolled_back", note=REBOOTED, encrypted=True),
    Case("dest-qemu", "transferring", "rolled_back", encrypted=True),
    Case("dest-qemu", "committed", "done", note=REBOOTED, encrypted=True),
    # a VM with a NIC: the destination's tap and verified rules exist from its preparation on; a rollback removes
    # them, a commit keeps them and removes the source's
    Case("dest-agent", "dest_prepared", "rolled_back", networked=True, note="killed right after its rules were made"),
    Case("controller", "dest_prepared", "rolled_back", networked=True),
    Case("dest-qemu", "transferring", "rolled_back", networked=True),
    Case("controller", "activated", "done", networked=True),
    Case("dest-qemu", "committed", "done", note=REBOOTED, networked=True),
    Case("source-agent", "committed", "done", networked=True, note="the source's rules go when it retires"),
]

SAMPLE = [
    "controller@transferring",
    "controller@activated",
    "dest-qemu@transferring",
    "dest-qemu@committed+encrypted",
    "dest-agent@dest_prepared+nic",
]


@pytest.mark.faults
@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_fault_matrix(case: Case, fault_lab: FaultLab, fault_table: list[Row]) -> None:
    """Whatever fails and whenever, the migration ends and the invariants hold (or the case's reason says why not)."""
    run_case(fault_lab, case, fault_table)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", [c.param() for c in CASES if c.id in SAMPLE])
def test_fault_sample(case: Case, fault_lab: FaultLab, fault_table: list[Row]) -> None:
    """A sample of the matrix for the default suite: roll back, roll forward, and a destination that dies."""
    run_case(fault_lab, case, fault_table)


# ------------------------------------------------------------------------------------------------------ one case


@dataclass
class Run:
    """What a case observed while it ran."""

    vm_name: str
    vm_id: str
    migration_id: str = ""
    acked: int = 0  # highest record number the guest acknowledged on any console
    fault_at: float = 0.0


def run_case(fl: FaultLab, case: Case, table: list[Row]) -> None:
    if case.fault == "disk-full" and fl.host_b_fs is None:
        pytest.skip("filling host-b's disk needs its own loop-mounted filesystem (root, util-linux)")
    row = Row(case.fault, case.label, case.expect, note=case.note)
    table.append(row)
    ready_lab(fl)
    api = fl.lab.api()
    name = f"f-{uuid.uuid4().hex[:8]}"
    vm = api.post(
        "/api/v1/vms",
        {
            "name": name,
            "tenant": "acme",
            "memory": "128",
            "disk": "32M",
            "host": SOURCE,
            "record_interval_ms": 250,
            "encrypted": case.encrypted,
            "networks": [{"network": fault_network(fl)}] if case.networked else [],
        },
    )
    run = Run(name, vm["id"])
    try:
        try:
            drive(fl, case, run, row)
        except BaseException:
            row.verdict = "ERROR"
            raise
        failures = check(fl, case, run, row)
        row.verdict = ("xfail: " if case.bug else "FAIL: ") + ", ".join(failures) if failures else "pass"
        if case.bug and not failures:
            row.verdict = "XPASS"
        assert not failures, f"{case.id}: {failures}: {row.checks}"
    finally:
        clean_up(fl, run)


def drive(fl: FaultLab, case: Case, run: Run, row: Row) -> None:
    """Start the migration, hold it where the case says, inject the fault, release, and wait for the outcome."""
    lab, api, fp = fl.lab, fl.lab.api(), fl.failpoints
    key = disk_key(fl, run.vm_id, SOURCE, 1) if case.encrypted else None
    wait_for(lambda: read_last_seq(disk_of(fl, SOURCE, run.vm_id), key=key) >= 2, 60, "the guest's first records")
    phase, _, step = case.phase.partition("/")
    pause, reached = (
        (f"pause-before-{step}", f"reached-before-{step}") if step else (f"pause-at-{phase}", f"reached-{phase}")
    )
    if case.fault == "pre-hook":
        install_hook(fl, SOURCE, "pre-migrate-source", "echo 'host-a refuses to let go' >&2; exit 1")
    else:
        (fp / pause).touch()
    if step:
        (fp / f"pause-at-{case.rollback_from}").touch()
    body: dict[str, Any] = {"to": DEST}
    if phase == "transferring":
        body["bandwidth_mib_s"] = TRANSFER_MIB_S
    run.migration_id = api.post(f"/api/v1/vms/{run.vm_name}/migrate", body)["id"]
    if step:  # start the rollback this case strikes: a cancel, or a controller restart (recovery)
        start = fp / f"pause-at-{case.rollback_from}"
        held(fl, run, fp / f"reached-{case.rollback_from}", f"{case.rollback_from}")
        if case.rollback_from == "mirroring":
            api.post(f"/api/v1/migrations/{run.migration_id}/cancel")
            start.unlink()
        else:
            state = lab.load_state()
            assert state is not None and state.controller_pid is not None
            sigkill(state.controller_pid)
            start.unlink()
            lab.restart_controller()
    if case.fault != "pre-hook":
        held(fl, run, fp / reached, f"the runner to hold at {pause}")
    observe_acks(fl, run)
    run.fault_at = time.monotonic()
    release = (fp / pause).unlink
    match case.fault:
        case "controller":
            state = lab.load_state()
            assert state is not None and state.controller_pid is not None
            sigkill(state.controller_pid)
            release(missing_ok=True)
            lab.restart_controller()
        case "source-agent" | "dest-agent":
            host = SOURCE if case.fault == "source-agent" else DEST
            state = lab.load_state()
            assert state is not None
            sigkill(state.agents[host])
            release()
            # the agent stays down until the runner has tripped over its absence (a step failed), then restarts
            poll(lambda: (m := migration(fl, run)).get("error") or m["outcome"], AGENT_DOWN_AT_MOST_S)
            lab.start_agent(state, host)
            lab.wait_host_up(host)
        case "source-qemu" | "dest-qemu":
            host = SOURCE if case.fault == "source-qemu" else DEST
            pids = qemus_of(fl, run.vm_id).get(host, [])
            assert pids, f"no QEMU of the VM on {host} to kill"
            for pid in pids:
                sigkill(pid)
            release()
        case "disk-full":
            fill_filesystem(fl)
            release()
        case "pre-hook":
            pass
    deadline = run.fault_at + OUTCOME_WITHIN_S
    while not (m := migration(fl, run))["outcome"]:
        observe_acks(fl, run)
        if time.monotonic() > deadline:
            row.outcome = f"none after {OUTCOME_WITHIN_S:.0f}s ({m['phase']})"
            pytest.fail(f"{case.id}: no outcome {OUTCOME_WITHIN_S:.0f}s after the fault: phase {m['phase']}, {m}")
        time.sleep(0.5)
    row.outcome, row.seconds = m["outcome"], time.monotonic() - run.fault_at


def check(fl: FaultLab, case: Case, run: Run, row: Row) -> list[str]:
    """Fill ``row.checks``; return the names of the invariants that failed (waived ones excepted)."""
    api = fl.lab.api()
    detail = api.get(f"/api/v1/migrations/{run.migration_id}")
    committed = any(step["phase"] == "committed" for step in detail["steps"])
    home, other = (DEST, SOURCE) if committed else (SOURCE, DEST)
    vm = api.get(f"/api/v1/vms/{run.vm_name}")
    disk = disk_of(fl, home, run.vm_id)
    results: dict[str, str | None] = {}
    key = disk_key(fl, run.vm_id, home, 2 if committed else 1) if case.encrypted else None

    # one copy: a single live QEMU, on the CMDB's host, running (its records advance); never two, whatever happened
    before = read_last_seq(disk, key=key) if disk.exists() else 0
    advanced = poll(lambda: disk.exists() and read_last_seq(disk, key=key) > before, 15)
    copies = qemus_of(fl, run.vm_id)
    live = sum(len(p) for p in copies.values())
    where = ", ".join(f"{h}:{len(p)}" for h, p in sorted(copies.items())) or "none"
    if live > 1:
        results["one_copy"] = f"FAIL: {live} live QEMUs ({where})"
    elif live == 1 and copies.get(home) and advanced:
        results["one_copy"] = "ok"
    else:
        results["one_copy"] = f"FAIL: {live} live ({where}), records {'advance' if advanced else 'stalled'}"

    # generation: CMDB placement and generation agree with the commit; the running copy's spec too
    expected = (home, 2 if committed else 1)
    spec_file = fl.lab.host_dir(home) / "vms" / run.vm_id / "spec.json"
    spec_generation = read_generation(spec_file)
    if (vm["host"], vm["generation"]) != expected:
        results["generation"] = f"FAIL: CMDB says {vm['host']} gen {vm['generation']}, expected {expected}"
    elif spec_generation not in (None, expected[1]):
        results["generation"] = f"FAIL: {home}'s spec has generation {spec_generation}, CMDB {expected[1]}"
    else:
        results["generation"] = "ok"

    # records: everything acknowledged is on the disk of record, without a gap
    observe_acks(fl, run)
    if not disk.exists():
        results["records"] = f"FAIL: no disk on {home}"
    else:
        missing = missing_seqs(read_records(disk, key=key), [run.acked])
        results["records"] = "ok" if not missing else f"FAIL: {len(missing)} missing, first {missing[:5]}"

    row.acked = run.acked

    if case.networked:  # the NIC's rules: on the host of record (as the CMDB verified them), on no other host
        nic = vm["nics"][0]
        table = f"fm_nic_{nic['id']}"
        here, there = table in nft_tables(fl, home), table in nft_tables(fl, other)
        if not here or there:
            results["nic_rules"] = f"FAIL: table on {home}: {here}, on {other}: {there}"
        elif nic["rules_host"] != home:
            results["nic_rules"] = f"FAIL: the CMDB says its rules apply on {nic['rules_host']}, not {home}"
        else:
            results["nic_rules"] = "ok"

    # residue: nothing of the VM on the losing host (its directory, its pre-migration snapshots)
    leftovers = [fl.lab.host_dir(other) / kind / run.vm_id for kind in ("vms", "snapshots")]
    kept = [str(path) for path in leftovers if path.exists()]
    if case.encrypted:  # the losing copy's key is destroyed: nothing could decrypt a block it left
        kept += [f"a live key of generation {g}" for g in live_key_generations(fl, run.vm_id, other)]
    results["residue"] = "ok" if not kept else f"FAIL: {other} keeps {', '.join(kept)}"

    # alarm: a stuck migration must have told an operator
    alarms = [
        e["kind"]
        for e in api.get("/api/v1/events", kind="alarm.", limit=500)
        if e["data"].get("migration") == run.migration_id
    ]
    if row.outcome == "stuck":
        stuck_alarm = any(kind.startswith("alarm.migration_stuck") for kind in alarms)
        results["alarm"] = "ok" if stuck_alarm else f"FAIL: stuck without an alarm ({alarms})"
    elif alarms:
        results["alarm"] = f"FAIL: unexpected alarm(s) {alarms}"

    failures = [] if row.outcome == case.expect else [f"outcome {row.outcome} (expected {case.expect})"]
    causes = [step["data"].get("cause") for step in detail["steps"] if step["data"].get("cause")]
    if causes:
        row.note = "; ".join(x for x in (row.note, f"cause: {causes[0]}") if x)
    if row.outcome == "stuck":
        row.note = "; ".join(x for x in (row.note, f"stuck: {detail.get('error')}") if x)
    for name, result in results.items():
        if result is None:
            continue
        shown = result
        if result != "ok" and name in case.waive:
            if name == "one_copy" and live > 1:  # two copies are never excused
                failures.append(name)
            else:
                shown = f"waived: {case.waive[name]} ({result.removeprefix('FAIL: ')})"
        elif result != "ok":
            failures.append(name)
        row.checks[name] = shown
    return failures


# ------------------------------------------------------------------------------------------------------- helpers


def fault_network(fl: FaultLab) -> str:
    """The tenant network the cases' NICs join (created by the first case that needs it)."""
    api = fl.lab.api()
    if not any(n["name"] == "fault-net" for n in api.get("/api/v1/networks")):
        api.post("/api/v1/networks", {"name": "fault-net", "tenant": "acme", "cidr": "10.60.0.0/16"})
    return "fault-net"


def nft_tables(fl: FaultLab, host: str) -> str:
    """``nft list tables`` in the lab host's network namespace."""
    state = fl.lab.load_state()
    assert state is not None
    proc = subprocess.run(
        ["ip", "netns", "exec", f"fm{state.port}-{host}", "nft", "list", "tables"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return proc.stdout


def poll(predicate: Callable[[], Any], timeout_s: float) -> bool:
    """Like :func:`wait_for`, but a condition that never holds is an answer, not a failure."""
    try:
        return bool(wait_for(predicate, timeout_s, "a condition that may never hold", interval_s=0.2))
    except AssertionError:
        return False


def migration(fl: FaultLab, run: Run) -> dict[str, Any]:
    """The migration as the controller reports it; a controller that is restarting answers a moment later."""
    for _ in range(120):
        try:
            result: dict[str, Any] = fl.lab.api().get(f"/api/v1/migrations/{run.migration_id}")
            return result
        except CliError:
            time.sleep(0.5)
    pytest.fail("the controller did not answer for a minute")


def held(fl: FaultLab, run: Run, mark: Path, what: str) -> None:
    """Wait for the runner's failpoint mark; if it never comes, say where the migration went instead."""
    try:
        wait_for(mark.exists, 120, what, interval_s=0.1)
    except AssertionError as err:
        m = fl.lab.api().get(f"/api/v1/migrations/{run.migration_id}")
        raise AssertionError(f"{err}; the migration is {m['phase']} ({m['outcome']}): {m['error']}") from None


def disk_key(fl: FaultLab, vm_id: str, host: str, generation: int) -> bytes | None:
    """The key of an encrypted VM's copy, read from the controller's CMDB and KEKs (None if it has no live key)."""
    repo = SqlRepository(create_engine(fl.db_url))
    try:
        keys = DiskKeys(repo, fl.lab.controller_dir / "keys", SystemClock())
        with contextlib.suppress(NotFound):
            return keys.get(Copy(vm_id, host, generation))
        return None
    finally:
        repo.close()


def live_key_generations(fl: FaultLab, vm_id: str, host: str) -> list[int]:
    repo = SqlRepository(create_engine(fl.db_url))
    try:
        return [k.generation for k in repo.list_disk_keys(vm_id, live_only=True) if k.host == host]
    finally:
        repo.close()


def disk_of(fl: FaultLab, host: str, vm_id: str) -> Path:
    return fl.lab.host_dir(host) / "vms" / vm_id / "disk0.qcow2"


def read_generation(spec_file: Path) -> int | None:
    try:
        return int(json.loads(spec_file.read_text())["generation"])
    except (OSError, ValueError, KeyError):
        return None


def observe_acks(fl: FaultLab, run: Run) -> None:
    """Remember the highest acknowledged record seen on either host's console (they are scrubbed later)."""
    for host in (SOURCE, DEST):
        acks = read_acks(fl.lab.host_dir(host) / "vms" / run.vm_id / "console.log")
        run.acked = max([run.acked, *acks])


def qemus_of(fl: FaultLab, vm_id: str) -> dict[str, list[int]]:
    """Live (not zombie) QEMU processes of the VM, by the lab host whose directory they run from."""
    found: dict[str, list[int]] = {}
    for proc in procscan.scan_qemu():
        if proc.uuid != vm_id:
            continue
        host = next((h for h in (SOURCE, DEST) if proc.references(fl.lab.host_dir(h))), "elsewhere")
        found.setdefault(host, []).append(proc.pid)
    return found


def sigkill(pid: int) -> None:
    """SIGKILL and wait until the process is gone (a zombie counts as gone)."""
    procscan.kill(pid, signal.SIGKILL)
    wait_for(lambda: not procscan.is_alive(pid), 10, f"pid {pid} to die", interval_s=0.1)


def install_hook(fl: FaultLab, host: str, point: str, script: str) -> None:
    hook_dir = fl.lab.host_dir(host) / "hooks" / f"{point}.d"
    hook_dir.mkdir(parents=True, exist_ok=True)
    hook = hook_dir / "50-fault"
    hook.write_text(f"#!/bin/sh\n{script}\n")
    hook.chmod(0o755)


def filler(fl: FaultLab) -> Path | None:
    return None if fl.host_b_fs is None else fl.host_b_fs / "filler"


def fill_filesystem(fl: FaultLab) -> None:
    """Take every free block of host-b's filesystem (root's reserve included) with one preallocated file."""
    path = filler(fl)
    assert path is not None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        for chunk in (64 << 20, 4 << 20, 256 << 10, 4 << 10):
            while True:
                try:
                    os.posix_fallocate(fd, size, chunk)
                except OSError:
                    break
                size += chunk
    finally:
        os.close(fd)
    probe = path.with_name("probe")
    try:
        with probe.open("wb") as fh:
            fh.write(b"x" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        return
    finally:
        probe.unlink(missing_ok=True)
    pytest.fail("host-b's filesystem still takes writes after filling it")


def ready_lab(fl: FaultLab) -> None:
    """Every process up, no failpoint, hook or filler left from an earlier case."""
    lab = fl.lab
    for entry in fl.failpoints.iterdir():
        entry.unlink()
    for host in (SOURCE, DEST):
        shutil.rmtree(lab.host_dir(host) / "hooks", ignore_errors=True)
    if (path := filler(fl)) is not None:
        path.unlink(missing_ok=True)
    alive = lab.running()
    if not alive.get("controller"):
        lab.restart_controller()
    state = lab.load_state()
    assert state is not None
    for host in (SOURCE, DEST):
        if not alive.get(host):
            lab.start_agent(state, host)
            lab.wait_host_up(host)


def clean_up(fl: FaultLab, run: Run) -> None:
    """Delete the case's VM; after a stuck case also whatever the protocol left for an operator."""
    lab = fl.lab
    ready_lab(fl)
    with contextlib.suppress(CliError):
        lab.api().delete(f"/api/v1/vms/{run.vm_name}")
    for pids in qemus_of(fl, run.vm_id).values():
        for pid in pids:
            processes.stop(pid, run.vm_id)
    for host in (SOURCE, DEST):
        for directory in ("vms", "snapshots"):
            shutil.rmtree(lab.host_dir(host) / directory / run.vm_id, ignore_errors=True)
