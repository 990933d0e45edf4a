"""Agent settings, loaded once from the command line and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
    cache_dir: Path | None = None
    snapshots_keep: int = 1  # pre-migration snapshots kept per disk (older ones are scrubbed); 0 keeps none

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
