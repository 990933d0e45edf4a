"""Impact analysis on SQLite and PostgreSQL, against a hand-drawn history of 3 hosts, 3 tenants and 10 VMs.

The incident VM is ``xray`` (acme). Minutes after t0 (``[from, to)``, half-open; ``…`` still open)::

    h1 │ xray [0,60) [120,…)   papa [0,20)   november [5,…)   quebec [10,60)   mike [40,100)   sierra [90,120)
    h2 │ xray [60,120)   romeo [0,60)   delta [50,80) (deleted at 80)   sierra [70,90)   mike [100,…)
    h3 │ zulu [0,…)   yankee [0,…)   papa [20,…)   quebec [60,…)   romeo [60,…)   sierra [120,…)

Tenants: acme xray, mike, yankee; globex papa, romeo, sierra, delta; initech quebec, november, zulu.

Since t0+30m, xray shared h1 with quebec and november [30,60) and mike [40,60); h2 with delta [60,80), sierra
[70,90) and mike [100,120); h1 again with november from 120 on. Papa left h1 before t0+30m; romeo left h2 exactly when
xray arrived, and sierra left h1 exactly when xray came back (touching: never together); zulu and yankee never met it.

Images: web-base and db-base are debian 12.8 in the registry, old-base debian 11; custom-s is not in the registry.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from ferryman.cmdb.images import ImageRecord, SigningKeyRecord
from ferryman.cmdb.impact import (
    WITHHELD,
    CoResidence,
    HostResidence,
    ImageMatch,
    IncidentVM,
    Subject,
    Window,
    host_impact,
    merge_co_residences,
    tenant_view,
    vm_impact,
)
from ferryman.cmdb.impact_sql import SqlImpact
from ferryman.cmdb.schema import placements
from ferryman.cmdb.sql import SqlRepository
from ferryman.core.errors import InvalidInput, NotFound
from ferryman.core.models import VM

T0 = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)
OPEN = None
DIGEST = "sha256:" + "1" * 64

TENANT_OF = {
    "xray": "acme",
    "mike": "acme",
    "yankee": "acme",
    "papa": "globex",
    "romeo": "globex",
    "sierra": "globex",
    "delta": "globex",
    "quebec": "initech",
    "november": "initech",
    "zulu": "initech",
}
IMAGE_OF = {
    "xray": "web-base",
    "mike": "web-base",
    "romeo": "web-base",
    "quebec": "web-base",
    "delta": "web-base",
    "november": "db-base",
    "papa": "db-base",
    "zulu": "old-base",
    "sierra": "custom-s",
    "yankee": "custom-s",
}


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def vm_id(name: str) -> str:
    return f"id-{name}"


def make_vm(name: str) -> VM:
    return VM(
        id=vm_id(name),
        name=name,
        tenant=TENANT_OF[name],
        memory_mb=512,
        vcpus=1,
        disk_bytes=2**30,
        image=IMAGE_OF[name],
        canary="c4n4ry",
    )


def image(name: str, os: str, version: str) -> ImageRecord:
    return ImageRecord(
        name=name,
        disk_digest=DIGEST,
        disk_size=1 << 20,
        format="qcow2",
        virtual_size=2 << 30,
        os=os,
        version=version,
        publisher="debian",
        signature="c2ln",
        boot="firmware",
        imported_at=T0,
        imported_by="token:admin",
    )


def co(name: str, host: str, start: float, end: float | None, *, deleted: bool = False) -> CoResidence:
    return CoResidence(
        vm_id(name), name, TENANT_OF[name], host, at(start), None if end is None else at(end), deleted=deleted
    )


def stay(name: str, host: str, start: float, end: float | None, *, deleted: bool = False) -> HostResidence:
    return HostResidence(
        vm_id(name), name, TENANT_OF[name], host, at(start), None if end is None else at(end), deleted=deleted
    )


def match(name: str) -> ImageMatch:
    registry = {"web-base": ("debian", "12.8"), "db-base": ("debian", "12.8"), "old-base": ("debian", "11")}
    os, version = registry.get(IMAGE_OF[name], (None, None))
    return ImageMatch(vm_id(name), name, TENANT_OF[name], IMAGE_OF[name], os, version)


@pytest.fixture
def history(fleet: SqlRepository) -> SqlRepository:
    """The history drawn in the module docstring, written in time order through the public API."""
    fleet.ensure_tenant("initech")
    fleet.add_signing_key(SigningKeyRecord("debian", "-----BEGIN PUBLIC KEY-----\n...", DIGEST, T0, "token:admin"))
    for record in (
        image("web-base", "debian", "12.8"),
        image("db-base", "debian", "12.8"),
        image("old-base", "debian", "11"),
    ):
        fleet.add_image(record)
    for name, host in (("xray", "h1"), ("papa", "h1"), ("romeo", "h2"), ("zulu", "h3"), ("yankee", "h3")):
        fleet.add_vm(make_vm(name), host, at(0))
    fleet.add_vm(make_vm("november"), "h1", at(5))
    fleet.add_vm(make_vm("quebec"), "h1", at(10))
    fleet.move_vm(vm_id("papa"), "h3", at(20))
    fleet.add_vm(make_vm("mike"), "h1", at(40))
    fleet.add_vm(make_vm("delta"), "h2", at(50))
    fleet.move_vm(vm_id("xray"), "h2", at(60))
    fleet.move_vm(vm_id("quebec"), "h3", at(60))
    fleet.move_vm(vm_id("romeo"), "h3", at(60))
    fleet.add_vm(make_vm("sierra"), "h2", at(70))
    fleet.delete_vm(vm_id("delta"), at(80))
    fleet.move_vm(vm_id("sierra"), "h1", at(90))
    fleet.move_vm(vm_id("mike"), "h2", at(100))
    fleet.move_vm(vm_id("xray"), "h1", at(120))
    fleet.move_vm(vm_id("sierra"), "h3", at(120))
    return fleet


@pytest.fixture
def impact(history: SqlRepository) -> SqlImpact:
    return SqlImpact(history.engine)


XRAY_SINCE_30 = [
    co("november", "h1", 30, 60),
    co("quebec", "h1", 30, 60),
    co("mike", "h1", 40, 60),
    co("delta", "h2", 60, 80, deleted=True),
    co("sierra", "h2", 70, 90),
    co("mike", "h2", 100, 120),
    co("november", "h1", 120, OPEN),
]


# -- co-residents ------------------------------------------------------------------------------------------------------


def test_co_residents_since_t_with_exact_overlaps(impact: SqlImpact) -> None:
    """Every overlap since t0+30m, clipped to the window; left-before, touching and never-met VMs are excluded."""
    assert impact.co_residents(vm_id("xray"), at(30)) == XRAY_SINCE_30


def test_co_residents_in_a_closed_window(impact: SqlImpact) -> None:
    """With until, overlaps are clipped to it, and a VM arriving exactly at until is not in the window."""
    assert impact.co_residents(vm_id("xray"), at(30), at(75)) == [
        co("november", "h1", 30, 60),
        co("quebec", "h1", 30, 60),
        co("mike", "h1", 40, 60),
        co("delta", "h2", 60, 75, deleted=True),
        co("sierra", "h2", 70, 75),
    ]
    assert impact.co_residents(vm_id("xray"), at(100), at(120)) == [co("mike", "h2", 100, 120)]
    assert impact.co_residents(vm_id("xray"), at(20), at(30)) == [
        co("november", "h1", 20, 30),
        co("quebec", "h1", 20, 30),
    ]


def test_an_earlier_since_finds_the_vm_that_left_and_touching_stays_still_never_meet(impact: SqlImpact) -> None:
    """From t0 on, papa's [0,20) on h1 counts; romeo and sierra, who left as xray arrived, still do not."""
    found = impact.co_residents(vm_id("xray"), at(0))
    assert found[:3] == [co("papa", "h1", 0, 20), co("november", "h1", 5, 60), co("quebec", "h1", 10, 60)]
    assert {c.vm_name for c in found} == {"papa", "november", "quebec", "mike", "delta", "sierra"}
    assert [c for c in found if c.vm_name == "sierra"] == [co("sierra", "h2", 70, 90)]


def test_co_residents_of_a_deleted_vm_and_from_the_other_side(impact: SqlImpact) -> None:
    """A deleted VM's history still answers; the relation is symmetric (delta saw xray during [60,80))."""
    assert impact.co_residents(vm_id("delta"), at(0)) == [
        co("romeo", "h2", 50, 60),
        co("xray", "h2", 60, 80),
        co("sierra", "h2", 70, 80),
    ]


def test_a_zero_length_stay_meets_nobody_and_touching_overlaps_are_joined(fleet: SqlRepository) -> None:
    """alpha hops h1 → h2 → h1 at the same instant: the empty stay on h2 meets no one, and bravo's two touching
    overlaps on h1 are reported as one."""
    fleet.ensure_tenant("initech")
    for name, tenant, host in (("alpha", "acme", "h1"), ("bravo", "globex", "h1"), ("charlie", "initech", "h2")):
        fleet.add_vm(dataclasses.replace(make_vm("xray"), id=vm_id(name), name=name, tenant=tenant), host, at(0))
    fleet.move_vm(vm_id("alpha"), "h2", at(30))
    fleet.move_vm(vm_id("alpha"), "h1", at(30))
    impact = SqlImpact(fleet.engine)
    assert impact.co_residents(vm_id("alpha"), at(0)) == [
        CoResidence(vm_id("bravo"), "bravo", "globex", "h1", at(0), OPEN)
    ]
    assert [r.host for r in impact.host_chain(vm_id("alpha"), at(0))] == ["h1", "h1"]


# -- host incidents and host chains ------------------------------------------------------------------------------------


def test_vms_on_host_since(impact: SqlImpact) -> None:
    """Every stay on h2 since t0+30m, clipped; the deleted VM included; a VM arriving at until is not."""
    assert impact.vms_on_host_since("h2", at(30)) == [
        stay("romeo", "h2", 30, 60),
        stay("delta", "h2", 50, 80, deleted=True),
        stay("xray", "h2", 60, 120),
        stay("sierra", "h2", 70, 90),
        stay("mike", "h2", 100, OPEN),
    ]
    assert impact.vms_on_host_since("h2", at(30), at(60)) == [
        stay("romeo", "h2", 30, 60),
        stay("delta", "h2", 50, 60, deleted=True),
    ]
    assert impact.vms_on_host_since("h1", at(125)) == [
        stay("november", "h1", 125, OPEN),
        stay("xray", "h1", 125, OPEN),
    ]


def test_a_vm_that_came_back_appears_once_per_stay(impact: SqlImpact) -> None:
    """xray's two stays on h1 are two rows; its host chain in the window is clipped to it."""
    assert [r for r in impact.vms_on_host_since("h1", at(30)) if r.vm_name == "xray"] == [
        stay("xray", "h1", 30, 60),
        stay("xray", "h1", 120, OPEN),
    ]
    assert impact.host_chain(vm_id("xray"), at(30)) == [
        stay("xray", "h1", 30, 60),
        stay("xray", "h2", 60, 120),
        stay("xray", "h1", 120, OPEN),
    ]
    assert impact.host_chain(vm_id("xray"), at(60), at(120)) == [stay("xray", "h2", 60, 120)]


# -- same image, same baseline -----------------------------------------------------------------------------------------


def test_same_image_and_same_baseline(impact: SqlImpact) -> None:
    """Live VMs of the same image; of the same registry os and version; deleted delta and the subject are left out."""
    assert impact.same_image(vm_id("xray")) == [match("mike"), match("romeo"), match("quebec")]
    assert impact.same_baseline(vm_id("xray")) == [
        match("mike"),
        match("papa"),
        match("romeo"),
        match("november"),
        match("quebec"),
    ]
    assert impact.same_baseline(vm_id("zulu")) == []


def test_an_image_outside_the_registry_matches_by_name_only(impact: SqlImpact) -> None:
    """custom-s has no registry entry: its baseline is its name; and it matches no registry baseline."""
    assert impact.same_image(vm_id("sierra")) == [match("yankee")]
    assert impact.same_baseline(vm_id("sierra")) == [match("yankee")]
    assert match("yankee").os is None
    assert "sierra" not in {m.vm_name for m in impact.same_baseline(vm_id("xray"))}


# -- reports -----------------------------------------------------------------------------------------------------------


def test_vm_report(impact: SqlImpact) -> None:
    """The whole report of an incident at xray: the same answers as the single queries, and the other tenants."""
    report = impact.vm_report(vm_id("xray"), at(30))
    assert report.subject is Subject.VM and report.host is None
    assert report.vm == IncidentVM(vm_id("xray"), "xray", "acme", "web-base")
    assert report.window == Window(at(30))
    assert list(report.co_residents) == XRAY_SINCE_30
    assert report.tenants_touched == ("globex", "initech")
    assert list(report.host_chain) == impact.host_chain(vm_id("xray"), at(30))
    assert list(report.same_image) == impact.same_image(vm_id("xray"))
    assert list(report.same_baseline) == impact.same_baseline(vm_id("xray"))
    assert report.to_dict()["co_residents"][-1] == {
        "vm_id": "id-november",
        "vm_name": "november",
        "tenant": "initech",
        "host": "h1",
        "overlap_from": at(120).isoformat(),
        "overlap_to": None,
        "deleted": False,
    }


def test_host_report(impact: SqlImpact) -> None:
    """A host incident names every tenant that had a VM on the host in the window."""
    report = impact.host_report("h2", at(30))
    assert report.subject is Subject.HOST and report.vm is None and report.host == "h2"
    assert list(report.host_residents) == impact.vms_on_host_since("h2", at(30))
    assert report.tenants_touched == ("acme", "globex")
    assert (report.co_residents, report.host_chain, report.same_image, report.same_baseline) == ((), (), (), ())


def test_the_statements_of_one_read_see_one_snapshot(history: SqlRepository, impact: SqlImpact) -> None:
    """A migration committed while a report is being read is not half-seen (PostgreSQL reads REPEATABLE READ)."""
    with impact._read() as conn:
        first = conn.scalar(sa.select(sa.func.count()).select_from(placements))
        history.move_vm(vm_id("xray"), "h3", at(130))
        assert conn.scalar(sa.select(sa.func.count()).select_from(placements)) == first
    assert [r.host for r in impact.host_chain(vm_id("xray"), at(125))] == ["h1", "h3"]


def test_errors(impact: SqlImpact) -> None:
    """Unknown VMs and hosts are not found; naive times and empty windows are invalid."""
    with pytest.raises(NotFound):
        impact.co_residents("id-nope", at(0))
    with pytest.raises(NotFound):
        impact.same_baseline("id-nope")
    with pytest.raises(NotFound):
        impact.vms_on_host_since("h9", at(0))
    with pytest.raises(InvalidInput, match="timezone"):
        impact.co_residents(vm_id("xray"), dt.datetime(2026, 11, 23, 10))
    with pytest.raises(InvalidInput, match="empty window"):
        impact.vm_report(vm_id("xray"), at(30), at(30))


# -- tenant views ------------------------------------------------------------------------------------------------------


def strings(value: Any) -> Iterator[str]:
    """Every string in a JSON-like value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from strings(v)


def assert_names_no_other_tenant(view: dict[str, Any], tenant: str) -> None:
    others = {t for t in TENANT_OF.values() if t != tenant}
    others |= {name for name, owner in TENANT_OF.items() if owner != tenant}
    others |= {vm_id(name) for name, owner in TENANT_OF.items() if owner != tenant}
    for text in strings(view):
        leaked = [token for token in others if token in text.lower()]
        assert not leaked, f"{text!r} names {leaked} in {tenant}'s view"


@pytest.mark.parametrize("tenant", ["acme", "globex", "initech", "umbrella"])
def test_no_tenant_view_names_another_tenant(impact: SqlImpact, tenant: str) -> None:
    """No string of any tenant's view, of a VM or a host incident, holds another tenant's name, VM name or VM id."""
    for report in (impact.vm_report(vm_id("xray"), at(0)), impact.host_report("h2", at(0))):
        assert_names_no_other_tenant(tenant_view(report, tenant), tenant)


def test_tenant_view_of_a_neighbour(impact: SqlImpact) -> None:
    """initech learns which of its VMs shared a host with the incident VM and when, the VM being neighbour-1."""
    view = tenant_view(impact.vm_report(vm_id("xray"), at(30)), "initech")
    assert view == {
        "tenant": "initech",
        "window": {"since": at(30).isoformat(), "until": None},
        "incident": {"kind": "vm", "vm": "neighbour-1"},
        "host_chain": [],
        "affected_vms": [
            {
                "vm": "november",
                "vm_id": "id-november",
                "deleted": False,
                "host": "h1",
                "from": at(30).isoformat(),
                "to": at(60).isoformat(),
            },
            {
                "vm": "quebec",
                "vm_id": "id-quebec",
                "deleted": False,
                "host": "h1",
                "from": at(30).isoformat(),
                "to": at(60).isoformat(),
            },
            {
                "vm": "november",
                "vm_id": "id-november",
                "deleted": False,
                "host": "h1",
                "from": at(120).isoformat(),
                "to": None,
            },
        ],
        "same_image": [{"vm": "quebec", "vm_id": "id-quebec", "image": "web-base"}],
        "same_baseline": [
            {"vm": "november", "vm_id": "id-november", "image": "db-base"},
            {"vm": "quebec", "vm_id": "id-quebec", "image": "web-base"},
        ],
    }


def test_tenant_view_of_the_owner_and_of_a_host_incident(impact: SqlImpact) -> None:
    """acme sees its incident VM by name with its host chain, and only its own co-resident VM; a host incident lists
    the tenant's own stays on the host; an untouched tenant gets empty lists."""
    view = tenant_view(impact.vm_report(vm_id("xray"), at(30)), "acme")
    assert view["incident"] == {"kind": "vm", "vm": "xray", "vm_id": "id-xray"}
    assert [(s["host"], s["from"], s["to"]) for s in view["host_chain"]] == [
        ("h1", at(30).isoformat(), at(60).isoformat()),
        ("h2", at(60).isoformat(), at(120).isoformat()),
        ("h1", at(120).isoformat(), None),
    ]
    assert [(a["vm"], a["host"], a["from"], a["to"]) for a in view["affected_vms"]] == [
        ("mike", "h1", at(40).isoformat(), at(60).isoformat()),
        ("mike", "h2", at(100).isoformat(), at(120).isoformat()),
    ]
    host_view = tenant_view(impact.host_report("h2", at(30)), "globex")
    assert host_view["incident"] == {"kind": "host", "host": "h2"}
    assert [(a["vm"], a["deleted"], a["from"], a["to"]) for a in host_view["affected_vms"]] == [
        ("romeo", False, at(30).isoformat(), at(60).isoformat()),
        ("delta", True, at(50).isoformat(), at(80).isoformat()),
        ("sierra", False, at(70).isoformat(), at(90).isoformat()),
    ]
    untouched = tenant_view(impact.host_report("h2", at(30)), "initech")
    assert untouched["affected_vms"] == untouched["host_chain"] == untouched["same_image"] == []


# -- the pure assembly, without a database -----------------------------------------------------------------------------


def test_merge_joins_touching_and_overlapping_intervals_per_vm_and_host() -> None:
    """Touching or overlapping intervals of one VM on one host become one; a gap or another host keeps them apart."""
    rows = [
        co("quebec", "h1", 10, 20),
        co("quebec", "h1", 0, 10),
        co("quebec", "h1", 15, 25),
        co("quebec", "h1", 30, 40),
        co("quebec", "h2", 25, 30),
        co("november", "h1", 50, OPEN),
        co("november", "h1", 60, 70),
    ]
    assert merge_co_residences(rows) == [
        co("quebec", "h1", 0, 25),
        co("quebec", "h2", 25, 30),
        co("quebec", "h1", 30, 40),
        co("november", "h1", 50, OPEN),
    ]


def test_a_host_or_image_named_after_another_tenant_is_withheld() -> None:
    """Defence in depth: a host or image name holding another tenant's identifier never reaches a tenant."""
    window = Window(at(0))
    report = vm_impact(
        IncidentVM(vm_id("romeo"), "romeo", "globex", "globex-golden"),
        window,
        co_residents=[co("quebec", "globex-rack-1", 0, 10), co("mike", "globex-rack-1", 5, 10)],
        host_chain=[stay("romeo", "globex-rack-1", 0, OPEN)],
        same_image=[dataclasses.replace(match("quebec"), image="globex-golden")],
        same_baseline=[],
    )
    view = tenant_view(report, "initech")
    assert view["affected_vms"][0]["host"] == WITHHELD
    assert view["same_image"][0]["image"] == WITHHELD
    assert_names_no_other_tenant(view, "initech")
    assert report.tenants_touched == ("acme", "initech")
    residents = [stay("quebec", "globex-rack-1", 0, 5), stay("papa", "globex-rack-1", 0, 5)]
    host_view = tenant_view(host_impact("globex-rack-1", window, residents=residents), "initech")
    assert host_view["incident"] == {"kind": "host", "host": WITHHELD}


def test_window_validation() -> None:
    """A window needs aware times and must not be empty; it clips half-open intervals."""
    with pytest.raises(InvalidInput):
        Window(dt.datetime(2026, 1, 1))
    with pytest.raises(InvalidInput):
        Window(at(10), at(5))
    window = Window(at(10), at(20))
    assert window.clip(at(0), OPEN) == (at(10), at(20))
    assert window.clip(at(0), at(10)) is None
    assert window.clip(at(20), OPEN) is None
    assert Window(at(10)).clip(at(15), OPEN) == (at(15), OPEN)
