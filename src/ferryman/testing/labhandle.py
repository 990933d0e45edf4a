"""A running lab as tests drive it: its API client, and the real ``ferryman`` command run against it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferryman.client import Api
from ferryman.lab.lab import Lab, LabState
from ferryman.testing.cliserver import run_cli


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
        """Run the real ``ferryman`` command against the lab, each time a process of its own (forked from a process
        that has imported the CLI once: :mod:`ferryman.testing.cliserver`)."""
        proc = run_cli(args, self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"ferryman {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def as_principal(self, name: str, role: str, tenant: str | None = None) -> LabHandle:
        """The same lab driven with the token of principal ``name`` (created with ``role`` the first time)."""
        token_file = self.dir / "principals" / f"{name}.token"
        if not token_file.exists():
            args = ["principal", "create", name, "--role", role, *(["--tenant", tenant] if tenant else [])]
            token = self.cli(*args).stdout.strip()
            token_file.parent.mkdir(mode=0o700, exist_ok=True)
            token_file.write_text(token + "\n")
            token_file.chmod(0o600)
        env = {k: v for k, v in self.env.items() if k != "FERRYMAN_TOKEN_FILE"}
        return LabHandle(self.lab, {**env, "FERRYMAN_TOKEN": token_file.read_text().strip()})

    def approved(self, proc: subprocess.CompletedProcess[str], approver: LabHandle) -> str:
        """The approval id a refused dangerous command asked for, approved by ``approver`` (another principal)."""
        error = one_line_error(proc)
        match = re.search(r"approval (\d+) requested", error)
        assert match is not None, error
        approver.cli("approval", "approve", match.group(1))
        return match.group(1)

    def host_pki(self, name: str) -> tuple[Path, Path, Path]:
        """(certificate, key, CA) of a lab host."""
        pki = self.lab.host_dir(name) / "pki"
        return pki / "host.pem", pki / "host.key", pki / "ca.pem"


PROGRESS_PREFIXES = ("creating ", "capturing ", "importing ", "hashing ")


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed ``ferryman`` command printed (its progress lines aside); asserts exit code 1 and that no
    traceback reached the user."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(PROGRESS_PREFIXES)]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@contextlib.contextmanager
def running_lab(lab_dir: Path, *, hosts: int, vms: int, port: int, agent_port: int) -> Iterator[LabHandle]:
    """A lab up in ``lab_dir`` for the ``with`` block (its progress on stderr), always taken down after."""
    lab = Lab(lab_dir, say=lambda m: print(m, file=sys.stderr))
    env = {**os.environ, "FERRYMAN_LAB_DIR": str(lab_dir)}
    env.pop("FERRYMAN_CONFIG", None)
    try:
        lab.up(hosts=hosts, vms=vms, port=port, agent_port=agent_port)
        yield LabHandle(lab, env)
    finally:
        lab.down(quiet=True)
