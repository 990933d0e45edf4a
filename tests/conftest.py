"""Fixtures shared by the suites. The ``lab`` fixture is a real lab: controller, three agents, QEMU guests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ferryman.client import Api, CliConfig
from ferryman.lab.lab import Lab, LabState

LAB_PORT = 18443
LAB_AGENT_PORT = 18444


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


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    """A lab of three hosts with two booted VMs, shared by the lab tests of the session."""
    lab_dir = tmp_path_factory.mktemp("ferryman") / "lab"
    lab = Lab(lab_dir, say=lambda m: print(m, file=sys.stderr))
    env = {**os.environ, "FERRYMAN_LAB_DIR": str(lab_dir)}
    env.pop("FERRYMAN_CONFIG", None)
    try:
        lab.up(hosts=3, vms=2, port=LAB_PORT, agent_port=LAB_AGENT_PORT)
        yield LabHandle(lab, env)
    finally:
        lab.down(quiet=True)


@pytest.fixture
def api(lab: LabHandle) -> Api:
    return lab.api()


def api_for(lab: LabHandle) -> Api:
    return Api(CliConfig.load(lab.dir / "cli.json"))
