"""Fixtures shared by the suites. The ``lab`` fixture is a real lab: controller, three agents, QEMU guests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ferryman.client import Api, CliConfig
from ferryman.testing.labhandle import LabHandle, running_lab

LAB_PORT = 18443
LAB_AGENT_PORT = 18444


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    """A lab of three hosts with two booted VMs, shared by the lab tests of the session."""
    lab_dir = tmp_path_factory.mktemp("ferryman") / "lab"
    with running_lab(lab_dir, hosts=3, vms=2, port=LAB_PORT, agent_port=LAB_AGENT_PORT) as handle:
        yield handle


@pytest.fixture
def api(lab: LabHandle) -> Api:
    return lab.api()


def api_for(lab: LabHandle) -> Api:
    return Api(CliConfig.load(lab.dir / "cli.json"))
