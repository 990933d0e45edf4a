"""SqlRepository on SQLite and PostgreSQL: VM lifecycle, the placement invariants, events, alarms, credentials."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from ferryman.cmdb.engine import alembic_config
from ferryman.cmdb.repository import HostCertificate, Repository
from ferryman.cmdb.schema import metadata, placements
from ferryman.cmdb.sql import SqlRepository
from ferryman.core.errors import Conflict, InvalidInput, NotFound
from ferryman.core.models import VM, Event, HostState, Placement, Severity, Site, VMState

T0 = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def make_vm(name: str, tenant: str = "acme", vm_id: str | None = None, **fields: Any) -> VM:
    return VM(
        id=vm_id or f"id-{name}",
        name=name,
        tenant=tenant,
        memory_mb=512,
        vcpus=1,
        disk_bytes=10 * 2**30,
        image="debian-12",
        canary="c4n4ry",
        **fields,
    )


def cmdb_state(repo: SqlRepository, vm_id: str) -> tuple[object, ...]:
    """Everything a move may touch, to compare before and after a refused move."""
    return (
        repo.get_vm(vm_id),
        repo.host_chain(vm_id),
        [repo.placements_on(h) for h in ("h1", "h2", "h3")],
    )


def test_sql_repository_is_a_repository(repo: SqlRepository) -> None:
    """SqlRepository satisfies the Repository protocol (mypy checks this assignment)."""
    as_protocol: Repository = repo
    assert as_protocol is repo


# -- schema --------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
@pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based index")
def test_migrations_match_schema_module(repo: SqlRepository) -> None:
    """The hand-written Alembic revisions create exactly the tables, columns and indexes schema.py declares."""
    with repo.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert diffs == []


def test_downgrade_to_base_and_upgrade_again(repo: SqlRepository) -> None:
    """The initial revision can be undone and redone on both backends."""
    config = alembic_config()
    with repo.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "base")
        assert set(sa.inspect(conn).get_table_names()) == {"alembic_version"}
        command.upgrade(config, "head")
        assert set(sa.inspect(conn).get_table_names()) == {"alembic_version", *metadata.tables}


# -- inventory -----------------------------------------------------------------------------------------------------


def test_inventory_round_trip_and_errors(fleet: SqlRepository) -> None:
    """Sites, hosts and tenants come back as stored; duplicates conflict and unknown names are not found."""
    assert [s.name for s in fleet.list_sites()] == ["s1"]
    assert [h.name for h in fleet.list_hosts()] == ["h1", "h2", "h3"]
    h1 = fleet.get_host("h1")
    assert (h1.state, h1.created_at, h1.agent_url) == (HostState.PENDING, T0, "https://127.0.0.1:7070")
    assert fleet.set_host_state("h1", HostState.ENROLLED).state is HostState.ENROLLED
    assert fleet.get_host("h1").state is HostState.ENROLLED
    assert fleet.ensure_tenant("acme").name == "acme"
    assert [t.name for t in fleet.list_tenants()] == ["acme", "globex"]
    with pytest.raises(Conflict):
        fleet.add_site(Site("s1", security_level=1))
    with pytest.raises(Conflict):
        fleet.add_host(fleet.get_host("h2"))
    with pytest.raises(NotFound):
        fleet.add_host(dataclasses.replace(fleet.get_host("h2"), name="h9", site="nowhere"))
    with pytest.raises(NotFound):
        fleet.get_host("h9")
    with pytest.raises(NotFound):
        fleet.set_host_state("h9", HostState.ENROLLED)


# -- VM lifecycle and placements ---------------------------------------------------------------------------------


def test_add_vm_writes_vm_and_first_placement(fleet: SqlRepository) -> None:
    """add_vm stores the VM (profile as JSON) and one open placement of generation 1 from ``at``."""
    vm = fleet.add_vm(make_vm("web", profile={"env": "prod", "sensitivity": "high"}), "h1", at(0))
    assert vm.created_at == at(0)
    assert fleet.get_vm("web") == vm
    assert fleet.get_vm("id-web") == vm
    assert fleet.get_vm("web").profile == {"env": "prod", "sensitivity": "high"}
    assert fleet.current_placement("id-web") == Placement("id-web", "h1", 1, at(0), None)
    assert fleet.host_chain("id-web") == [Placement("id-web", "h1", 1, at(0), None)]
    assert fleet.placements_on("h1") == [Placement("id-web", "h1", 1, at(0), None)]
    assert fleet.list_vms() == [vm]


def test_add_vm_refuses_unknown_references_and_duplicates(fleet: SqlRepository) -> None:
    """Unknown host or tenant is NotFound; a taken id or live name is a Conflict; nothing is half-written."""
    fleet.add_vm(make_vm("web"), "h1", at(0))
    with pytest.raises(NotFound):
        fleet.add_vm(make_vm("db"), "h9", at(1))
    with pytest.raises(NotFound):
        fleet.add_vm(make_vm("db", tenant="initech"), "h1", at(1))
    with pytest.raises(Conflict):
        fleet.add_vm(make_vm("db", vm_id="id-web"), "h1", at(1))
    with pytest.raises(Conflict):
        fleet.add_vm(make_vm("web", vm_id="id-web-2"), "h2", at(1))
    assert [v.id for v in fleet.list_vms(include_deleted=True)] == ["id-web"]
    assert fleet.placements_on("h2") == []


def test_vm_names_are_unique_per_tenant(fleet: SqlRepository) -> None:
    """Two tenants may each have a ``web``; a name resolves in a tenant, or is ambiguous fleet-wide; an id is one VM
    everywhere but in another tenant; the database's own index refuses a second live ``web`` in one tenant."""
    acme = fleet.add_vm(make_vm("web", vm_id="a-web"), "h1", at(0))
    globex = fleet.add_vm(make_vm("web", tenant="globex", vm_id="g-web"), "h2", at(0))
    assert fleet.get_vm("web", tenant="acme") == acme
    assert fleet.get_vm("web", tenant="globex") == globex
    with pytest.raises(InvalidInput, match=r"several tenants: acme \(a-web\), globex \(g-web\)"):
        fleet.get_vm("web")
    assert fleet.get_vm("g-web") == globex
    with pytest.raises(NotFound):
        fleet.get_vm("g-web", tenant="acme")
    with pytest.raises(NotFound):
        fleet.get_vm("web", tenant="initech")
    # tenant/name: that tenant's VM; never another tenant's, whatever the caller's tenant
    assert fleet.get_vm("globex/web") == globex
    assert fleet.get_vm("acme/web", tenant="acme") == acme
    for asked, tenant in (("globex/web", "acme"), ("initech/web", None), ("acme/g-web", None)):
        with pytest.raises(NotFound, match=f"VM '{asked}' not found"):
            fleet.get_vm(asked, tenant=tenant)
    with pytest.raises(Conflict, match="tenant 'acme' has a VM named 'web' already"):
        fleet.add_vm(make_vm("web", vm_id="a-web-2"), "h1", at(1))
    fleet.delete_vm("g-web", at(2))
    assert fleet.get_vm("web") == acme  # the one live VM of the name
    assert fleet.get_vm("web", tenant="globex").state is VMState.DELETED  # its most recently deleted
    with fleet.engine.begin() as conn, pytest.raises(sa.exc.IntegrityError):
        values = dataclasses.asdict(make_vm("web", vm_id="a-web-3")) | {"state": "running", "created_at": at(3)}
        conn.execute(sa.insert(metadata.tables["vms"]).values(**values))


def test_times_are_aware_utc_in_and_out(fleet: SqlRepository) -> None:
    """A time given in UTC+02:00 is stored as the same instant and comes back in UTC; naive times are refused."""
    plus_two = dt.timezone(dt.timedelta(hours=2))
    fleet.add_vm(make_vm("web"), "h1", dt.datetime(2026, 11, 23, 12, 0, tzinfo=plus_two))
    placement = fleet.current_placement("id-web")
    assert placement is not None
    assert placement.valid_from == at(0)
    assert placement.valid_from.utcoffset() == dt.timedelta(0)
    with pytest.raises(InvalidInput):
        fleet.move_vm("id-web", "h2", dt.datetime(2026, 11, 23, 10, 5))


def test_move_vm_closes_opens_and_bumps_generation(fleet: SqlRepository) -> None:
    """move_vm ends the h1 placement at t0+10m, opens h2 with generation 2 and bumps the VM to generation 2."""
    fleet.add_vm(make_vm("web"), "h1", at(0))
    vm, placement = fleet.move_vm("id-web", "h2", at(10))
    assert (vm.generation, placement) == (2, Placement("id-web", "h2", 2, at(10), None))
    assert fleet.get_vm("id-web").generation == 2
    assert fleet.host_chain("id-web") == [
        Placement("id-web", "h1", 1, at(0), at(10)),
        Placement("id-web", "h2", 2, at(10), None),
    ]
    assert fleet.placements_on("h1") == []
    assert fleet.placements_on("h2") == [placement]
    assert fleet.placements_on("h1", at=at(9.99)) == [Placement("id-web", "h1", 1, at(0), at(10))]
    assert fleet.placements_on("h1", at=at(10)) == []  # half-open: it left h1 at t0+10m
    assert fleet.placements_on("h2", at=at(10)) == [placement]


def test_refused_moves_leave_the_cmdb_unchanged(fleet: SqlRepository) -> None:
    """Unknown target, same host, stale generation or a time before the current placement change nothing."""
    fleet.add_vm(make_vm("web"), "h1", at(0))
    fleet.move_vm("id-web", "h2", at(10))
    before = cmdb_state(fleet, "id-web")
    with pytest.raises(NotFound):
        fleet.move_vm("id-web", "h9", at(20))
    with pytest.raises(NotFound):
        fleet.move_vm("id-nope", "h1", at(20))
    with pytest.raises(Conflict):
        fleet.move_vm("id-web", "h2", at(20))
    with pytest.raises(Conflict):
        fleet.move_vm("id-web", "h3", at(20), expected_generation=1)
    with pytest.raises(Conflict):
        fleet.move_vm("id-web", "h3", at(5))
    assert cmdb_state(fleet, "id-web") == before
    vm, _ = fleet.move_vm("id-web", "h3", at(20), expected_generation=2)
    assert vm.generation == 3


def test_move_is_one_transaction(fleet: SqlRepository) -> None:
    """If opening the new placement fails after the old one was closed, the close and the bump roll back too."""

    class InjectedFault(Exception):
        pass

    def fail_new_placement(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO PLACEMENTS"):
            raise InjectedFault

    fleet.add_vm(make_vm("web"), "h1", at(0))
    before = cmdb_state(fleet, "id-web")
    sa.event.listen(fleet.engine, "before_cursor_execute", fail_new_placement)
    try:
        with pytest.raises(InjectedFault):
            fleet.move_vm("id-web", "h2", at(10))
    finally:
        sa.event.remove(fleet.engine, "before_cursor_execute", fail_new_placement)
    assert cmdb_state(fleet, "id-web") == before
    assert fleet.move_vm("id-web", "h2", at(10))[1] == Placement("id-web", "h2", 2, at(10), None)


def test_move_refused_without_open_placement(fleet: SqlRepository) -> None:
    """A VM whose placement was closed behind the repository's back cannot move: Conflict, nothing written."""
    fleet.add_vm(make_vm("web"), "h1", at(0))
    with fleet.engine.begin() as conn:
        conn.execute(sa.update(placements).values(valid_to=at(5)))
    with pytest.raises(Conflict, match="no open placement"):
        fleet.move_vm("id-web", "h2", at(10))
    assert fleet.host_chain("id-web") == [Placement("id-web", "h1", 1, at(0), at(5))]
    assert fleet.get_vm("id-web").generation == 1


def test_concurrent_moves_with_expected_generation_commit_once(fleet: SqlRepository) -> None:
    """Eight racing moves planned against generation 1: exactly one commits, the rest conflict."""
    fleet.add_vm(make_vm("web"), "h1", at(0))
    barrier = threading.Barrier(8)

    def move(i: int) -> bool:
        barrier.wait(timeout=10)
        try:
            fleet.move_vm("id-web", ("h2", "h3")[i % 2], at(10), expected_generation=1)
        except Conflict:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(move, range(8)))
    assert results.count(True) == 1
    chain = fleet.host_chain("id-web")
    assert [(p.generation, p.valid_to) for p in chain] == [(1, at(10)), (2, None)]


def test_open_placement_is_unique_in_the_database(fleet: SqlRepository) -> None:
    """The partial unique index refuses a second open placement even when written around the repository."""
    fleet.add_vm(make_vm("web"), "h1", at(0))
    with pytest.raises(sa.exc.IntegrityError), fleet.engine.begin() as conn:
        conn.execute(sa.insert(placements).values(vm_id="id-web", host="h2", generation=2, valid_from=at(1)))


def test_delete_vm_closes_placement(fleet: SqlRepository) -> None:
    """delete_vm marks the VM deleted and ends its placement at ``at``; a deleted VM cannot move or change."""
    fleet.add_vm(make_vm("web"), "h1", at(0))
    deleted = fleet.delete_vm("id-web", at(30))
    assert deleted.state is VMState.DELETED
    assert fleet.get_vm("web").state is VMState.DELETED
    assert fleet.current_placement("id-web") is None
    assert fleet.host_chain("id-web") == [Placement("id-web", "h1", 1, at(0), at(30))]
    assert fleet.list_vms() == []
    assert [v.id for v in fleet.list_vms(include_deleted=True)] == ["id-web"]
    with pytest.raises(Conflict):
        fleet.delete_vm("id-web", at(31))
    with pytest.raises(Conflict):
        fleet.move_vm("id-web", "h2", at(31))
    with pytest.raises(Conflict):
        fleet.set_vm_state("id-web", VMState.RUNNING)
    assert fleet.host_chain("id-web") == [Placement("id-web", "h1", 1, at(0), at(30))]


def test_set_vm_state(fleet: SqlRepository) -> None:
    """set_vm_state records the state; deleting through it is refused (delete_vm closes the placement)."""
    fleet.add_vm(make_vm("web"), "h1", at(0))
    assert fleet.set_vm_state("id-web", VMState.RUNNING).state is VMState.RUNNING
    assert fleet.get_vm("id-web").state is VMState.RUNNING
    with pytest.raises(InvalidInput):
        fleet.set_vm_state("id-web", VMState.DELETED)
    with pytest.raises(NotFound):
        fleet.set_vm_state("id-nope", VMState.RUNNING)


def test_name_is_reusable_after_delete(fleet: SqlRepository) -> None:
    """A live name is unique; once deleted it can be reused, and get_vm(name) prefers the live VM, else the latest."""
    fleet.add_vm(make_vm("web", vm_id="id-1"), "h1", at(0))
    with pytest.raises(Conflict):
        fleet.add_vm(make_vm("web", vm_id="id-2"), "h2", at(5))
    fleet.delete_vm("id-1", at(10))
    fleet.add_vm(make_vm("web", vm_id="id-2"), "h2", at(20))
    assert fleet.get_vm("web").id == "id-2"
    assert fleet.get_vm("id-1").state is VMState.DELETED
    fleet.delete_vm("id-2", at(30))
    fleet.add_vm(make_vm("web", vm_id="id-3"), "h3", at(40))
    fleet.delete_vm("id-3", at(50))
    assert fleet.get_vm("web").id == "id-3"  # all deleted: the most recently deleted one
    with pytest.raises(NotFound):
        fleet.get_vm("nope")


# -- events and alarms -------------------------------------------------------------------------------------------


def test_events_newest_first_with_filters(repo: SqlRepository) -> None:
    """record_event assigns ids; list_events is newest first and filters by time window, kind prefix, VM, host and
    severity."""
    recorded = [
        repo.record_event(Event("vm.created", "web created", at(0), vm="id-web", host="h1", data={"gen": 1})),
        repo.record_event(Event("vm.moved", "web moved", at(10), Severity.WARNING, vm="id-web", host="h2")),
        repo.record_event(Event("vm_moved", "underscore", at(15))),
        repo.record_event(Event("host.down", "h2 down", at(20), Severity.ALARM, host="h2")),
    ]
    ids = [e.id for e in recorded if e.id is not None]
    assert len(set(ids)) == 4
    assert ids == sorted(ids)
    assert [e.message for e in repo.list_events()] == ["h2 down", "underscore", "web moved", "web created"]
    assert repo.list_events()[-1] == recorded[0]
    assert [e.kind for e in repo.list_events(kind_prefix="vm.")] == ["vm.moved", "vm.created"]
    assert [e.kind for e in repo.list_events(vm_id="id-web")] == ["vm.moved", "vm.created"]
    assert [e.kind for e in repo.list_events(host="h2")] == ["host.down", "vm.moved"]
    assert [e.kind for e in repo.list_events(min_severity=Severity.WARNING)] == ["host.down", "vm.moved"]
    assert [e.kind for e in repo.list_events(since=at(10))] == ["host.down", "vm_moved", "vm.moved"]
    assert [e.kind for e in repo.list_events(since=at(10), until=at(20))] == ["vm_moved", "vm.moved"]
    assert [e.kind for e in repo.list_events(limit=1)] == ["host.down"]


def test_alarm_dedup_and_resolve(repo: SqlRepository) -> None:
    """An open (kind, vm, host) alarm is bumped, not duplicated; resolve_alarms closes those not kept."""
    first = repo.open_alarm("unexpected-vm", "id-x", "h1", "x runs on h1", at(0))
    assert first is not None and (first.first_seen, first.last_seen) == (at(0), at(0))
    assert repo.open_alarm("unexpected-vm", "id-x", "h1", "x still on h1", at(5)) is None
    host_only = repo.open_alarm("agent-silent", None, "h2", "h2 silent", at(6))
    assert host_only is not None
    assert repo.open_alarm("agent-silent", None, "h2", "h2 still silent", at(7)) is None
    assert repo.open_alarm("unexpected-vm", "id-x", "h3", "x runs on h3", at(8)) is not None
    assert [(a.kind, a.host, a.message, a.last_seen) for a in repo.list_alarms()] == [
        ("unexpected-vm", "h1", "x still on h1", at(5)),
        ("agent-silent", "h2", "h2 still silent", at(7)),
        ("unexpected-vm", "h3", "x runs on h3", at(8)),
    ]

    resolved = repo.resolve_alarms([("agent-silent", None, "h2")], at(10))
    assert [(a.host, a.resolved_at) for a in resolved] == [("h1", at(10)), ("h3", at(10))]
    assert [a.id for a in repo.list_alarms()] == [host_only.id]
    assert len(repo.list_alarms(open_only=False)) == 3
    again = repo.open_alarm("unexpected-vm", "id-x", "h1", "x back on h1", at(20))
    assert again is not None and again.id != first.id
    assert [a.host for a in repo.resolve_alarms([], at(30), host="h2")] == ["h2"]
    assert [a.host for a in repo.list_alarms()] == ["h1"]


# -- credentials and settings ------------------------------------------------------------------------------------


def test_api_tokens_keep_only_the_hash(repo: SqlRepository) -> None:
    """An API token is stored with its secret's hash; it can be found and revoked once."""
    token = repo.add_api_token("tok1", "ci", "operator", "sha256:abc", at(0))
    assert repo.find_api_token("tok1") == (token, "sha256:abc")
    assert repo.find_api_token("nope") is None
    with pytest.raises(Conflict):
        repo.add_api_token("tok1", "ci", "operator", "sha256:def", at(1))
    assert repo.revoke_api_token("tok1", at(5)).revoked_at == at(5)
    assert repo.revoke_api_token("tok1", at(9)).revoked_at == at(5)
    assert [t.revoked_at for t in repo.list_api_tokens()] == [at(5)]


def test_enrol_token_single_use_and_expiry(fleet: SqlRepository) -> None:
    """An enrolment token works once, only for its host and hash, and not at or after its expiry."""
    fleet.add_enrol_token("h1", "hash-a", expires_at=at(15))
    fleet.add_enrol_token("h2", "hash-b", expires_at=at(15))
    assert fleet.consume_enrol_token("h1", "hash-b", at(1)) is False
    assert fleet.consume_enrol_token("h2", "hash-a", at(1)) is False
    assert fleet.consume_enrol_token("h1", "hash-a", at(1)) is True
    assert fleet.consume_enrol_token("h1", "hash-a", at(2)) is False
    assert fleet.consume_enrol_token("h2", "hash-b", at(15)) is False  # expired exactly at expires_at
    assert fleet.consume_enrol_token("h2", "hash-b", at(14.99)) is True
    with pytest.raises(NotFound):
        fleet.add_enrol_token("h9", "hash-c", expires_at=at(15))


def test_enrol_token_is_consumed_once_under_concurrency(fleet: SqlRepository) -> None:
    """Eight simultaneous consumers of one token: exactly one succeeds."""
    fleet.add_enrol_token("h1", "hash-a", expires_at=at(15))
    barrier = threading.Barrier(8)

    def consume(_: int) -> bool:
        barrier.wait(timeout=10)
        return fleet.consume_enrol_token("h1", "hash-a", at(1))

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(consume, range(8))) == [False] * 7 + [True]


def test_certificate_revocation(fleet: SqlRepository) -> None:
    """Certificates (160-bit serials) round-trip; revocation sets revoked_at once; unknown serials are NotFound."""
    big = 2**159 + 12345
    cert = HostCertificate(serial=big, host="h1", not_after=at(60 * 24 * 90), issued_at=at(0))
    fleet.add_certificate(cert)
    fleet.add_certificate(HostCertificate(serial=7, host="h2", not_after=at(60), issued_at=at(1)))
    assert fleet.get_certificate(big) == cert
    assert fleet.hosts_with_live_certificates() == {"h1", "h2"}
    assert fleet.get_certificate(8) is None
    assert [c.serial for c in fleet.list_certificates()] == [big, 7]
    assert fleet.list_certificates(host="h1") == [cert]
    with pytest.raises(Conflict):
        fleet.add_certificate(cert)
    assert fleet.revoke_certificate(big, at(10)) == dataclasses.replace(cert, revoked_at=at(10))
    assert fleet.revoke_certificate(big, at(20)).revoked_at == at(10)
    assert fleet.get_certificate(big) == dataclasses.replace(cert, revoked_at=at(10))
    assert [c.revoked_at for c in fleet.list_certificates(host="h2")] == [None]
    assert fleet.hosts_with_live_certificates() == {"h2"}
    fleet.add_certificate(HostCertificate(serial=9, host="h1", not_after=at(90), issued_at=at(30)))  # re-issued
    assert fleet.hosts_with_live_certificates() == {"h1", "h2"}
    with pytest.raises(NotFound):
        fleet.revoke_certificate(8, at(10))


def test_settings_store_json(repo: SqlRepository) -> None:
    """Settings hold JSON values, are replaced on put, and are None when absent."""
    assert repo.get_setting("baseline") is None
    repo.put_setting("baseline", {"min_patch": 3, "hosts": ["h1"], "strict": True})
    assert repo.get_setting("baseline") == {"min_patch": 3, "hosts": ["h1"], "strict": True}
    repo.put_setting("baseline", 4)
    assert repo.get_setting("baseline") == 4
    with pytest.raises(InvalidInput):
        repo.put_setting("bad", object())
