"""Thrashing, tried as an attacker would: a disruptor kills the destination of every migration of one VM mid-transfer.
The governor backs off, stops the attempts at its circuit-breaker cap with a security alert, and other migrations are
unaffected."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from ferryman.client import CliError
from ferryman.lab import processes
from ferryman.testing.wait import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.qemu]


def incoming_pids(vm_id: str) -> list[int]:
    """The destination QEMU of a VM: started with -incoming and the VM's uuid."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            args = processes.cmdline(int(entry.name))
            if args and Path(args[0]).name.startswith("qemu-system") and vm_id in args and "-incoming" in args:
                found.append(int(entry.name))
    return found


def request(lab, name: str, to: str) -> tuple[dict | None, str]:
    proc = lab.cli("vm", "migrate", name, "--to", to, "--bandwidth", "2", "--no-wait", "--json", check=False)
    return (json.loads(proc.stdout), "") if proc.returncode == 0 else (None, proc.stderr)


def disrupt(lab, mid: str, vm_id: str) -> dict:
    """Kill the destination QEMU once the RAM transfer runs; return the finished migration."""
    wait_for(lambda: lab.cli_json("migration", "show", mid)["phase"] == "transferring", 120, "the transfer")
    pids = wait_for(lambda: incoming_pids(vm_id), 30, "the destination QEMU")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return wait_for(lambda: (m := lab.cli_json("migration", "show", mid))["outcome"] and m, 180, "the rollback")


def test_disrupted_migrations_back_off_then_trip_the_breaker(lab):
    """Each disrupted attempt rolls back; retries meet a growing back-off; the third trips the breaker with an alert."""
    vm = lab.cli_json("vm", "create", "thr-1", "--tenant", "globex", "--memory", "128", "--host", "host-a")
    lab.cli("vm", "create", "calm-1", "--tenant", "acme", "--memory", "128", "--host", "host-b")
    backoffs = []
    for attempt in range(1, 4):
        while True:  # bounded: each refusal names its wait, and the waits are capped
            started, refusal = request(lab, "thr-1", "host-c")
            if started is not None:
                break
            assert "back-off" in refusal, refusal
            backoffs.append(refusal)
            time.sleep(2)
            assert len(backoffs) < 40, "back-off never ended"
        m = disrupt(lab, started["id"], vm["id"])
        if attempt == 1:  # straight away (through the API: no CLI start-up in between), the back-off refuses
            with pytest.raises(CliError, match="back-off"):
                lab.api().post("/api/v1/vms/thr-1/migrate", {"to": "host-c", "bandwidth_mib_s": 2})
        assert m["outcome"] == "rolled_back", m
        assert m["error"], "a disrupted attempt records why it failed"
        shown = lab.cli_json("vm", "show", "thr-1")
        assert (shown["host"], shown["generation"], shown["state"]) == ("host-a", 1, "running"), attempt
    assert backoffs, "no back-off was ever observed"

    _, refusal = request(lab, "thr-1", "host-c")
    assert "thrashing" in refusal or "breaker" in refusal, refusal
    alerts = lab.cli_json("events", "--kind", "security.thrashing", "--limit", "20")
    assert alerts and alerts[0]["severity"] == "alarm"
    attempts = [m for m in lab.cli_json("migration", "list", "--vm", "thr-1") if m["outcome"] == "rolled_back"]
    assert len(attempts) == 3  # attempts stopped at the cap

    # another VM on another host pair migrates as usual
    proc = lab.cli("vm", "migrate", "calm-1", "--to", "host-c", "--json", check=False, timeout=300)
    assert proc.returncode == 0 and json.loads(proc.stdout)["outcome"] == "done", proc.stderr
    assert [p for p in incoming_pids(vm["id"])] == []
    lab.cli("vm", "delete", "thr-1")
    lab.cli("vm", "delete", "calm-1")
