"""Bring the local lab up and down.

``up`` starts a controller on 127.0.0.1 and N agents on 127.0.0.2…, registers two sites of different security levels
and hosts with distinct labels, enrols every agent through the real PKI path (one-time token + CSR), imports the lab
guest as a bootable disk image signed by the lab's own publisher key (the controller's default image, so every lab VM
boots from its own overlay through the firmware and the bootloader on the disk), and boots a few VMs of two tenants.
It reports progress as it goes. ``down`` stops every agent, every QEMU of the lab and the controller,
checks that no QEMU is left, and removes the lab's state.

Where it can (root, iproute2), ``up`` first gives every host a network namespace of its own on a shared underlay
(:mod:`ferryman.lab.netlab`): each agent is told its namespace and underlay address (``--netns``, ``--underlay-ip``)
and each host is registered with that address (``underlay``). ``down`` removes the namespaces once the QEMUs have
exited (a QEMU's tap would keep its namespace alive). Elsewhere the lab runs without networks, and says so.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ferryman.client import Api, CliConfig, CliError
from ferryman.images.signing import Artefact, new_private_key, sign
from ferryman.images.store import sha256_file
from ferryman.lab import netlab, processes
from ferryman.lab.disk_image import ensure_guest_disk
from ferryman.lab.guest import GuestImage, ensure_guest

Say = Callable[[str], None]
# the guest probe every agent of the lab is handed: validation also reads the lab guest's disk records
RECORDS_PROBE = "ferryman.lab.records:DiskRecordsProbe"
# the lab guest in the image registry: the controller's default image, signed by the lab's publisher key
LAB_IMAGE = "lab-guest"
LAB_PUBLISHER = "lab-publisher"
LAB_IMAGE_OS = "ferryman-lab"
LAB_IMAGE_VERSION = "1.0"

SITES = [
    {"name": "dc-vault", "security_level": 4, "description": "guarded data centre, biometric access"},
    {"name": "dc-edge", "security_level": 2, "description": "edge site, badge access"},
]

# host labels cycle through these; the first three differ in site, zone, subnet, hypervisor version and patch level
HOST_LABELS = [
    {"site": "dc-vault", "zone": "zone-1", "subnet": "10.10.1.0/24", "hypervisor_version": "7.2.0", "patch_level": 5},
    {"site": "dc-vault", "zone": "zone-2", "subnet": "10.10.2.0/24", "hypervisor_version": "7.2.0", "patch_level": 3},
    {"site": "dc-edge", "zone": "zone-2", "subnet": "10.20.2.0/24", "hypervisor_version": "7.1.0", "patch_level": 1},
]

LAB_VMS = [
    {"name": "web-1", "tenant": "acme", "profile": {"environment": "production", "sensitivity": "high"}},
    {"name": "test-1", "tenant": "globex", "profile": {"environment": "test", "sensitivity": "low"}},
    {"name": "db-1", "tenant": "acme", "profile": {"environment": "production", "sensitivity": "high"}},
    {"name": "web-2", "tenant": "globex", "profile": {"environment": "production", "sensitivity": "medium"}},
    {"name": "batch-1", "tenant": "globex", "profile": {"environment": "test", "sensitivity": "low"}},
    {"name": "cache-1", "tenant": "acme", "profile": {"environment": "staging", "sensitivity": "medium"}},
]


@dataclass
class LabState:
    """What ``lab.json`` records: enough to find and stop every process of the lab."""

    port: int
    agent_port: int
    accel: str
    controller_pid: int | None = None
    agents: dict[str, int] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    started_at: str = ""
    host_dirs: dict[str, str] = field(default_factory=dict)  # hosts kept outside the lab directory
    guest_kernel: str = ""  # the guest image every agent is handed (built at ``up``)
    guest_initrd: str = ""
    guest_disk: str = ""  # the same guest as a bootable disk, imported as LAB_IMAGE
    network: dict[str, Any] | None = None  # netlab.LabNetwork.as_json(); None: the lab runs without networks


class Lab:
    def __init__(
        self,
        lab_dir: Path,
        say: Say = lambda _msg: None,
        host_storage: dict[str, Path] | None = None,
        controller_env: dict[str, str] | None = None,
        host_memory_mb: int = 1024,
    ) -> None:
        """``host_storage`` puts a host's state (disks, snapshots, PKI) in a directory of its own, e.g. on a separate
        filesystem; by default every host lives under ``lab_dir/hosts``. ``controller_env`` adds environment
        variables to the controller's (e.g. ``FERRYMAN_FAILPOINTS_DIR`` for fault-injection tests).
        ``host_memory_mb``: the guest memory each host offers the placement."""
        self.dir = lab_dir.resolve()
        self._host_memory_mb = host_memory_mb
        self._controller_env = dict(controller_env or {})
        self._host_storage = {name: path.resolve() for name, path in (host_storage or {}).items()}
        self.say = say
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._agent_started: dict[str, dt.datetime] = {}

    # ---- paths -------------------------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.dir / "lab.json"

    @property
    def controller_dir(self) -> Path:
        return self.dir / "controller"

    @property
    def ca_file(self) -> Path:
        return self.controller_dir / "pki" / "ca.pem"

    def host_dir(self, name: str) -> Path:
        return self._host_storage.get(name) or self.dir / "hosts" / name

    def _qemu_roots(self) -> list[Path]:
        """Every directory a QEMU of this lab references: the lab itself and hosts kept elsewhere."""
        state = self.load_state()
        extra = [Path(p) for p in (state.host_dirs if state else {}).values()]
        return [self.dir, *extra, *self._host_storage.values()]

    def load_state(self) -> LabState | None:
        try:
            return LabState(**json.loads(self.state_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _save(self, state: LabState) -> None:
        self.state_file.write_text(json.dumps(asdict(state), indent=2))

    def api(self) -> Api:
        return Api(CliConfig.load(self.dir / "cli.json"))

    def _marker(self) -> str:
        return str(self.dir)

    def running(self) -> dict[str, bool]:
        state = self.load_state()
        if state is None:
            return {}
        pid = state.controller_pid
        alive = {"controller": pid is not None and processes.is_alive(pid, self._marker())}
        for name, pid in state.agents.items():
            alive[name] = processes.is_alive(pid, self._marker())
        return alive

    # ---- up ----------------------------------------------------------------------------------------------------

    def up(self, hosts: int = 3, vms: int = 4, port: int = 8443, agent_port: int = 8444) -> LabState:
        if not 1 <= hosts <= 20:
            raise CliError("--hosts must be between 1 and 20")
        if not 0 <= vms <= len(LAB_VMS):
            raise CliError(f"--vms must be between 0 and {len(LAB_VMS)}")
        if any(self.running().values()):
            raise CliError(f"the lab in {self.dir} is already up (ferryman lab status; ferryman lab down)")
        if self.dir.exists():
            self.say(f"removing the state of a previous lab in {self.dir}")
            self._wipe()
        self.dir.mkdir(parents=True, mode=0o700)
        from ferryman.agent.hypervisor.accel import detect_accel

        self.say("[1/5] building the guest image (kernel + initramfs from Debian packages, and a bootable disk)")
        guest = ensure_guest()
        disk = ensure_guest_disk()
        self.say("[2/5] checking whether KVM can boot a guest here")
        accel = detect_accel(guest, guest.kernel.parent)
        self.say(f"      accelerator: {accel}")
        state = LabState(
            port=port,
            agent_port=agent_port,
            accel=accel,
            started_at=dt.datetime.now(dt.UTC).isoformat(),
            guest_kernel=str(guest.kernel),
            guest_initrd=str(guest.initrd),
            guest_disk=str(disk.path),
        )
        try:
            self._start_controller(state)
            self._publish_guest(disk.path)
            self._start_agents(state, hosts)
            self._boot_vms(vms)
        except BaseException:
            self.say("lab start failed; stopping what was started")
            self.down(quiet=True, keep_state=True)
            raise
        return state

    def _start_controller(self, state: LabState, step: str = "[3/5] ") -> None:
        self.say(f"{step}starting the controller on https://127.0.0.1:{state.port}")
        proc = processes.spawn(
            ["-m", "ferryman.controller", "--data-dir", str(self.controller_dir), "--bind", f"127.0.0.1:{state.port}"],
            self.dir / "logs" / "controller.log",
            # a lab moves VMs back and forth on purpose: short cooldown, generous request rate
            env={
                "FERRYMAN_RECONCILE_INTERVAL": "3",
                "FERRYMAN_VM_COOLDOWN_S": "5",
                "FERRYMAN_PRINCIPAL_RATE": "60",
                "FERRYMAN_DEFAULT_IMAGE": LAB_IMAGE,
                **self._controller_env,
            },
        )
        self._children[proc.pid] = proc
        state.controller_pid = proc.pid
        self._save(state)
        token_file = self.controller_dir / "admin.token"
        self._wait("controller", lambda: self.ca_file.exists() and token_file.exists(), 60, state.controller_pid)
        (self.dir / "cli.json").write_text(
            json.dumps(
                {"url": f"https://127.0.0.1:{state.port}", "ca_file": str(self.ca_file), "token_file": str(token_file)}
            )
        )
        self._wait("controller API", self._api_ok, 30, state.controller_pid)

    def _publish_guest(self, disk: Path) -> None:
        """Import the lab guest's disk into the controller's registry, signed by a key made for this lab (kept in
        the lab directory, owner-only), the way an operator imports a publisher's image."""
        self.say(f"      importing {LAB_IMAGE} signed by {LAB_PUBLISHER}")
        api = self.api()
        private, public = new_private_key()
        key_file = self.dir / "publisher.key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(private)
        api.post("/api/v1/image-keys", {"name": LAB_PUBLISHER, "public_key": public})
        artefact = Artefact("disk", sha256_file(disk), disk.stat().st_size)
        api.put_file(f"/api/v1/blobs/{artefact.digest}", disk)
        signature = base64.b64encode(sign(private, [artefact])).decode()
        image: dict[str, object] = {"name": LAB_IMAGE, "disk": artefact.digest, "os": LAB_IMAGE_OS}
        image |= {"version": LAB_IMAGE_VERSION, "guest_agent": True}  # validation pings the guest's agent
        api.post("/api/v1/images", {**image, "signature": signature, "key": LAB_PUBLISHER})

    def restart_controller(self) -> LabState:
        """Stop the controller if it still runs (SIGTERM, then SIGKILL) and start it again on the same data directory
        and port; returns once its API answers. Its start recovers every unfinished migration from the journal."""
        state = self.load_state()
        if state is None:
            raise CliError(f"no lab in {self.dir}")
        if state.controller_pid is not None:
            processes.stop(state.controller_pid, self._marker())
            child = self._children.pop(state.controller_pid, None)
            if child is not None:  # our own child: collect its exit status, leave no zombie
                child.wait(timeout=10)
        self._start_controller(state, step="")
        return state

    def _api_ok(self) -> bool:
        try:
            self.api().get("/api/v1/sites")
        except CliError:
            return False
        return True

    def _start_agents(self, state: LabState, count: int) -> None:
        api = self.api()
        for site in SITES:
            api.post("/api/v1/sites", site)
        self.say(f"[4/5] starting {count} host agents and enrolling them with one-time tokens")
        names = [host_name(i) for i in range(count)]
        network = self._create_network(state, names)
        for i, name in enumerate(names):
            address = f"127.0.0.{i + 2}"
            labels = HOST_LABELS[i % len(HOST_LABELS)]
            body: dict[str, Any] = {
                "name": name,
                "address": address,
                "agent_port": state.agent_port,
                "virt_type": state.accel,
                "hypervisor": "qemu",
                "memory_mb": self._host_memory_mb,
                **labels,
            }
            hostnet = network.host(name) if network is not None else None
            if hostnet is not None:
                body["underlay"] = hostnet.underlay_ip
            created = api.post("/api/v1/hosts", body)
            host_dir = self.host_dir(name)
            host_dir.mkdir(parents=True, mode=0o700, exist_ok=name in self._host_storage)
            if name in self._host_storage:
                state.host_dirs[name] = str(host_dir)
            token_file = host_dir / "enrol.token"
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(created["enrol_token"])
            state.addresses[name] = address
            state.agents[name] = self.start_agent(state, name, token_file)
            self._save(state)
            where = f" (netns {hostnet.netns}, underlay {hostnet.underlay_ip})" if hostnet is not None else ""
            self.say(
                f"      {name} on {address} ({labels['site']}, {labels['zone']}, patch {labels['patch_level']}){where}"
            )
        for name in state.agents:
            self.wait_host_up(name)
            (self.host_dir(name) / "enrol.token").unlink(missing_ok=True)

    def _create_network(self, state: LabState, names: list[str]) -> netlab.LabNetwork | None:
        """The hosts' namespaces and underlay, recorded in the state before they are created (None: this machine
        cannot have them, which is said once). Namespaces left under this lab's names by a lab whose state is gone
        are removed first: the controller is up on this port, so no other lab of this port runs."""
        reason = netlab.unavailable()
        if reason is not None:
            self.say(f"      no lab networks ({reason}): VMs without NICs work, VMs with NICs cannot start")
            return None
        network = netlab.plan(state.port, names)
        state.network = network.as_json()
        self._save(state)
        try:
            leftovers = netlab.existing(network.prefix)
            if leftovers:
                self.say(f"      removing namespaces left by an earlier lab: {', '.join(leftovers)}")
                netlab.destroy(network)
            netlab.create(network)
        except netlab.NetLabError as err:
            raise CliError(f"cannot create the lab's network: {err}") from err
        self.say(
            f"      network: underlay {network.underlay_netns} ({netlab.UNDERLAY_PREFIX}0/{netlab.UNDERLAY_PREFIX_LEN},"
            f" MTU {netlab.UNDERLAY_MTU}), a namespace {network.prefix}<host> per host"
        )
        return network

    def _destroy_network(self, state: LabState | None, say: Say) -> None:
        """Remove the lab's namespaces; only once its QEMUs have exited."""
        if state is None or state.network is None:
            return
        try:
            network = netlab.LabNetwork.from_json(state.network)
            for netns in [network.underlay_netns, *(host.netns for host in network.hosts)]:
                pids = netlab.pids_inside(netns)
                if pids:  # they keep the namespace alive, nameless, after its deletion
                    say(f"warning: processes still in namespace {netns}: {pids}")
            deleted = netlab.destroy(network)
        except netlab.NetLabError as err:
            raise CliError(f"cannot remove the lab's network: {err}") from err
        if deleted:
            say(f"removed network namespaces {', '.join(deleted)}")

    def start_agent(self, state: LabState, name: str, token_file: Path | None = None) -> int:
        """Start (or restart) the agent of ``name``; an enrolled agent needs no token. The agent is handed the lab
        guest as its boot image and the reader of the guest's disk records as a guest probe for validation, and, if
        the lab has networks, its host's namespace and underlay address."""
        guest = self._guest(state)
        args = [
            "-m",
            "ferryman.agent",
            "--name",
            name,
            "--state-dir",
            str(self.host_dir(name)),
            "--listen",
            f"{state.addresses[name]}:{state.agent_port}",
            "--controller",
            f"https://127.0.0.1:{state.port}",
            "--controller-ca",
            str(self.ca_file),
            "--accel",
            state.accel,
            "--boot-kernel",
            str(guest.kernel),
            "--boot-initrd",
            str(guest.initrd),
            "--boot-cmdline",
            guest.cmdline,
            "--guest-probe",
            RECORDS_PROBE,
        ]
        if guest.ready_marker is not None:
            args += ["--boot-ready-marker", guest.ready_marker]
        hostnet = netlab.LabNetwork.from_json(state.network).host(name) if state.network is not None else None
        if hostnet is not None:
            args += ["--netns", hostnet.netns, "--underlay-ip", hostnet.underlay_ip]
        if token_file is not None:
            args += ["--enrol-token-file", str(token_file)]
        self._agent_started[name] = dt.datetime.now(dt.UTC)
        proc = processes.spawn(args, self.dir / "logs" / f"{name}.log")
        self._children[proc.pid] = proc
        pid = state.agents[name] = proc.pid
        self._save(state)
        return pid

    @staticmethod
    def _guest(state: LabState) -> GuestImage:
        """The guest image built at ``up`` (a state without one: the current image, built if needed)."""
        if state.guest_kernel and state.guest_initrd:
            return GuestImage(Path(state.guest_kernel), Path(state.guest_initrd))
        return ensure_guest()

    def wait_host_up(self, name: str, timeout_s: float = 90) -> None:
        state = self.load_state()
        pid = state.agents.get(name) if state else None
        self._wait(f"agent {name}", lambda: self._host_up(name), timeout_s, pid)

    def _host_up(self, name: str) -> bool:
        """Enrolled, and the controller has a report from the agent process started last (not from a previous one)."""
        host = {h["name"]: h for h in self.api().get("/api/v1/hosts")}.get(name, {})
        if host.get("state") != "enrolled" or not host.get("last_report"):
            return False
        started = self._agent_started.get(name)
        return started is None or dt.datetime.fromisoformat(host["last_report"]) > started

    def _boot_vms(self, count: int) -> None:
        self.say(f"[5/5] booting {count} VMs of two tenants")
        api = self.api()
        hosts = [h["name"] for h in api.get("/api/v1/hosts")]
        for i, spec in enumerate(LAB_VMS[:count]):
            host = hosts[i % len(hosts)]
            started = time.monotonic()
            vm = api.post("/api/v1/vms", {**spec, "memory": "128", "disk": "64M", "host": host})
            self.say(
                f"      {vm['name']} ({vm['tenant']}) running on {vm['host']} in {time.monotonic() - started:.1f}s"
            )

    def _wait(self, what: str, ready: Callable[[], bool], timeout_s: float, pid: int | None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            if pid is not None and not self._alive(pid):
                raise CliError(f"{what} exited during start-up; see {self.dir / 'logs'}{self._log_tail(what)}")
            time.sleep(0.5)
        raise CliError(f"{what} not ready after {timeout_s:.0f}s; see {self.dir / 'logs'}")

    def _alive(self, pid: int) -> bool:
        """Our own children are asked directly; processes of an earlier ``lab up`` are checked in /proc."""
        child = self._children.get(pid)
        if child is not None:
            return child.poll() is None
        return processes.is_alive(pid, self._marker())

    def _log_tail(self, what: str, lines: int = 15) -> str:
        name = what.rsplit(maxsplit=1)[-1] if what.startswith("agent") else "controller"
        try:
            tail = (self.dir / "logs" / f"{name}.log").read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "".join(f"\n  | {line}" for line in tail)

    # ---- down --------------------------------------------------------------------------------------------------

    def down(self, *, quiet: bool = False, keep_state: bool = False) -> int:
        """Stop agents, every QEMU of the lab, the controller; return the number of QEMU processes stopped."""
        say: Say = (lambda _m: None) if quiet else self.say
        state = self.load_state()
        if state is None and not self.dir.exists():
            say("no lab to stop")
            return 0
        if state is not None:
            for name, pid in state.agents.items():
                say(f"stopping agent {name}")
                processes.stop(pid, self._marker())
        stopped = sum(processes.kill_qemus_under(root) for root in self._qemu_roots() if root.exists())
        say(f"stopped {stopped} QEMU process(es)")
        if state is not None and state.controller_pid:
            say("stopping the controller")
            processes.stop(state.controller_pid, self._marker())
        self._destroy_network(state, say)  # after the QEMUs: a tap keeps its namespace alive
        if not keep_state:
            self._wipe()
        return stopped

    def _wipe(self) -> None:
        state = self.load_state()
        for root in self._qemu_roots():
            if root.exists():
                processes.kill_qemus_under(root)
        self._destroy_network(state, lambda _m: None)
        shutil.rmtree(self.dir, ignore_errors=False)

    def status(self) -> dict[str, Any]:
        state = self.load_state()
        alive = self.running()
        out: dict[str, Any] = {
            "lab_dir": str(self.dir),
            "up": bool(alive) and all(alive.values()),
            "processes": alive,
            "qemu_processes": len(processes.qemu_pids_under(self.dir)) if self.dir.exists() else 0,
        }
        if state is not None:
            out["accel"] = state.accel
            out["controller_url"] = f"https://127.0.0.1:{state.port}"
            out["started_at"] = state.started_at
            if state.network is not None:
                network = netlab.LabNetwork.from_json(state.network)
                out["network"] = {
                    "underlay_netns": network.underlay_netns,
                    "hosts": {h.name: {"netns": h.netns, "underlay": h.underlay_ip} for h in network.hosts},
                }
        return out


def host_name(index: int) -> str:
    """The name of the lab's ``index``-th host (from 0): host-a, host-b, ..."""
    return f"host-{chr(ord('a') + index)}"


def default_say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
