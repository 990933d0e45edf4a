"""The ``ferryman`` command line against a running lab: every command, its --json form and its error paths."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ferryman.lab import processes
from ferryman.security.secrets import make_api_token

pytestmark = [pytest.mark.lab, pytest.mark.qemu]


def one_line_error(proc) -> str:
    """The CLI's error contract: exit code 1, one line on stderr, no traceback."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("creating ")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_host_list_shows_labels_and_counts(lab):
    """host list shows every host with site, security level, zone, subnet, virt type, hypervisor, patch, VM count."""
    hosts = {h["name"]: h for h in lab.cli_json("host", "list")}
    assert set(hosts) == {"host-a", "host-b", "host-c"}
    a, c = hosts["host-a"], hosts["host-c"]
    assert (a["site"], a["security_level"], a["zone"], a["patch_level"]) == ("dc-vault", 4, "zone-1", 5)
    assert (c["site"], c["security_level"], c["hypervisor_version"], c["patch_level"]) == ("dc-edge", 2, "7.1.0", 1)
    assert all(h["state"] == "enrolled" and h["reachable"] for h in hosts.values())
    assert hosts["host-a"]["vm_count"] >= 1
    assert a["virt_type"] in {"kvm", "tcg"} and a["subnet"] == "10.10.1.0/24"
    table = lab.cli("host", "list").stdout
    assert "host-b" in table and "dc-vault" in table


def test_vm_create_show_neighbours_history_delete(lab):
    """A VM created on a chosen host shows its host, generation and neighbours; history has its placement."""
    before = dt.datetime.now(dt.UTC)
    vm = lab.cli_json(
        "vm",
        "create",
        "cli-1",
        "--tenant",
        "acme",
        "--profile",
        "environment=production",
        "--memory",
        "128",
        "--disk",
        "64M",
        "--host",
        "host-c",
    )
    assert (vm["host"], vm["state"], vm["generation"]) == ("host-c", "running", 1)
    lab.cli_json("vm", "create", "cli-2", "--tenant", "globex", "--memory", "128", "--host", "host-c")
    shown = lab.cli_json("vm", "show", "cli-1")
    assert shown["host"] == "host-c" and shown["profile"] == {"environment": "production"}
    assert [n["vm"] for n in shown["neighbours"]] == ["cli-2"]
    assert "cli-2" in lab.cli("vm", "show", "cli-1").stdout

    history = lab.cli_json("vm", "history", "cli-1")
    assert [(p["host"], p["generation"], p["valid_to"]) for p in history] == [("host-c", 1, None)]
    names_then = {n["vm"] for n in lab.cli_json("host", "neighbours", "host-c", "--at", before.isoformat())}
    assert not names_then & {"cli-1", "cli-2"}
    names_now = {n["vm"] for n in lab.cli_json("host", "neighbours", "host-c", "--at", "now")}
    assert {"cli-1", "cli-2"} <= names_now

    assert "cli-1" in {v["name"] for v in lab.cli_json("vm", "list")}
    assert {v["name"] for v in lab.cli_json("vm", "list", "--tenant", "globex")} >= {"cli-2"}
    lab.cli("vm", "delete", "cli-2")
    assert lab.cli_json("vm", "show", "cli-1")["neighbours"] == []
    err = one_line_error(lab.cli("vm", "show", "cli-2", check=False))
    assert "VM 'cli-2' not found" in err
    lab.cli("vm", "delete", "cli-1")
    # deleted VMs leave their history behind
    assert lab.cli_json("vm", "history", "cli-1")[0]["valid_to"] is not None


def test_vm_lifecycle_commands(lab):
    """stop, start, pause and resume change the VM's state and the QEMU process agrees."""
    lab.cli("vm", "create", "life-1", "--tenant", "acme", "--memory", "128", "--host", "host-b")
    for action, state in [("pause", "paused"), ("resume", "running"), ("stop", "stopped"), ("start", "running")]:
        out = lab.cli("vm", action, "life-1").stdout
        assert f"is {state}" in out
        assert lab.cli_json("vm", "show", "life-1")["state"] == state
    err = one_line_error(lab.cli("vm", "resume", "life-1", check=False))
    assert "cannot resume a VM that is running" in err
    vm_id = lab.cli_json("vm", "show", "life-1")["id"]
    # the agent pushed QEMU's own events for the pause and the resume, under the host's identity
    qemu_events = lab.cli_json("events", "--kind", "qemu.", "--vm", "life-1", "--limit", "100")
    assert {"qemu.stop", "qemu.resume"} <= {e["kind"] for e in qemu_events}
    assert {e["principal"] for e in qemu_events} == {"host:host-b"}
    time.sleep(8)  # two reconciliation passes: a disagreement would have become an alarm
    alarms = [a for a in lab.cli_json("alarms") if a["vm"] == vm_id]
    assert alarms == []
    lab.cli("vm", "delete", "life-1")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("vm", "show", "nope"), "VM 'nope' not found"),
        (("vm", "stop", "nope"), "VM 'nope' not found"),
        (("vm", "create", "big-1", "--tenant", "acme", "--memory", "2048", "--host", "host-c"), "host host-c is full"),
        (("vm", "create", "bad-1", "--tenant", "acme", "--disk", "12X"), "bad size '12X'"),
        (("vm", "create", "bad-2", "--tenant", "acme", "--memory", "lots"), "bad size 'lots'"),
        (("vm", "create", "Bad_Name", "--tenant", "acme"), "bad VM name"),
        (("vm", "create", "web-1", "--tenant", "acme"), "tenant acme has a VM named web-1 already"),
        (("vm", "create", "x-1", "--tenant", "acme", "--host", "host-z"), "host 'host-z' not found"),
        (("vm", "create", "x-2", "--tenant", "acme", "--profile", "novalue"), "bad --profile"),
        (("vm", "create", "x-3", "--tenant", "acme", "--memory", "128", "--resident-mib", "64"), "bad resident set"),
        (("host", "neighbours", "host-a", "--at", "yesterday"), "bad time"),
        (("host", "show", "host-z"), "host 'host-z' not found"),
    ],
)
def test_error_paths_are_one_line(lab, args, message):
    """Bad input, unknown names and a full host give one clear line and exit code 1."""
    assert message in one_line_error(lab.cli(*args, check=False))


def test_agent_unreachable_is_a_clear_error(lab):
    """With a host's agent down, creating a VM there fails with one line naming the unreachable agent."""
    state = lab.state
    pid = state.agents["host-c"]
    os.kill(pid, signal.SIGKILL)
    assert processes.stop(pid, str(lab.dir), timeout_s=2)
    try:
        err = one_line_error(
            lab.cli("vm", "create", "orphan-1", "--tenant", "acme", "--memory", "128", "--host", "host-c", check=False)
        )
        assert "agent of host-c is unreachable" in err
    finally:
        lab.lab.start_agent(state, "host-c")
        lab.lab.wait_host_up("host-c")
    # the failed creation is recorded, not lost: the VM is in error and can be deleted
    assert lab.cli_json("vm", "show", "orphan-1")["state"] == "error"
    lab.cli("vm", "delete", "orphan-1")


def test_bad_token_is_refused(lab):
    """A wrong API token gets one line, exit 1."""
    forged, _, _ = make_api_token()  # well formed, never issued by this controller
    env = {**lab.env, "FERRYMAN_TOKEN": forged}
    proc = subprocess.run(
        [sys.executable, "-m", "ferryman.cli", "vm", "list"], env=env, capture_output=True, text=True, timeout=60
    )
    assert "invalid API token" in one_line_error(proc)


def test_events_and_lab_status(lab):
    """events lists the audit trail with principals; lab status reports every process up."""
    events = lab.cli_json("events", "--kind", "vm.created", "--limit", "100")
    assert {"web-1", "test-1"} <= {e["message"].split()[0] for e in events}
    assert all(e["principal"] == "token:admin" for e in events)
    enrolled = lab.cli_json("events", "--kind", "host.enrolled")
    assert {e["host"] for e in enrolled} == {"host-a", "host-b", "host-c"}
    status = lab.cli_json("lab", "status")
    assert status["up"] is True and set(status["processes"]) == {"controller", "host-a", "host-b", "host-c"}
    assert json.loads(lab.cli("site", "list", "--json").stdout)[0]["name"] in {"dc-vault", "dc-edge"}
