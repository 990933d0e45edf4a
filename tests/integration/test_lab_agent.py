"""Agents on a running lab: booting the guest image the lab hands them, surviving SIGKILL without losing a VM, and
reconciliation catching a copy started behind the controller's back."""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from ferryman.agent.hypervisor import procscan
from ferryman.lab import processes
from ferryman.lab.guest import GuestImage, ensure_guest
from ferryman.lab.lab import RECORDS_PROBE
from ferryman.lab.records import read_records
from ferryman.testing.wait import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.qemu]


def controller_ctx(lab) -> ssl.SSLContext:
    pki = lab.dir / "controller" / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / "controller.pem"), str(pki / "controller.key"))
    return ctx


def agent_vms(lab, host: str) -> dict[str, dict]:
    url = f"https://{lab.state.addresses[host]}:{lab.state.agent_port}/v1/vms"
    return {v["vm_id"]: v for v in httpx.get(url, verify=controller_ctx(lab), timeout=30).json()["vms"]}


def last_seq(disk: Path) -> int:
    records = read_records(disk)
    return max((r.seq for r in records), default=0)


def test_agents_boot_the_guest_the_lab_hands_them(lab):
    """Each agent is handed the lab guest (kernel, initrd, command-line template, ready marker) and the records probe
    on its command line; the lab's VMs boot from the same guest as the signed registry image ``lab-guest``, through
    the firmware, from an overlay on the host's verified copy, with each VM's workload in its SMBIOS serial."""
    state = lab.state
    guest = GuestImage(Path(state.guest_kernel), Path(state.guest_initrd))
    assert guest == ensure_guest()
    for host, pid in state.agents.items():
        argv = processes.cmdline(pid)
        handed = {flag: procscan.option_value(argv, flag) for flag in ("--boot-kernel", "--boot-initrd")}
        assert handed == {"--boot-kernel": str(guest.kernel), "--boot-initrd": str(guest.initrd)}, host
        assert procscan.option_value(argv, "--boot-cmdline") == guest.cmdline
        assert procscan.option_value(argv, "--boot-ready-marker") == guest.ready_marker
        assert procscan.option_value(argv, "--guest-probe") == RECORDS_PROBE
    vm = lab.api().get("/api/v1/vms/web-1")
    image = lab.api().get("/api/v1/images/lab-guest")
    assert vm["image"] == "lab-guest" and image["signature"] == "valid" and image["guest_agent"]
    running = procscan.qemu_at(lab.lab.host_dir(vm["host"]) / "vms" / vm["id"] / "qemu.pid")
    assert running is not None
    qemu = list(running.argv)
    assert "-kernel" not in qemu and "-append" not in qemu
    serial = procscan.option_value(qemu, "-smbios") or ""
    assert serial.startswith(f"type=1,serial=ferryman:vm={vm['id']};") and "interval_ms=1000" in serial
    disk = lab.lab.host_dir(vm["host"]) / "vms" / vm["id"] / "disk0.qcow2"
    info = json.loads(
        subprocess.run(["qemu-img", "info", "-U", "--output=json", str(disk)], capture_output=True, text=True).stdout
    )
    cached = lab.lab.host_dir(vm["host"]) / "images" / "sha256" / image["digest"].removeprefix("sha256:")
    assert info["backing-filename"] == str(cached) and cached.is_file()


def test_agent_sigkill_and_restart_keeps_vm_running(lab):
    """SIGKILL of host-a's agent leaves web-1's QEMU running; the restarted agent re-attaches without restarting it."""
    vm = lab.api().get("/api/v1/vms/web-1")
    assert vm["host"] == "host-a"
    before = agent_vms(lab, "host-a")[vm["id"]]
    limits = Path(f"/proc/{before['pid']}/limits").read_text()
    assert re.search(r"Max core file size\s+0\s+0", limits), "QEMU may dump core (guest memory) to disk"
    assert "dump-guest-core=off" in " ".join(processes.cmdline(before["pid"]))
    disk = lab.lab.host_dir("host-a") / "vms" / vm["id"] / "disk0.qcow2"
    seq_before = wait_for(lambda: last_seq(disk), 30, "web-1 to write disk records")
    state = lab.state
    os.kill(state.agents["host-a"], signal.SIGKILL)
    assert processes.stop(state.agents["host-a"], str(lab.dir), timeout_s=2)
    assert processes.is_alive(before["pid"], vm["id"]), "the VM died with its agent"

    lab.lab.start_agent(state, "host-a")
    lab.lab.wait_host_up("host-a")
    after = agent_vms(lab, "host-a")[vm["id"]]
    assert (after["pid"], after["managed"], after["run_state"]) == (before["pid"], True, "running")
    wait_for(lambda: last_seq(disk) > seq_before, 30, "records to keep advancing")
    # QMP is re-attached: the VM can be paused and resumed through the new agent
    lab.cli("vm", "pause", "web-1")
    assert agent_vms(lab, "host-a")[vm["id"]]["run_state"] == "paused"
    lab.cli("vm", "resume", "web-1")
    assert agent_vms(lab, "host-a")[vm["id"]]["run_state"] == "running"


def test_copy_started_behind_the_controllers_back_raises_alarm(lab, tmp_path):
    """A QEMU for web-1 started by hand on host-c is reported and raises an unexpected-copy alarm; the CMDB is kept."""
    vm = lab.api().get("/api/v1/vms/web-1")
    guest = ensure_guest()
    rogue_dir = lab.lab.host_dir("host-c") / "rogue"
    rogue_dir.mkdir(exist_ok=True)
    pidfile = rogue_dir / "qemu.pid"
    subprocess.run(
        [
            "qemu-system-x86_64",
            "-daemonize",
            "-pidfile",
            str(pidfile),
            "-uuid",
            vm["id"],
            "-name",
            "web-1",
            "-machine",
            "accel=tcg",
            "-m",
            "128",
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
            "-serial",
            f"file:{rogue_dir / 'console.log'}",
            "-kernel",
            str(guest.kernel),
            "-initrd",
            str(guest.initrd),
            "-append",
            f"console=ttyS0 quiet ferryman.vm={vm['id']}",
        ],
        check=True,
        timeout=30,
    )
    rogue_pid = int(pidfile.read_text())
    try:

        def alarm_raised():
            alarms = lab.api().get("/api/v1/alarms")
            return [a for a in alarms if a["vm"] == vm["id"] and a["kind"] in {"vm.unexpected_copy", "vm.duplicate"}]

        raised = wait_for(alarm_raised, 30, "an alarm about the rogue copy")
        assert any(a["kind"] == "vm.unexpected_copy" and a["host"] == "host-c" for a in raised)
        events = lab.api().get("/api/v1/events", kind="alarm.vm.unexpected_copy")
        assert any(e["vm"] == vm["id"] and e["severity"] == "alarm" for e in events)
        assert lab.api().get("/api/v1/vms/web-1")["host"] == "host-a"
    finally:
        processes.stop(rogue_pid, vm["id"])
    wait_for(lambda: not alarm_raised(), 30, "the alarm to resolve once the rogue copy is gone")


def test_agent_resumes_only_with_a_lease_for_the_current_generation(lab):
    """Fencing: without a lease, or with one for another generation or host, the agent refuses to resume the VM."""
    from ferryman.core.clock import SystemClock
    from ferryman.pki.ca import CertificateAuthority
    from ferryman.pki.tickets import issue_lease

    vm = lab.api().get("/api/v1/vms/test-1")
    host = vm["host"]
    url = f"https://{lab.state.addresses[host]}:{lab.state.agent_port}/v1/vms/{vm['id']}/action"
    ca = CertificateAuthority.load_or_create(lab.dir / "controller" / "pki", SystemClock())
    lab.cli("vm", "pause", "test-1")
    try:
        with httpx.Client(verify=controller_ctx(lab), timeout=30) as client:
            refused = client.post(url, json={"action": "resume"})
            assert refused.status_code == 403 and "needs a lease" in refused.json()["detail"]
            _, newer = issue_lease(ca, vm_id=vm["id"], host=host, generation=vm["generation"] + 1)
            refused = client.post(url, json={"action": "resume", "lease": newer})
            assert refused.status_code == 403 and "this copy is generation" in refused.json()["detail"]
            _, elsewhere = issue_lease(ca, vm_id=vm["id"], host="host-c", generation=vm["generation"])
            assert client.post(url, json={"action": "resume", "lease": elsewhere}).status_code == 403
            assert agent_vms(lab, host)[vm["id"]]["run_state"] == "paused"
    finally:
        lab.cli("vm", "resume", "test-1")
    assert agent_vms(lab, host)[vm["id"]]["run_state"] == "running"
