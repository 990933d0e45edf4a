"""Image baselines and revoked images in compliance, on a real CMDB: the ``min_image_version`` rule read from the
image registry (violations, admission refused with the reason), and revoked images as findings of the registry
itself, with or without policies, opened by a revocation at once and resolved when the VM is gone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ferryman.cmdb.images import ImageRecord, SigningKeyRecord
from ferryman.cmdb.sql import SqlRepository
from ferryman.controller.compliance import IMAGE_REGISTRY, IMAGE_REVOKED, Compliance
from ferryman.controller.fleet import Change, Fleet, VMRequest
from ferryman.controller.reconcile import Reconciler
from ferryman.core import errors
from ferryman.core.models import HostState, Site
from ferryman.pki.ca import CertificateAuthority
from ferryman.scheduler.governor import GovernorSettings
from ferryman.testing.clock import FakeClock
from ferryman.testing.inventory import enrolled_host, small_vm

from .conftest import T0

BASELINE = """\
name: acme-baseline
select: {tenants: [acme]}
require:
  min_image_version: {debian: "12.8", ubuntu: "22.04.4"}
"""
DOCS = {"baseline.yaml": BASELINE}


class NoAgents:
    """The compliance service never calls an agent."""


def image(name: str, os: str, version: str) -> ImageRecord:
    return ImageRecord(
        name=name,
        disk_digest=f"sha256:{name}",
        disk_size=1 << 20,
        format="qcow2",
        virtual_size=1 << 26,
        os=os,
        version=version,
        publisher="acme-release",
        signature="c2ln",
        boot="firmware",
        imported_at=T0,
        imported_by="token:admin",
    )


@dataclasses.dataclass
class World:
    repo: SqlRepository
    fleet: Fleet
    compliance: Compliance
    clock: FakeClock

    def open(self) -> list[tuple[str, str, str, str | None]]:
        """The open violations as (VM id, policy, rule, host), by VM id."""
        return sorted((v.vm_id, v.policy, v.rule, v.host) for v in self.repo.list_violations())

    def revoke(self, name: str, reason: str, *, announce: bool = True) -> None:
        self.repo.revoke_image(name, self.clock.now(), "token:security", reason)
        if announce:
            self.fleet.changed(Change(image=name))


@pytest.fixture
def world(repo: SqlRepository, tmp_path: Path) -> World:
    """Hosts h1 and h2; acme's old (debian 12.7) and new (debian 12.8) on h1, lab (an image unknown to the registry)
    and alpine (an OS the baseline does not name) on h2, and globex's legacy (debian 12.7) on h2."""
    clock = FakeClock(T0)
    repo.add_site(Site("s1", 3))
    for h in (enrolled_host("h1"), enrolled_host("h2")):
        repo.add_host(h)
        repo.set_host_state(h.name, HostState.ENROLLED)
    repo.add_signing_key(SigningKeyRecord("acme-release", "PEM", "sha256:00", added_at=T0, added_by="token:admin"))
    for record in (
        image("deb-12-7", "debian", "12.7"),
        image("deb-12-8", "debian", "12.8"),
        image("alpine-3", "alpine", "3.19"),
    ):
        repo.add_image(record)
    for vm, on in (
        (small_vm("old", "acme", image="deb-12-7"), "h1"),
        (small_vm("new", "acme", image="deb-12-8"), "h1"),
        (small_vm("lab", "acme", image="lab"), "h2"),
        (small_vm("alpine", "acme", image="alpine-3"), "h2"),
        (small_vm("legacy", "globex", image="deb-12-7"), "h2"),
    ):
        repo.ensure_tenant(vm.tenant)
        repo.add_vm(vm, on, clock.now())
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", clock)
    fleet = Fleet(repo, NoAgents(), ca, clock, Reconciler(repo, clock, 30))  # type: ignore[arg-type]
    compliance = Compliance(fleet, GovernorSettings())
    fleet.admission = compliance
    fleet.watch(compliance.on_change)
    return World(repo, fleet, compliance, clock)


def test_baseline_violations_name_the_image_and_the_unknown_baseline(world: World) -> None:
    """Applying the baseline opens a violation for the VM below it and for the VM whose image is unknown, no other."""
    world.compliance.apply(DOCS, "token:admin")
    assert world.open() == [
        ("id-lab", "acme-baseline", "min_image_version", "h2"),
        ("id-old", "acme-baseline", "min_image_version", "h1"),
    ]
    messages = {v.vm_id: v.message for v in world.repo.list_violations()}
    assert messages["id-old"] == (
        "image deb-12-7 is debian 12.7, below the minimum debian version 12.8 required by acme-baseline"
    )
    assert messages["id-lab"].startswith("image baseline unknown: image lab is not in the image registry")


def test_an_image_announced_later_refreshes_the_baseline(world: World) -> None:
    """Once the registry knows an image a VM runs from and says so, the VM's baseline is read again at once."""
    world.compliance.apply(DOCS, "token:admin")
    world.repo.add_image(image("lab", "debian", "12.9"))
    world.fleet.changed(Change(image="lab"))
    assert world.open() == [("id-old", "acme-baseline", "min_image_version", "h1")]
    assert world.compliance.index().vm("id-lab").image_version == "12.9"


def test_admission_below_the_baseline_is_refused_on_every_host(world: World) -> None:
    """A creation from an image below the baseline, or unknown, and a migration of such a VM are refused with the
    reason; an image at the baseline is placed."""
    world.compliance.apply(DOCS, "token:admin")
    hosts = [world.repo.get_host(n) for n in ("h1", "h2")]
    request = VMRequest(name="api", tenant="acme", memory_mb=128, vcpus=1, disk_bytes=1 << 26, profile={})
    for name, why in (("deb-12-7", "is debian 12.7, below"), (None, "image ferryman-lab-guest is not in the image")):
        # None: the lab guest image, which the registry does not know
        with pytest.raises(errors.PolicyRefused, match="min_image_version rejects 2") as refused:
            world.compliance.admit_creation(dataclasses.replace(request, image=name), hosts, "token:admin")
        assert why in refused.value.reasons[1]
    for host in hosts:
        with pytest.raises(errors.PolicyRefused, match=r"below the minimum debian version 12\.8") as refused:
            alone = dataclasses.replace(request, image="deb-12-7", host=host.name)
            world.compliance.admit_creation(alone, [host], "token:admin")
        assert refused.value.reasons == [
            "image deb-12-7 is debian 12.7, below the minimum debian version 12.8 required by acme-baseline"
        ]
    chosen = world.compliance.admit_creation(dataclasses.replace(request, image="deb-12-8"), hosts, "token:admin")
    assert chosen is not None
    old = world.repo.get_vm("old")
    with pytest.raises(errors.PolicyRefused, match=r"image deb-12-7 is debian 12\.7"):
        world.compliance.admit_migration(old, "h2", force=False, role="admin", principal="token:ops")
    assert world.compliance.migration_target(old, ["h1", "h2"]) is None


def test_revoked_image_is_a_finding_without_policies_and_resolves_when_the_vm_is_gone(world: World) -> None:
    """With no policy in force, a revocation opens a registry finding per VM of the image at once, with the reason;
    deleting the VM resolves its finding."""
    assert not world.compliance.active
    world.clock.advance(60)
    world.revoke("deb-12-7", "CVE-2026-1234 in openssl")
    assert world.open() == [
        ("id-legacy", IMAGE_REGISTRY, IMAGE_REVOKED, "h2"),
        ("id-old", IMAGE_REGISTRY, IMAGE_REVOKED, "h1"),
    ]
    (finding, _) = world.repo.list_violations()
    assert "deb-12-7" in finding.message and "CVE-2026-1234 in openssl" in finding.message
    assert finding.first_seen == world.clock.now()
    events = world.repo.list_events(kind_prefix="compliance.")
    assert sorted((e.kind, e.vm, e.data["policy"]) for e in events) == [
        ("compliance.violation", "id-legacy", IMAGE_REGISTRY),
        ("compliance.violation", "id-old", IMAGE_REGISTRY),
    ]
    world.clock.advance(60)
    world.repo.delete_vm("id-old", world.clock.now())
    world.fleet.changed(Change(vm_id="id-old"))
    assert world.open() == [("id-legacy", IMAGE_REGISTRY, IMAGE_REVOKED, "h2")]
    (gone,) = world.repo.list_violations(open_only=False, vm_id="id-old")
    assert gone.resolved_at == world.clock.now()
    assert world.compliance.audit_all() == ([], [])


def test_revoked_image_with_policies_in_force_incrementally_and_in_the_full_audit(world: World) -> None:
    """Under policies a revocation is checked at once as well; one the service was not told of is found by the full
    audit; a policy preview neither opens nor resolves registry findings, and clearing the policies keeps them."""
    world.compliance.apply(DOCS, "token:admin")
    world.revoke("deb-12-8", "signed with a leaked key")
    assert ("id-new", IMAGE_REGISTRY, IMAGE_REVOKED, "h1") in world.open()
    assert world.compliance.index().vm("id-new").image_revoked

    world.revoke("alpine-3", "end of life", announce=False)  # another controller revoked it
    assert ("id-alpine", IMAGE_REGISTRY, IMAGE_REVOKED, "h2") not in world.open()
    opened, _ = world.compliance.audit_all()
    assert [(v.vm_id, v.rule) for v in opened] == [("id-alpine", IMAGE_REVOKED)]

    world.repo.move_vm("id-new", "h2", world.clock.now())
    world.fleet.changed(Change(vm_id="id-new"))
    assert ("id-new", IMAGE_REGISTRY, IMAGE_REVOKED, "h2") in world.open()

    preview = world.compliance.preview(world.compliance.validate(DOCS))
    assert preview.would_violate == [] and preview.would_resolve == []
    world.compliance.clear("token:admin")
    assert world.open() == [
        ("id-alpine", IMAGE_REGISTRY, IMAGE_REVOKED, "h2"),
        ("id-new", IMAGE_REGISTRY, IMAGE_REVOKED, "h2"),
    ]


def test_vm_facts_read_the_registry_once(world: World) -> None:
    """The fleet's VM facts carry each VM's image baseline, unknown images as None, from one registry read."""
    calls = []
    list_images = world.repo.list_images

    def counted() -> list[ImageRecord]:
        calls.append(1)
        return list_images()

    world.repo.list_images = counted  # type: ignore[method-assign]
    facts = {f.name: f for f in world.compliance.vm_facts()}
    assert len(calls) == 1
    assert (facts["old"].image, facts["old"].image_os, facts["old"].image_version) == ("deb-12-7", "debian", "12.7")
    assert (facts["lab"].image, facts["lab"].image_os, facts["lab"].image_version) == ("lab", None, None)
    assert not any(f.image_revoked for f in facts.values())
