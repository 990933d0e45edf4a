"""Agent settings, loaded once from the command line and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ferryman.agent.hypervisor.boot import BootImage


@dataclass(frozen=True)
class AgentSettings:
    name: str
    state_dir: Path
    listen_host: str
    listen_port: int
    controller_url: str
    controller_ca: Path  # the controller's CA certificate, pinned out of band
    controller_name: str = "ferryman-controller"
    accel: str = "auto"
    report_interval_s: float = 2.0
    cache_dir: Path | None = None  # where the accelerator verdict is cached (default: next to the boot kernel)
    snapshots_keep: int = 1  # pre-migration snapshots kept per disk (older ones are scrubbed); 0 keeps none
    boot: BootImage | None = None  # how this host boots guests, handed over by whoever deploys the agent
    guest_probes: tuple[str, ...] = ()  # extra post-migration guest probes, as ``module:factory`` import paths
    netns: str | None = None  # the network namespace that holds this host's bridges and taps (None: the agent's own)
    underlay_ip: str | None = None  # this host's VXLAN endpoint address (None: no NICs on this host)
    underlay_dev: str = "ul0"

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def cert(self) -> Path:
        return self.pki_dir / "host.pem"

    @property
    def key(self) -> Path:
        return self.pki_dir / "host.key"

    @property
    def ca(self) -> Path:
        return self.pki_dir / "ca.pem"
