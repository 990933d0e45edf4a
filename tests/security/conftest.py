"""A real controller (``build``: SQLite CMDB, CA, Cedar) driven over HTTP in-process, without agents, with a fleet of
two tenants, acme and globex, each with a VM on host h1, a network, an incident and an event, and one principal per
role (the tenant roles in acme). Each test gets its own copy of one seeded data directory.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from ferryman.cmdb.images import ImageRecord, SigningKeyRecord
from ferryman.cmdb.incidents import IncidentRecord
from ferryman.controller import access
from ferryman.controller.main import build
from ferryman.controller.settings import ControllerSettings
from ferryman.core.models import VM, Host, Network, Site, VMState

ROLES = (
    "fleet-admin",
    "host-operator",
    "security-officer",
    "auditor",
    "tenant-admin",
    "tenant-viewer",
    "alert-source",
)


@dataclass
class World:
    client: TestClient
    tokens: dict[str, str]
    fleet: Any
    ids: dict[str, str]

    def headers(self, role: str, approval: str | int | None = None) -> dict[str, str]:
        out = {"Authorization": f"Bearer {self.tokens[role]}"}
        if approval is not None:
            out["X-Ferryman-Approval"] = str(approval)
        return out


def _seed(fleet: Any) -> dict[str, str]:
    repo = fleet.repo
    now = fleet.clock.now()
    repo.add_site(Site("dc1", 3))
    repo.add_host(Host("h1", "127.0.0.1", 1, "dc1", "z1", "10.0.0.0/24", "kvm", "qemu", "7.2", 1, underlay="192.0.2.1"))
    repo.add_signing_key(SigningKeyRecord("pub", "-----BEGIN PUBLIC KEY-----", "sha256:" + "2" * 64, now, "x"))
    repo.add_image(
        ImageRecord(
            "lab", "sha256:" + "1" * 64, 1 << 20, "qcow2", 1 << 30, "debian", "12", "pub", "c2ln", "firmware", now, "x"
        )
    )
    ids = {}
    for tenant, vm_name in (("acme", "acme-web"), ("globex", "globex-db")):
        repo.ensure_tenant(tenant)
        vm = VM(
            id=f"id-{vm_name}",
            name=vm_name,
            tenant=tenant,
            memory_mb=128,
            vcpus=1,
            disk_bytes=1 << 30,
            image="lab",
            canary=f"c-{vm_name}",
            state=VMState.RUNNING,
        )
        repo.add_vm(vm, "h1", now - dt.timedelta(hours=1))
        repo.add_network(Network(f"{tenant}-net", tenant, f"10.{len(ids) + 1}.0.0/24", 0))
        incident, _ = repo.open_incident(
            IncidentRecord(0, "low", f"incident of {vm_name}", vm.id, "h1", tenant, "manual", "open", now, "system")
        )
        ids[tenant] = str(incident.id)
        fleet.audit("vm.note", f"{vm_name} of {tenant} did something", "system", vm=vm.id, host="h1")
    return ids


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded controller data directory; each world is a copy of it."""
    root = tmp_path_factory.mktemp("template")
    settings = ControllerSettings.load(root, "127.0.0.1:1", None)
    app, fleet, _ = build(settings)
    ids = _seed(fleet)
    admin = settings.admin_token_file.read_text().strip()
    client = TestClient(app, raise_server_exceptions=False)
    tokens = {ROLES[0]: admin}
    for role in ROLES[1:]:
        tenant = "acme" if role.startswith("tenant-") else None
        out = client.post(
            "/api/v1/principals",
            json={"name": role.replace("-", ""), "role": role, "tenant": tenant},
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert out.status_code == 201, out.text
        tokens[role] = out.json()["token"]
    (root / "world.json").write_text(json.dumps({"tokens": tokens, "incidents": ids}))
    fleet.repo.close()
    return root


def open_world(template: Path, root: Path) -> World:
    """A controller over a copy of the template's data directory at ``root``."""
    shutil.copytree(template, root)
    settings = ControllerSettings.load(root, "127.0.0.1:1", None)
    app, fleet, _ = build(settings)
    saved = json.loads((root / "world.json").read_text())
    return World(TestClient(app, raise_server_exceptions=False), saved["tokens"], fleet, saved["incidents"])


@pytest.fixture(autouse=True)
def every_denial_audited(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests count audited denials: none is folded into a summary here (the limit has a test of its own)."""
    monkeypatch.setattr(access, "DENIALS_AUDITED", 10**9)


@pytest.fixture
def world(template: Path, tmp_path: Path) -> Iterator[World]:
    opened = open_world(template, tmp_path / "controller")
    yield opened
    opened.fleet.repo.close()
