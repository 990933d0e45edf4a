"""The controller's compliance service on a real SQLite CMDB: apply with preview, admission of creations and
migrations (with break-glass), incremental re-checks after CMDB changes, first-seen times, and remediation plans."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ferryman.cmdb.journal import MigrationRecord
from ferryman.cmdb.sql import open_repository
from ferryman.controller.compliance import Compliance
from ferryman.controller.fleet import Change, Fleet, VMRequest
from ferryman.controller.reconcile import Reconciler
from ferryman.core import errors
from ferryman.core.models import HostState, Site
from ferryman.pki.ca import CertificateAuthority
from ferryman.policy.schema import PolicyErrors
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
  min_patch_level: PATCH
  forbidden_neighbours:
    - other_tenant: true
      profile: {environment: test}
"""


class NoAgents:
    """The compliance service never calls an agent."""


@pytest.fixture
def world(tmp_path: Path) -> tuple[Fleet, Compliance, FakeClock]:
    clock = FakeClock()
    repo = open_repository(f"sqlite:///{tmp_path / 'cmdb.sqlite'}", clock=clock)
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", clock)
    fleet = Fleet(repo, NoAgents(), ca, clock, Reconciler(repo, clock, 30))  # type: ignore[arg-type]
    repo.add_site(Site("vault", 4))
    repo.add_site(Site("edge", 2))
    for h in (enrolled_host("h1", "vault", 5), enrolled_host("h2", "vault", 3), enrolled_host("h3", "edge", 9)):
        repo.add_host(h)
        repo.set_host_state(h.name, HostState.ENROLLED)
    for v, on in ((small_vm("web", "acme", "production"), "h2"), (small_vm("ci", "globex", "test"), "h1")):
        repo.ensure_tenant(v.tenant)
        repo.add_vm(v, on, clock.now())
    compliance = Compliance(fleet, GovernorSettings(vm_cooldown_s=60))
    fleet.admission = compliance
    fleet.watch(compliance.on_change)
    return fleet, compliance, clock


def docs(patch: int) -> dict[str, str]:
    return {"prod.yaml": POLICY.replace("PATCH", str(patch))}


def test_apply_previews_then_stores_violations_with_first_seen(world):
    """A preview names what a version would violate; applying stores it with first-seen time and an event."""
    fleet, compliance, clock = world
    preview = compliance.preview(compliance.validate(docs(4)))
    assert [(f.vm_id, f.rule) for f in preview.would_violate] == [("id-web", "min_patch_level")]
    assert fleet.repo.list_violations() == []
    version = compliance.apply(docs(4), "token:admin")
    (v,) = fleet.repo.list_violations()
    assert (version.version, v.vm_id, v.host, v.rule, v.first_seen) == (1, "id-web", "h2", "min_patch_level", clock.t)
    assert [e.kind for e in fleet.repo.list_events(kind_prefix="compliance.")] == ["compliance.violation"]


def test_a_policy_no_host_can_satisfy_is_refused_at_apply(world):
    """A floor above every host of the fleet is an apply-time error naming the policy."""
    _, compliance, _ = world
    with pytest.raises(PolicyErrors, match="prod-vault"):
        compliance.apply(docs(99), "token:admin")


def test_changes_are_rechecked_incrementally_and_resolve(world):
    """A host's patch level change and a VM's move re-check the VMs they affect; the violation resolves."""
    fleet, compliance, clock = world
    compliance.apply(docs(3), "token:admin")
    assert fleet.repo.list_violations() == []
    clock.advance(10)
    fleet.update_host("h2", "token:admin", patch_level=2)
    (v,) = fleet.repo.list_violations()
    assert (v.vm_id, v.rule, v.first_seen) == ("id-web", "min_patch_level", clock.t)
    clock.advance(10)
    fleet.repo.move_vm("id-web", "h1", clock.now())  # next to globex's test VM: another rule breaks
    fleet.changed(Change(vm_id="id-web"))
    assert [(x.vm_id, x.rule, x.host) for x in fleet.repo.list_violations()] == [
        ("id-web", "forbidden_neighbours[0]", "h1")
    ]
    assert fleet.repo.list_violations(open_only=False, vm_id="id-web")[0].resolved_at == clock.t


def test_admission_refuses_with_reasons_and_break_glass_needs_its_role(world):
    """A forbidden host is refused with the rule; --force needs a break-glass role and is an alarm event."""
    fleet, compliance, _ = world
    compliance.apply(docs(3), "token:admin")
    web = fleet.repo.get_vm("web")
    with pytest.raises(errors.PolicyRefused, match="security level") as refused:
        compliance.admit_migration(web, "h3", force=False, role="admin", principal="token:ops")
    assert refused.value.reasons
    with pytest.raises(errors.Forbidden, match="break-glass"):
        compliance.admit_migration(web, "h3", force=True, role="viewer", principal="token:ops")
    compliance.admit_migration(web, "h3", force=True, role="admin", principal="token:admin")
    (glass,) = fleet.repo.list_events(kind_prefix="policy.break_glass")
    assert glass.principal == "token:admin" and glass.severity.value == "alarm"

    req = VMRequest(
        name="api", tenant="acme", memory_mb=128, vcpus=1, disk_bytes=1 << 26, profile={"environment": "production"}
    )
    candidates = [fleet.repo.get_host(n) for n in ("h1", "h2", "h3")]
    assert compliance.admit_creation(req, candidates, "token:admin").name == "h2"  # h1: test neighbour; h3: edge
    with pytest.raises(errors.PolicyRefused, match="no host may take api"):
        compliance.admit_creation(req, [candidates[2]], "token:admin")


def test_plan_moves_the_violating_vm_and_respects_cooldown(world):
    """The plan moves the VM off the host below the floor; a VM migrated within its cooldown stays put."""
    fleet, compliance, _ = world
    compliance.apply(docs(4), "token:admin")
    plan = compliance.plan()
    assert [(m.vm_name, m.source, m.target) for m in plan.moves] == []  # h1 (patch 5) holds a test VM of globex
    assert [v.vm_id for v, _ in plan.unresolved] == ["id-web"]
    fleet.repo.move_vm("id-ci", "h3", fleet.clock.now())
    fleet.changed(Change(vm_id="id-ci"))
    plan = compliance.plan()
    assert [(m.vm_name, m.source, m.target) for m in plan.moves] == [("web", "h2", "h1")]
    assert dataclasses.asdict(plan.moves[0])["fixes"] == (("id-web", "prod-vault", "min_patch_level"),)


def test_migration_target_counts_moves_already_started(world):
    """A drain's earlier moves count as arrived: a VM is not sent where a VM it excludes is already headed."""
    fleet, compliance, _ = world
    compliance.apply(docs(3), "token:admin")
    fleet.repo.move_vm("id-ci", "h3", fleet.clock.now())
    fleet.changed(Change(vm_id="id-ci"))
    web = fleet.repo.get_vm("web")
    assert compliance.migration_target(web, ["h1"]) == "h1"
    assert compliance.migration_target(web, ["h1"], planned={"id-ci": "h1"}) is None
    assert compliance.index().vm("id-ci").host == "h3"  # the simulation left the index as it was


def test_admission_counts_unfinished_migrations_as_arrived(world):
    """Two requests racing for one host are judged together: while ci (globex, test) is still migrating to h1, web
    (acme, production) may not be sent or created there, and once that migration has ended h1 is judged as it is."""
    fleet, compliance, clock = world
    compliance.apply(docs(3), "token:admin")
    fleet.repo.move_vm("id-ci", "h3", clock.now())
    fleet.changed(Change(vm_id="id-ci"))
    web = fleet.repo.get_vm("web")
    compliance.admit_migration(web, "h1", force=False, role="admin", principal="token:ops")  # h1 is empty now
    record = MigrationRecord(
        id="m-ci",
        vm_id="id-ci",
        source="h3",
        destination="h1",
        shared_storage=False,
        phase="transferring",
        principal="token:ops",
        generation=1,
        requested_at=clock.now(),
        updated_at=clock.now(),
    )
    fleet.repo.add_migration(record)
    with pytest.raises(errors.PolicyRefused, match="neighbour"):
        compliance.admit_migration(web, "h1", force=False, role="admin", principal="token:ops")
    assert compliance.migration_target(web, ["h1"]) is None
    request = VMRequest(
        name="web-2",
        tenant="acme",
        memory_mb=128,
        vcpus=1,
        disk_bytes=1 << 26,
        profile={"environment": "production"},
        host="h1",
    )
    with pytest.raises(errors.PolicyRefused):
        compliance.admit_creation(request, fleet.repo.list_hosts(), "token:ops")
    assert compliance.index().vm("id-ci").host == "h3"  # judging left the index as it was
    fleet.repo.advance_migration("m-ci", "rolled_back", clock.now(), outcome="rolled_back")
    compliance.admit_migration(web, "h1", force=False, role="admin", principal="token:ops")


def test_two_policies_that_together_leave_no_host_are_refused_at_apply(world):
    """Each policy alone has hosts, but a VM both select has none: apply names both and the VM."""
    fleet, compliance, _ = world
    edge_only = "name: edge-only\nselect:\n  tenants: [acme]\nrequire:\n  sites: [edge]\n"
    with pytest.raises(PolicyErrors, match=r"together with edge-only it leaves no host for web") as refused:
        compliance.apply({**docs(3), "edge.yaml": edge_only}, "token:admin")
    (error,) = refused.value.errors
    assert (error.file, error.field) == ("prod.yaml", "require") and error.line is not None
    assert fleet.repo.current_policy_version() is None
