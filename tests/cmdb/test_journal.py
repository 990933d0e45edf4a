"""The migration journal on SQLite and PostgreSQL: records, steps, the commit as one transaction, scrub receipts."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from ferryman.cmdb.engine import alembic_config
from ferryman.cmdb.journal import JournalRepository, MigrationRecord, MigrationStep, ScrubReceiptRecord
from ferryman.cmdb.schema import metadata, migrations
from ferryman.cmdb.sql import SqlRepository
from ferryman.core.errors import Conflict, InvalidInput, NotFound
from ferryman.core.models import VM, Placement

T0 = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)
JOURNAL_TABLES = {"migrations", "migration_steps", "scrub_receipts"}
# the tables of the revisions after the journal
LATER_TABLES = {
    *("policy_versions", "violations", "disk_keys", "signing_keys", "images", "networks", "nics"),
    *("incidents", "incident_actions", "evidence", "manifests", "playbook_versions", "playbook_runs"),
    *("audit_chain_head", "audit_checkpoints", "principals", "access_policies", "approvals"),
}


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def make_vm(name: str) -> VM:
    return VM(
        id=f"id-{name}",
        name=name,
        tenant="acme",
        memory_mb=512,
        vcpus=1,
        disk_bytes=10 * 2**30,
        image="debian-12",
        canary="c4n4ry",
    )


def make_migration(mid: str, vm_id: str = "id-web", src: str = "h1", dst: str = "h2", **fields: Any) -> MigrationRecord:
    requested = fields.pop("requested_at", at(1))
    return MigrationRecord(
        id=mid,
        vm_id=vm_id,
        source=src,
        destination=dst,
        shared_storage=False,
        phase="requested",
        principal="alice",
        generation=fields.pop("generation", 1),
        requested_at=requested,
        updated_at=requested,
        **fields,
    )


def switched_over(repo: SqlRepository, mid: str = "m1", **fields: Any) -> MigrationRecord:
    """A migration of web (h1 → h2 unless told) advanced to switched_over at t0+5m."""
    repo.add_migration(make_migration(mid, **fields))
    return repo.advance_migration(mid, "switched_over", at(5))


def state(repo: SqlRepository, mid: str = "m1") -> tuple[object, ...]:
    """Everything a commit may touch, to compare before and after a refused or failed one."""
    return (repo.get_vm("id-web"), repo.host_chain("id-web"), repo.get_migration(mid), repo.migration_steps(mid))


@pytest.fixture
def web(fleet: SqlRepository) -> SqlRepository:
    """The fleet with VM web (id-web) on h1 since t0, generation 1."""
    fleet.add_vm(make_vm("web"), "h1", at(0))
    return fleet


def test_sql_repository_is_a_journal_repository(repo: SqlRepository) -> None:
    """SqlRepository satisfies the JournalRepository protocol (mypy checks this assignment)."""
    as_protocol: JournalRepository = repo
    assert as_protocol is repo


def test_downgrade_to_0001_and_upgrade_again(repo: SqlRepository) -> None:
    """The journal revision can be undone (its three tables go, the rest stays) and redone on both backends."""
    config = alembic_config()
    with repo.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0001")
        expected = {"alembic_version", *metadata.tables} - JOURNAL_TABLES - LATER_TABLES
        assert set(sa.inspect(conn).get_table_names()) == expected
        command.upgrade(config, "head")
        assert set(sa.inspect(conn).get_table_names()) == {"alembic_version", *metadata.tables}


# -- records ---------------------------------------------------------------------------------------------------------


def test_add_get_and_list_migrations(web: SqlRepository) -> None:
    """add_migration round-trips the record; list_migrations is newest first and filters by VM and activity."""
    web.add_vm(make_vm("db"), "h2", at(0))
    first = make_migration("m1", data={"reason": "drain h1"}, bytes_transferred=2**40)
    assert web.add_migration(first) == first
    assert web.get_migration("m1") == first
    web.advance_migration("m1", "rolled_back", at(3), outcome="rolled_back", error="dst refused")
    web.add_migration(make_migration("m2", requested_at=at(4), src="h1", dst="h3"))
    web.add_migration(make_migration("m3", vm_id="id-db", requested_at=at(2), src="h2", dst="h1"))
    assert [m.id for m in web.list_migrations()] == ["m2", "m3", "m1"]
    assert [m.id for m in web.list_migrations(vm_id="id-web")] == ["m2", "m1"]
    assert [m.id for m in web.list_migrations(active_only=True)] == ["m2", "m3"]
    assert [m.id for m in web.list_migrations(vm_id="id-web", active_only=True)] == ["m2"]
    assert [m.id for m in web.list_migrations(limit=1)] == ["m2"]
    with pytest.raises(NotFound):
        web.get_migration("m9")
    with pytest.raises(InvalidInput):
        web.list_migrations(limit=0)


def test_add_migration_refuses_bad_records(web: SqlRepository) -> None:
    """Unknown VM/host: NotFound; taken id: Conflict; src = dst, phase committed, lone outcome: InvalidInput."""
    web.add_migration(make_migration("m1"))
    web.advance_migration("m1", "refused", at(2), outcome="refused")
    with pytest.raises(NotFound):
        web.add_migration(make_migration("m2", vm_id="id-nope"))
    with pytest.raises(NotFound):
        web.add_migration(make_migration("m2", dst="h9"))
    with pytest.raises(Conflict):
        web.add_migration(make_migration("m1"))
    with pytest.raises(InvalidInput):
        web.add_migration(make_migration("m2", dst="h1"))
    with pytest.raises(InvalidInput):
        web.add_migration(dataclasses.replace(make_migration("m2"), phase="committed"))
    with pytest.raises(InvalidInput):
        web.add_migration(make_migration("m2", outcome="refused"))
    assert [m.id for m in web.list_migrations()] == ["m1"]


def test_one_active_migration_per_vm(web: SqlRepository) -> None:
    """A VM's second active migration conflicts (in the database too); once the first has an outcome, it may go."""
    web.add_migration(make_migration("m1"))
    with pytest.raises(Conflict, match="already has an active migration"):
        web.add_migration(make_migration("m2", dst="h3"))
    with pytest.raises(sa.exc.IntegrityError), web.engine.begin() as conn:
        row = dataclasses.asdict(make_migration("m2", dst="h3"))
        conn.execute(sa.insert(migrations).values(**row))
    web.advance_migration("m1", "rolled_back", at(3), outcome="rolled_back")
    web.add_migration(make_migration("m2", dst="h3", requested_at=at(4)))
    assert [(m.id, m.outcome) for m in web.list_migrations()] == [("m2", None), ("m1", "rolled_back")]


# -- advancing and steps ---------------------------------------------------------------------------------------------


def test_advance_sets_fields_merges_data_and_appends_steps(web: SqlRepository) -> None:
    """Each advance sets the phase and given fields, merges data and appends a step numbered 1..n in order."""
    web.add_migration(make_migration("m1", data={"bandwidth": 100}))
    web.advance_migration("m1", "admitted", at(2), expected_phase="requested", data={"policy": "ok"})
    web.advance_migration("m1", "transferring", at(3), bytes_transferred=4096, data={"bandwidth": 50})
    done = web.advance_migration("m1", "done", at(4), outcome="done", downtime_ms=42)
    assert done == dataclasses.replace(
        make_migration("m1"),
        phase="done",
        updated_at=at(4),
        finished_at=at(4),
        outcome="done",
        bytes_transferred=4096,
        downtime_ms=42,
        data={"bandwidth": 50, "policy": "ok"},
    )
    assert web.get_migration("m1") == done
    assert web.migration_steps("m1") == [
        MigrationStep("m1", 1, "requested", at(1), {"bandwidth": 100}),
        MigrationStep("m1", 2, "admitted", at(2), {"policy": "ok"}),
        MigrationStep("m1", 3, "transferring", at(3), {"bandwidth": 50}),
        MigrationStep("m1", 4, "done", at(4), {}),
    ]
    with pytest.raises(NotFound):
        web.migration_steps("m9")


def test_refused_advances_write_nothing(web: SqlRepository) -> None:
    """Phase mismatch, target committed, bad data, finished migration: refused, record and steps unchanged."""
    web.add_migration(make_migration("m1"))
    web.advance_migration("m1", "admitted", at(2))
    before = (web.get_migration("m1"), web.migration_steps("m1"))
    with pytest.raises(Conflict, match="not 'requested'"):
        web.advance_migration("m1", "snapshotted", at(3), expected_phase="requested", data={"x": 1})
    with pytest.raises(Conflict):
        web.advance_migration("m1", "committed", at(3))
    with pytest.raises(InvalidInput):
        web.advance_migration("m1", "snapshotted", at(3), data={"x": object()})
    with pytest.raises(NotFound):
        web.advance_migration("m9", "snapshotted", at(3))
    assert (web.get_migration("m1"), web.migration_steps("m1")) == before
    web.advance_migration("m1", "rolled_back", at(4), outcome="rolled_back", error="boom")
    finished = (web.get_migration("m1"), web.migration_steps("m1"))
    with pytest.raises(Conflict, match="finished"):
        web.advance_migration("m1", "rolling_back", at(5))
    assert (web.get_migration("m1"), web.migration_steps("m1")) == finished


def test_request_cancel(web: SqlRepository) -> None:
    """request_cancel sets the flag once (asking again changes nothing); a finished migration refuses it."""
    web.add_migration(make_migration("m1"))
    flagged = web.request_cancel("m1", at(2))
    assert (flagged.cancel_requested, flagged.updated_at, flagged.phase) == (True, at(2), "requested")
    assert web.request_cancel("m1", at(3)) == flagged
    assert web.get_migration("m1") == flagged
    web.advance_migration("m1", "rolled_back", at(4), outcome="rolled_back")
    with pytest.raises(Conflict):
        web.request_cancel("m1", at(5))
    with pytest.raises(NotFound):
        web.request_cancel("m9", at(5))


# -- the commit ------------------------------------------------------------------------------------------------------


def test_commit_moves_placement_and_marks_committed(web: SqlRepository) -> None:
    """commit closes h1 at ``at``, opens h2 with generation 2, bumps the VM and sets the phase, with a step."""
    switched_over(web)
    record, vm, placement = web.commit_migration("m1", at(6))
    assert (record.phase, record.updated_at, record.outcome) == ("committed", at(6), None)
    assert (vm.generation, placement) == (2, Placement("id-web", "h2", 2, at(6)))
    assert web.get_vm("id-web").generation == 2
    assert web.host_chain("id-web") == [Placement("id-web", "h1", 1, at(0), at(6)), placement]
    assert web.get_migration("m1") == record
    assert web.migration_steps("m1")[-1] == MigrationStep("m1", 3, "committed", at(6), {"generation": 2})
    with pytest.raises(Conflict):  # committed is not switched_over: a second commit is refused
        web.commit_migration("m1", at(7))


def test_commit_refused_unless_switched_over(web: SqlRepository) -> None:
    """A migration not in switched_over (or finished, or unknown) cannot commit; nothing changes."""
    web.add_migration(make_migration("m1"))
    web.advance_migration("m1", "transferring", at(5))
    before = state(web)
    with pytest.raises(Conflict, match="only a migration in 'switched_over'"):
        web.commit_migration("m1", at(6))
    assert state(web) == before
    web.advance_migration("m1", "switched_over", at(6), outcome="stuck")
    with pytest.raises(Conflict, match="finished"):
        web.commit_migration("m1", at(7))
    with pytest.raises(NotFound):
        web.commit_migration("m9", at(7))
    assert web.host_chain("id-web") == before[1]


def test_commit_refused_after_move_vm(web: SqlRepository) -> None:
    """If move_vm moved the VM meanwhile (generation 2), the commit planned at generation 1 conflicts: no change."""
    switched_over(web, dst="h3")
    web.move_vm("id-web", "h2", at(5.5))
    before = state(web)
    with pytest.raises(Conflict, match="generation 2, not 1"):
        web.commit_migration("m1", at(6))
    assert state(web) == before


def test_commit_refused_after_another_commit(web: SqlRepository) -> None:
    """A migration planned at generation 1 cannot commit after another migration committed the VM to generation 2."""
    switched_over(web, "m1")
    web.commit_migration("m1", at(6))
    web.advance_migration("m1", "done", at(7), outcome="done")
    switched_over(web, "m2", src="h2", dst="h3", requested_at=at(8), generation=1)
    before = state(web, "m2")
    with pytest.raises(Conflict, match="generation 2, not 1"):
        web.commit_migration("m2", at(9))
    assert state(web, "m2") == before


def test_commit_refused_when_vm_not_on_source(web: SqlRepository) -> None:
    """At the right generation but not on the migration's source (h2, while web is on h1): Conflict, no change."""
    switched_over(web, src="h2", dst="h3")
    before = state(web)
    with pytest.raises(Conflict, match="not on 'h2'"):
        web.commit_migration("m1", at(6))
    assert state(web) == before


def test_commit_is_one_transaction(web: SqlRepository) -> None:
    """If appending the committed step fails after the move and the phase update, all of it rolls back."""

    class InjectedFault(Exception):
        pass

    def fail_step(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO MIGRATION_STEPS"):
            raise InjectedFault

    switched_over(web)
    before = state(web)
    sa.event.listen(web.engine, "before_cursor_execute", fail_step)
    try:
        with pytest.raises(InjectedFault):
            web.commit_migration("m1", at(6))
    finally:
        sa.event.remove(web.engine, "before_cursor_execute", fail_step)
    assert state(web) == before
    assert web.commit_migration("m1", at(6))[2] == Placement("id-web", "h2", 2, at(6))


def test_racing_commits_and_moves_commit_once(web: SqlRepository) -> None:
    """Four commits race four moves planned at generation 1: exactly one wins; journal and placement agree."""
    switched_over(web)
    barrier = threading.Barrier(8)

    def attempt(i: int) -> bool:
        barrier.wait(timeout=10)
        try:
            if i % 2:
                web.commit_migration("m1", at(6))
            else:
                web.move_vm("id-web", "h3", at(6), expected_generation=1)
        except Conflict:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(attempt, range(8))) == 1
    chain = [(p.host, p.generation, p.valid_to) for p in web.host_chain("id-web")]
    assert chain in ([("h1", 1, at(6)), ("h2", 2, None)], [("h1", 1, at(6)), ("h3", 2, None)])
    assert web.get_migration("m1").phase == ("committed" if chain[-1][0] == "h2" else "switched_over")


# -- scrub receipts --------------------------------------------------------------------------------------------------


def test_scrub_receipts_round_trip(web: SqlRepository) -> None:
    """Receipts get ids, list per migration oldest first; unknown host or no migration is fine, unknown one not."""
    web.add_migration(make_migration("m1"))
    later = ScrubReceiptRecord(
        "h2", "/var/lib/ferryman/web.qcow2", 10 * 2**30, "discard", 1.5, "sha256:ab", at(9), "m1"
    )
    earlier = dataclasses.replace(later, path="/var/lib/ferryman/web.snap", bytes=2**20, at=at(8))
    stored = [web.add_scrub_receipt(later), web.add_scrub_receipt(earlier)]
    assert [r.id is not None for r in stored] == [True, True]
    assert web.list_scrub_receipts("m1") == stored[::-1]
    assert stored[0] == dataclasses.replace(later, id=stored[0].id)
    orphan = web.add_scrub_receipt(dataclasses.replace(later, host="decommissioned-7", migration_id=None))
    assert orphan.id is not None and orphan.host == "decommissioned-7"
    assert web.list_scrub_receipts("m1") == stored[::-1]
    with pytest.raises(NotFound):
        web.add_scrub_receipt(dataclasses.replace(later, migration_id="m9"))
    with pytest.raises(NotFound):
        web.list_scrub_receipts("m9")
