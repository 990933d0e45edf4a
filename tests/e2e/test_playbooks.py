"""Playbooks and host compromise on a lab of their own (they change hosts' roles and revoke a host): a high-severity
alert captures, isolates and quarantines its VM onto the quarantine host through the secure migration path; a
controller killed in the middle of a playbook resumes it; quarantine hosts take no normal placements and their
headroom is reported; ``host compromise`` lists every VM that ran there, evacuates it and revokes the host."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferryman.testing.labhandle import LabHandle, running_lab
from ferryman.testing.wait import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.qemu]

PORT, AGENT_PORT = 25443, 25444
DATA = Path(__file__).parent.parent / "data" / "alerts"


@pytest.fixture(scope="module")
def plab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    lab_dir = tmp_path_factory.mktemp("playbooks") / "lab"
    with running_lab(lab_dir, hosts=3, vms=0, port=PORT, agent_port=AGENT_PORT) as handle:
        handle.cli("host", "set", "host-c", "--role", "quarantine")
        handle.cli_json("network", "create", "pb-net", "--tenant", "acme", "--cidr", "10.80.0.0/24")
        yield handle


def create(lab: LabHandle, name: str, host: str, ip: str | None = None, tenant: str = "acme") -> dict[str, Any]:
    extra = ["--network", "pb-net", "--ip", ip] if ip else []
    return dict(
        lab.cli_json(
            "vm", "create", name, "--tenant", tenant, "--memory", "128", "--host", host, "--dirty-kib", "16", *extra
        )
    )


def run_of(lab: LabHandle, incident: int) -> dict[str, Any]:
    return dict(lab.cli_json("incident", "playbook", "run", str(incident)))


def kinds(lab: LabHandle, incident: int) -> list[str]:
    return [a["kind"] for a in lab.cli_json("incident", "show", str(incident))["timeline"]]


def test_quarantine_hosts_take_no_normal_placements(plab: LabHandle) -> None:
    proc = plab.cli("vm", "create", "nope", "--tenant", "acme", "--memory", "128", "--host", "host-c", check=False)
    assert proc.returncode == 1 and "takes no normal placements" in proc.stderr
    create(plab, "pb-normal", "host-a")
    proc = plab.cli("vm", "migrate", "pb-normal", "--to", "host-c", check=False)
    assert proc.returncode == 1 and "takes no normal placements" in proc.stderr
    # the one quarantine host drained: pb-normal would no longer fit in quarantine; the drain says so, and audits it
    assert "breaks the quarantine reserve" in plab.cli("host", "drain", "host-c").stderr
    assert plab.cli_json("events", "--kind", "host.reserve_broken", "--limit", "5")
    plab.cli("vm", "delete", "pb-normal")
    capacity = plab.cli_json("incident", "capacity")
    assert [h["name"] for h in capacity["hosts"]] == ["host-c"] and capacity["reserve"] == 1
    assert "headroom" in plab.cli("incident", "capacity").stdout


def test_a_high_alert_captures_isolates_and_quarantines(plab: LabHandle) -> None:
    vm = create(plab, "pb-high", "host-a", "10.80.0.10")
    event = json.loads((DATA / "suricata_alert.json").read_text())
    event["dest_ip"] = "10.80.0.10"
    event.pop("ether", None)
    event["alert"]["severity"] = 1  # high
    result = plab.api().post("/api/v1/alerts/suricata", event)
    (incident,) = result["opened"]
    wait_for(lambda: run_of(plab, incident)["state"] != "running", 420, "the playbook to end")
    run = run_of(plab, incident)
    assert run["state"] == "done", run
    assert [s["kind"] for s in run["steps"]] == ["capture", "isolate", "quarantine", "impact"]
    shown = plab.cli_json("vm", "show", "pb-high")
    assert shown["host"] == "host-c" and shown["nics"][0]["isolated"] and shown["nics"][0]["rules_host"] == "host-c"
    timeline = kinds(plab, incident)
    for kind in (
        "playbook.planned",
        "playbook.capture",
        "evidence",
        "playbook.isolate",
        "playbook.quarantine",
        "playbook.done",
    ):
        assert kind in timeline, timeline
    assert (
        timeline.index("playbook.capture") < timeline.index("playbook.isolate") < timeline.index("playbook.quarantine")
    )
    assert plab.cli_json("incident", "evidence", str(incident), "--verify")["verification"]["ok"]
    migrations = plab.cli_json("migration", "list", "--vm", vm["name"])
    assert migrations[0]["principal"] == "playbook" and migrations[0]["outcome"] == "done"


def test_a_killed_controller_resumes_the_playbook(plab: LabHandle) -> None:
    create(plab, "pb-resume", "host-a")
    opened = plab.cli_json("incident", "open", "--vm", "pb-resume", "--severity", "medium", "--summary", "resume me")
    incident = int(opened["id"])
    # kill it while the capture (the first step) runs: the run's step is persisted before the host is asked
    wait_for(lambda: "capture" in kinds(plab, incident), 60, "the capture to start")
    state = plab.lab.load_state()
    assert state is not None and state.controller_pid is not None
    os.kill(state.controller_pid, signal.SIGKILL)
    time.sleep(1)
    plab.lab.restart_controller()
    wait_for(lambda: run_of(plab, incident)["state"] != "running", 300, "the resumed playbook to end")
    assert run_of(plab, incident)["state"] == "done"
    timeline = kinds(plab, incident)
    assert "playbook.resumed" in timeline and timeline[-1] == "playbook.done", timeline
    assert timeline.count("evidence") >= 1  # the resumed capture completed; an interrupted one left only its attempt
    assert plab.cli_json("incident", "evidence", str(incident), "--verify")["verification"]["ok"]


def test_playbook_apply_and_its_errors(plab: LabHandle, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nseverities:\n  low: [record]\n  medium: [explode]\n  high: [record]\n  critical: [record]\n"
    )
    proc = plab.cli("incident", "playbook", "apply", str(bad), check=False)
    assert proc.returncode == 1 and "bad.yaml:4" in proc.stderr and "Traceback" not in proc.stderr
    good = tmp_path / "good.yaml"
    good.write_text(
        "name: quiet\nseverities:\n  low: [record]\n  medium: [record]\n  high: [record]\n  critical: [record]\n"
    )
    applied = plab.cli_json("incident", "playbook", "apply", str(good))
    shown = plab.cli_json("incident", "playbook", "show")
    assert shown["version"] == applied["version"] and shown["name"] == "quiet" and not shown["default"]


def test_host_compromise_evacuates_and_revokes(plab: LabHandle) -> None:
    create(plab, "pb-victim", "host-b")
    out = plab.cli_json("host", "compromise", "host-b", "--since", "-1h")
    assert "pb-victim" in out["vms_since"] and [m["to"] for m in out["migrations"]] == ["host-a"]
    incident = out["incident"]
    wait_for(lambda: "compromise.revoked" in kinds(plab, incident), 300, "the evacuation and revocation")
    assert plab.cli_json("vm", "show", "pb-victim")["host"] == "host-a"
    host = plab.cli_json("host", "show", "host-b")
    assert host["role"] == "compromised"
    # the controller refuses the host's agent from now on: its reports stop counting, and an alarm says it is gone
    refused = [e for e in plab.cli_json("events", "--kind", "host.revoked")]
    assert refused and refused[0]["host"] == "host-b"
    proc = subprocess.run(
        [sys.executable, "-m", "ferryman.cli", "incident", "show", str(incident)],
        env=plab.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "compromise.evacuated" in proc.stdout
