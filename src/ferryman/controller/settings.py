"""Controller settings: loaded once (command line + environment), passed explicitly, never read globally."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ferryman.scheduler.governor import GovernorSettings


@dataclass(frozen=True)
class ReconcileSettings:
    interval_s: float = 5.0
    # an agent whose last report is older than this is "unreachable" in listings
    stale_after_s: float = 30.0


@dataclass(frozen=True)
class ControllerSettings:
    data_dir: Path
    db_url: str
    bind_host: str = "127.0.0.1"
    bind_port: int = 8443
    name: str = "ferryman-controller"
    agent_timeout_s: float = 60.0
    enrol_token_ttl_s: int = 3600
    reconcile: ReconcileSettings = field(default_factory=ReconcileSettings)
    governor: GovernorSettings = field(default_factory=GovernorSettings)

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / "admin.token"

    @property
    def url(self) -> str:
        return f"https://{self.bind_host}:{self.bind_port}"

    @classmethod
    def load(
        cls, data_dir: Path | None = None, bind: str | None = None, db_url: str | None = None
    ) -> ControllerSettings:
        """Arguments win over the environment (FERRYMAN_DATA_DIR, FERRYMAN_BIND, FERRYMAN_DB_URL) over defaults."""
        env = os.environ
        data = Path(data_dir or env.get("FERRYMAN_DATA_DIR") or Path.home() / ".local/share/ferryman/controller")
        host, _, port = (bind or env.get("FERRYMAN_BIND") or "127.0.0.1:8443").rpartition(":")
        url = db_url or env.get("FERRYMAN_DB_URL") or f"sqlite:///{data / 'cmdb.sqlite'}"
        interval = float(env.get("FERRYMAN_RECONCILE_INTERVAL", "5"))
        governor = GovernorSettings(
            vm_cooldown_s=float(env.get("FERRYMAN_VM_COOLDOWN_S", "300")),
            principal_rate=int(env.get("FERRYMAN_PRINCIPAL_RATE", "10")),
        )
        return cls(
            data_dir=data,
            db_url=url,
            bind_host=host or "127.0.0.1",
            bind_port=int(port),
            reconcile=ReconcileSettings(interval_s=interval),
            governor=governor,
        )
