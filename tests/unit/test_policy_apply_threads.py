"""Policy apply through the API: files parsed once and compiled once per request, the compiled index put in force as
it is; the slow work runs in worker threads while the event loop serves other tasks, and an index built meanwhile
catches up with the changes the loop made."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI

from ferryman.cmdb.sql import open_repository
from ferryman.controller.app import Principal
from ferryman.controller.compliance import Compliance
from ferryman.controller.fleet import Change, Fleet
from ferryman.controller.policy_routes import policy_routes
from ferryman.controller.reconcile import Reconciler
from ferryman.core.models import HostState, Site
from ferryman.pki.ca import CertificateAuthority
from ferryman.policy.compiled import CompiledPolicies, compile_policies
from ferryman.policy.schema import PolicySet, parse_policies
from ferryman.scheduler.governor import GovernorSettings
from ferryman.testing.clock import FakeClock
from ferryman.testing.inventory import enrolled_host, small_vm

POLICY = """\
name: prod-vault
select:
  tenants: [acme]
  profile: {environment: production}
require:
  min_site_security_level: 3
  min_patch_level: 3
  forbidden_neighbours:
    - other_tenant: true
      profile: {environment: test}
"""
DOCS = {"prod.yaml": POLICY}


def _on_loop() -> bool:
    """Whether the calling thread is running an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class WatchedRepository:
    """The CMDB, noting each call made from a thread that runs an event loop."""

    def __init__(self, repo: object) -> None:
        self._repo = repo
        self.on_loop: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._repo, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if _on_loop():
                self.on_loop.append(name)
            return attr(*args, **kwargs)

        return call


@dataclass
class Counting:
    """Parser and compiler of the compliance service, counted; ``gate`` runs before each compilation."""

    parsed: int = 0
    compiled: list[CompiledPolicies] = field(default_factory=list)
    gate: Callable[[], None] | None = None

    def parse(self, documents: Mapping[str, str]) -> PolicySet:
        self.parsed += 1
        return parse_policies(documents)

    def compile(self, policy_set: PolicySet) -> CompiledPolicies:
        if self.gate is not None:
            self.gate()
        self.compiled.append(compile_policies(policy_set))
        return self.compiled[-1]


@dataclass
class World:
    fleet: Fleet
    compliance: Compliance
    repo: WatchedRepository
    counting: Counting
    app: FastAPI


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    clock = FakeClock()
    sql = open_repository(f"sqlite:///{tmp_path / 'cmdb.sqlite'}", clock=clock)
    sql.add_site(Site("vault", 4))
    sql.add_site(Site("edge", 2))
    for h in (enrolled_host("h1", "vault", 5), enrolled_host("h2", "vault", 3), enrolled_host("h3", "edge", 9)):
        sql.add_host(h)
        sql.set_host_state(h.name, HostState.ENROLLED)
    for v, on in ((small_vm("web", "acme", "production"), "h2"), (small_vm("ci", "globex", "test"), "h1")):
        sql.ensure_tenant(v.tenant)
        sql.add_vm(v, on, clock.now())
    repo = WatchedRepository(sql)
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", clock)
    fleet = Fleet(repo, object(), ca, clock, Reconciler(repo, clock, 30))  # type: ignore[arg-type]
    counting = Counting()
    compliance = Compliance(fleet, GovernorSettings(), parser=counting.parse, compiler=counting.compile)
    fleet.admission = compliance
    fleet.watch(compliance.on_change)
    app = FastAPI()
    Person = Annotated[Principal, Depends(lambda: Principal("token:admin", "admin"))]
    policy_routes(app, fleet, compliance, object(), Person)  # type: ignore[arg-type]
    yield World(fleet, compliance, repo, counting, app)
    sql.close()


def client(world: World) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=world.app), base_url="http://controller")


async def test_apply_parses_once_compiles_once_and_puts_that_compilation_in_force(world: World) -> None:
    """An apply request parses its files once and compiles them once; the index in force holds that compilation."""
    async with client(world) as api:
        response = await api.post("/api/v1/policies/apply", json={"documents": DOCS})
    assert response.status_code == 200 and response.json()["applied"] is True
    assert (world.counting.parsed, len(world.counting.compiled)) == (1, 1)
    assert world.compliance.index().compiled is world.counting.compiled[0]
    assert world.compliance.version is not None and world.compliance.version.version == 1


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/policies/apply", {"documents": DOCS, "dry_run": True}),
        ("/api/v1/policies/preview", {"documents": DOCS}),
        ("/api/v1/policies/preview", {"documents": DOCS, "dry_run": False}),  # a preview never applies
        ("/api/v1/policies/validate", {"documents": DOCS}),
    ],
)
async def test_dry_run_and_validate_parse_once_compile_once_and_change_nothing(
    world: World, path: str, body: dict[str, Any]
) -> None:
    """A dry run (preview included) and a validation each parse and compile once, and put nothing in force."""
    async with client(world) as api:
        response = await api.post(path, json=body)
    assert response.status_code == 200 and not response.json()["errors"]
    assert (world.counting.parsed, len(world.counting.compiled)) == (1, 1)
    assert not world.compliance.active and world.fleet.repo.current_policy_version() is None


def test_the_audit_after_an_apply_reuses_the_compilation(world: World) -> None:
    """Applying in code parses and compiles once; a periodic audit of the same version compiles nothing again."""
    world.compliance.apply(DOCS, "token:admin")
    world.compliance.audit_all()
    assert (world.counting.parsed, len(world.counting.compiled)) == (1, 1)
    assert world.compliance.index().compiled is world.counting.compiled[0]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v1/policies/validate", {"documents": DOCS}),
        ("POST", "/api/v1/policies/apply", {"documents": DOCS, "dry_run": True}),
        ("POST", "/api/v1/policies/preview", {"documents": DOCS}),
        ("POST", "/api/v1/policies/apply", {"documents": DOCS}),
        ("GET", "/api/v1/policies/versions", None),
        ("POST", "/api/v1/compliance/check", None),
        ("GET", "/api/v1/compliance/plan", None),
        ("POST", "/api/v1/compliance/plan/execute", None),
        ("GET", "/api/v1/compliance/violations", None),
        ("GET", "/api/v1/compliance/report?tenant=acme", None),
        ("POST", "/api/v1/place", {"tenant": "acme", "profile": {"environment": "production"}}),
        ("PATCH", "/api/v1/hosts/h2", {"patch_level": 4}),
    ],
)
async def test_policy_and_compliance_routes_never_use_the_cmdb_on_the_event_loop(
    world: World, method: str, path: str, body: dict[str, Any] | None
) -> None:
    """Every CMDB call of the policy and compliance routes is made off the event loop's thread."""
    if not path.startswith(("/api/v1/policies/validate", "/api/v1/policies/apply", "/api/v1/policies/preview")):
        world.compliance.apply(DOCS, "token:admin")
        world.repo.on_loop.clear()  # the set-up ran on the loop
    async with client(world) as api:
        response = await api.request(method, path, json=body)
    assert response.status_code == 200, response.text
    assert world.repo.on_loop == []


async def test_apply_compiles_in_a_worker_while_the_loop_changes_the_fleet(world: World) -> None:
    """A VM the loop moves while an apply compiles in a worker is where it went in the index the apply puts in force."""
    loop = asyncio.get_running_loop()
    compiling = loop.create_future()
    release = threading.Event()

    def gate() -> None:
        assert not _on_loop(), "policies compiled on the event loop"
        loop.call_soon_threadsafe(compiling.set_result, None)
        release.wait()

    world.counting.gate = gate
    async with client(world) as api:
        request = asyncio.create_task(api.post("/api/v1/policies/apply", json={"documents": DOCS}))
        try:
            done, _ = await asyncio.wait({request, compiling}, return_when=asyncio.FIRST_COMPLETED)
            assert compiling in done and not request.done()
            # the loop is free meanwhile: web moves next to globex's test VM, announced as the migration runner does
            world.fleet.repo.move_vm("id-web", "h1", world.fleet.clock.now())
            world.fleet.changed(Change(vm_id="id-web"))
        finally:
            release.set()
        response = await request
    assert response.status_code == 200 and response.json()["applied"] is True
    assert world.compliance.index().vm("id-web").host == "h1"
    assert [(v.vm_id, v.rule, v.host) for v in world.fleet.repo.list_violations()] == [
        ("id-web", "forbidden_neighbours[0]", "h1")
    ]


async def test_an_index_built_for_an_older_version_is_not_put_in_force(world: World) -> None:
    """An audit loading another controller's version while this one clears the policies keeps the newer in force."""
    world.compliance.apply(DOCS, "token:admin")
    world.fleet.repo.add_policy_version({"other.yaml": POLICY}, "token:other", world.fleet.clock.now())
    loop = asyncio.get_running_loop()
    compiling = loop.create_future()
    release = threading.Event()

    def gate() -> None:
        assert not _on_loop(), "policies compiled on the event loop"
        loop.call_soon_threadsafe(compiling.set_result, None)
        release.wait()

    world.counting.gate = gate
    async with client(world) as api:
        request = asyncio.create_task(api.post("/api/v1/compliance/check"))
        try:
            done, _ = await asyncio.wait({request, compiling}, return_when=asyncio.FIRST_COMPLETED)
            assert compiling in done
            cleared = world.compliance.clear("token:admin")
        finally:
            release.set()
        response = await request
    assert response.status_code == 200
    assert cleared.version == 3 and world.compliance.version is not None and world.compliance.version.version == 3
    assert not world.compliance.active
