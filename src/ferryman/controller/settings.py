"""Controller settings: loaded once (command line + environment), passed explicitly, never read globally."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

from ferryman.core.errors import InvalidInput
from ferryman.scheduler.governor import GovernorSettings


@dataclass(frozen=True)
class ReconcileSettings:
    interval_s: float = 5.0
    # an agent whose last report is older than this is "unreachable" in listings
    stale_after_s: float = 30.0
    # a full compliance audit (every VM against the policies) runs this often; changes are checked at once
    compliance_interval_s: float = 60.0


def governor_from_env(env: Mapping[str, str]) -> GovernorSettings:
    """Every governor limit can be set as ``FERRYMAN_GOVERNOR_<FIELD>`` (e.g. ``FERRYMAN_GOVERNOR_BREAKER_THRESHOLD``);
    ``FERRYMAN_VM_COOLDOWN_S`` and ``FERRYMAN_PRINCIPAL_RATE`` are kept as short names. ``none`` unsets an optional
    limit (the bandwidth cap)."""
    aliases = {"vm_cooldown_s": "FERRYMAN_VM_COOLDOWN_S", "principal_rate": "FERRYMAN_PRINCIPAL_RATE"}
    values: dict[str, Any] = {}
    defaults = GovernorSettings()
    for f in fields(GovernorSettings):
        name = f"FERRYMAN_GOVERNOR_{f.name.upper()}"
        raw = env.get(name, env.get(aliases.get(f.name, name)))
        if raw is None:
            continue
        default = getattr(defaults, f.name)
        try:
            if raw.strip().lower() == "none" and f.name == "bandwidth_cap_bytes_per_s":
                values[f.name] = None
            else:
                values[f.name] = float(raw) if isinstance(default, float) else int(raw)
        except ValueError:
            raise InvalidInput(f"{name}={raw!r} is not a number") from None
    return GovernorSettings(**values)


PlainScrubMode = Literal["zero", "random"]
SCRUB_MODES: tuple[PlainScrubMode, ...] = ("zero", "random")


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
    scrub_mode: PlainScrubMode = "zero"  # how migrations scrub plain VMs' losing copies: zero or random
    default_image: str | None = None  # the registry image of a VM created without --image (None: hosts' own)
    # alerts about one VM or host (rate per second, burst), and about the whole fleet (FERRYMAN_ALERT_*)
    alert_limits: dict[str, float] = field(default_factory=lambda: dict(ControllerSettings.DEFAULT_ALERT_LIMITS))
    DEFAULT_ALERT_LIMITS: ClassVar[dict[str, float]] = {
        "per_vm_rate": 0.2,
        "per_vm_burst": 5,
        "global_rate": 5.0,
        "global_burst": 50,
    }

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    @property
    def images_dir(self) -> Path:
        """The image store: every imported artefact under its SHA-256 digest."""
        return self.data_dir / "images"

    @property
    def keys_dir(self) -> Path:
        """The key-encryption keys that wrap encrypted VMs' disk keys (owner-only)."""
        return self.data_dir / "keys"

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
        """Arguments win over the environment (FERRYMAN_DATA_DIR, FERRYMAN_BIND, FERRYMAN_DB_URL) over defaults;
        FERRYMAN_DEFAULT_IMAGE names the registry image of a VM created without one."""
        env = os.environ
        data = Path(data_dir or env.get("FERRYMAN_DATA_DIR") or Path.home() / ".local/share/ferryman/controller")
        host, _, port = (bind or env.get("FERRYMAN_BIND") or "127.0.0.1:8443").rpartition(":")
        url = db_url or env.get("FERRYMAN_DB_URL") or f"sqlite:///{data / 'cmdb.sqlite'}"
        interval = float(env.get("FERRYMAN_RECONCILE_INTERVAL", "5"))
        governor = governor_from_env(env)
        chosen = env.get("FERRYMAN_SCRUB_MODE", "zero")
        scrub_mode = next((mode for mode in SCRUB_MODES if mode == chosen), None)
        if scrub_mode is None:
            raise InvalidInput(
                f"FERRYMAN_SCRUB_MODE={chosen!r}: use zero or random (encrypted VMs are always crypto-erased)"
            )
        limits = {}
        for name, default in ControllerSettings.DEFAULT_ALERT_LIMITS.items():
            raw = env.get(f"FERRYMAN_ALERT_{name.upper()}")
            try:
                limits[name] = float(raw) if raw is not None else default
            except ValueError:
                raise InvalidInput(f"FERRYMAN_ALERT_{name.upper()}={raw!r} is not a number") from None
        return cls(
            alert_limits=limits,
            default_image=env.get("FERRYMAN_DEFAULT_IMAGE") or None,
            scrub_mode=scrub_mode,
            data_dir=data,
            db_url=url,
            bind_host=host or "127.0.0.1",
            bind_port=int(port),
            reconcile=ReconcileSettings(
                interval_s=interval, compliance_interval_s=float(env.get("FERRYMAN_COMPLIANCE_INTERVAL", "60"))
            ),
            governor=governor,
        )
