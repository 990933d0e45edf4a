"""Policy versions and compliance violations in the CMDB, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa
from alembic import command

from ferryman.cmdb.engine import alembic_config
from ferryman.cmdb.policy_store import Finding
from ferryman.cmdb.schema import metadata
from ferryman.cmdb.sql import SqlRepository
from ferryman.core.errors import InvalidInput
from ferryman.core.models import VM

from .conftest import T0


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


@pytest.fixture
def vms(fleet: SqlRepository) -> SqlRepository:
    for name, host in (("web", "h1"), ("db", "h2")):
        vm = VM(
            id=f"id-{name}",
            name=name,
            tenant="acme",
            memory_mb=128,
            vcpus=1,
            disk_bytes=1 << 26,
            image="img",
            canary="c",
        )
        fleet.add_vm(vm, host, at(0))
    return fleet


def test_policy_versions_count_up_and_the_newest_is_in_force(repo: SqlRepository) -> None:
    """Each apply stores the files as the next version; the newest is current; listing is newest first."""
    assert repo.current_policy_version() is None
    first = repo.add_policy_version({"a.yaml": "name: a\n"}, "token:admin", at(1))
    second = repo.add_policy_version({"a.yaml": "name: a\n", "b.yaml": "name: b\n"}, "token:ops", at(2))
    assert (first.version, second.version) == (1, 2)
    assert repo.current_policy_version() == second
    assert [v.version for v in repo.list_policy_versions()] == [2, 1]
    assert repo.list_policy_versions()[1].documents == {"a.yaml": "name: a\n"}
    with pytest.raises(InvalidInput, match="no timezone"):
        repo.add_policy_version({}, "x", dt.datetime(2026, 1, 1))


def test_sync_violations_opens_refreshes_and_resolves(vms: SqlRepository) -> None:
    """A new finding opens a violation; a repeated one keeps its first-seen time; a missing one is resolved."""
    a = Finding("id-web", "p1", "max_vms_per_host", "h1", "too many")
    b = Finding("id-db", "p1", "min_patch_level", "h2", "patch 3 < 5")
    opened, resolved = vms.sync_violations([a, b], at(1))
    assert {v.key for v in opened} == {a.key, b.key} and resolved == []
    moved = Finding("id-web", "p1", "max_vms_per_host", "h3", "still too many")
    opened, resolved = vms.sync_violations([moved], at(2))
    assert opened == [] and [v.key for v in resolved] == [b.key] and resolved[0].resolved_at == at(2)
    (web,) = vms.list_violations()
    assert (web.first_seen, web.last_seen, web.host, web.message) == (at(1), at(2), "h3", "still too many")
    assert [v.key for v in vms.list_violations(open_only=False, vm_id="id-db")] == [b.key]
    # the same key can open again after it was resolved
    opened, _ = vms.sync_violations([moved, b], at(3))
    assert [v.key for v in opened] == [b.key]
    assert len(vms.list_violations(open_only=False, vm_id="id-db")) == 2


def test_sync_violations_in_a_scope_leaves_other_vms_alone(vms: SqlRepository) -> None:
    """An incremental check of some VMs neither resolves nor opens violations of VMs outside its scope."""
    a = Finding("id-web", "p1", "dedicated_host", "h1", "shared")
    b = Finding("id-db", "p1", "dedicated_host", "h2", "shared")
    vms.sync_violations([a, b], at(1))
    opened, resolved = vms.sync_violations([], at(2), scope={"id-web"})
    assert opened == [] and [v.key for v in resolved] == [a.key]
    assert [v.key for v in vms.list_violations()] == [b.key]


def test_one_open_violation_per_key_in_the_database(vms: SqlRepository) -> None:
    """uq_violations_open_key refuses a second open row for the same (VM, policy, rule)."""
    vms.sync_violations([Finding("id-web", "p1", "r", "h1", "m")], at(1))
    with pytest.raises(sa.exc.IntegrityError), vms.engine.begin() as conn:
        conn.execute(
            metadata.tables["violations"]
            .insert()
            .values(vm_id="id-web", policy="p1", rule="r", host="h1", message="m", first_seen=at(2), last_seen=at(2))
        )


def test_downgrade_to_0002_and_upgrade_again(repo: SqlRepository) -> None:
    """The policy revision can be undone (its two tables go) and redone on both backends."""
    config = alembic_config()
    with repo.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0002")
        assert {"policy_versions", "violations"}.isdisjoint(sa.inspect(conn).get_table_names())
        command.upgrade(config, "head")
        assert {"policy_versions", "violations"} <= set(sa.inspect(conn).get_table_names())


def test_update_host_changes_only_descriptive_attributes(fleet: SqlRepository) -> None:
    """Patch level and labels can change; name, site and state cannot; an unknown host is NotFound."""
    from ferryman.core.errors import NotFound

    host = fleet.update_host("h1", patch_level=9, hypervisor_version="9.0.1", zone="z9")
    assert (host.patch_level, host.hypervisor_version, host.zone) == (9, "9.0.1", "z9")
    assert fleet.get_host("h1") == host
    with pytest.raises(InvalidInput, match="cannot be changed"):
        fleet.update_host("h1", site="s2")
    with pytest.raises(NotFound):
        fleet.update_host("nope", patch_level=1)
