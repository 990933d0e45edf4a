"""A running lab as tests drive it: its API client, and the real ``ferryman`` command run against it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferryman.client import Api
from ferryman.lab.lab import Lab, LabState


@dataclass
class LabHandle:
    lab: Lab
    env: dict[str, str]

    @property
    def dir(self) -> Path:
        return self.lab.dir

    @property
    def state(self) -> LabState:
        state = self.lab.load_state()
        assert state is not None
        return state

    def api(self) -> Api:
        return self.lab.api()

    def cli(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """Run the real ``ferryman`` command against the lab."""
        proc = subprocess.run(
            [sys.executable, "-m", "ferryman.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"ferryman {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def host_pki(self, name: str) -> tuple[Path, Path, Path]:
        """(certificate, key, CA) of a lab host."""
        pki = self.lab.host_dir(name) / "pki"
        return pki / "host.pem", pki / "host.key", pki / "ca.pem"
