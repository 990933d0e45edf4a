"""The audit log's hash chain on SQLite and PostgreSQL: every insert extends one chain, and an entry edited, deleted or
reordered with SQL, a truncated or rewritten tail, or a forged checkpoint is named by ``verify``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from ferryman.cmdb.audit_chain import GENESIS, Entry, entry_from_jsonl, link_hash, verify_entries
from ferryman.cmdb.engine import alembic_config, create_engine
from ferryman.cmdb.event_sql import SqlAuditLog
from ferryman.cmdb.schema import audit_chain_head, audit_checkpoints, events
from ferryman.cmdb.sql import SqlRepository, open_repository
from ferryman.controller.audit import AuditService
from ferryman.core.errors import Conflict, InvalidInput
from ferryman.core.models import Event, Severity
from ferryman.pki.ca import CertificateAuthority
from ferryman.testing.clock import FakeClock

T0 = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def ca(tmp_path: Path, clock: FakeClock) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca", clock)


@pytest.fixture
def recorded() -> list[Event]:
    """What the service wrote to the log through its ``record`` callable."""
    return []


@pytest.fixture
def audit(repo: SqlRepository, ca: CertificateAuthority, clock: FakeClock, recorded: list[Event]) -> AuditService:
    def record(kind: str, message: str, principal: str, *, severity: Severity = Severity.INFO, **data: Any) -> Event:
        event = repo.record_event(Event(kind, message, clock.now(), severity, principal, data=data))
        recorded.append(event)
        return event

    return AuditService(SqlAuditLog(repo.engine), ca, clock, record=record, batch=3)


def event(i: int, **fields: Any) -> Event:
    values: dict[str, Any] = {
        "kind": f"vm.step{i % 3}",
        "message": f"entry {i}: ünïcode | pipe = equals \\ backslash\nsecond line",
        "time": T0 + dt.timedelta(seconds=i, microseconds=i),
        "severity": [Severity.INFO, Severity.WARNING, Severity.ALARM][i % 3],
        "principal": "token:admin",
        "vm": f"id-vm{i}" if i % 2 else None,
        "host": "h1" if i % 3 else None,
        "data": {"i": i, "ratio": i / 7, "whole": float(i), "big": 1e16, "nested": [1.0, {"z": None, "a": "ß"}]},
    }
    return Event(**(values | fields))


def seed(repo: SqlRepository, count: int, start: int = 1) -> list[Event]:
    return [repo.record_event(event(i)) for i in range(start, start + count)]


def rows(repo: SqlRepository) -> list[sa.Row[Any]]:
    with repo.engine.connect() as conn:
        return list(conn.execute(sa.select(events).order_by(events.c.id)))


def execute(repo: SqlRepository, *statements: Any) -> None:
    """Tampering: SQL straight into the database, as someone with the database file or credentials would."""
    with repo.engine.begin() as conn:
        for statement in statements:
            conn.execute(statement)


def broken(report: dict[str, Any]) -> tuple[int, str]:
    assert report["ok"] is False, report
    return report["first_broken"]["id"], report["first_broken"]["reason"]


# -- the chain as written -----------------------------------------------------------------------------------------


def test_every_insert_extends_one_chain(repo: SqlRepository, audit: AuditService) -> None:
    """Each event links to the one before (the first to the genesis hash); the head row follows the last."""
    seeded = seed(repo, 7)
    assert [e.id for e in seeded] == list(range(1, 8))
    stored = rows(repo)
    assert stored[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(stored))
    assert all(r.hash == link_hash(r.prev_hash, r) for r in stored)
    assert SqlAuditLog(repo.engine).head() == (7, stored[-1].hash)
    report = audit.verify()
    assert report == {
        "ok": True,
        "checked": 7,
        "first_broken": None,
        "head": {"id": 7, "hash": stored[-1].hash},
        "from": None,
        "checkpoints": 0,
        "checkpoint": None,
    }


def test_an_empty_log_verifies(audit: AuditService) -> None:
    """No entries, no checkpoint: intact, nothing checked, nothing to sign."""
    report = audit.verify()
    assert (report["ok"], report["checked"], report["head"], report["checkpoint"]) == (True, 0, None, None)
    assert audit.checkpoint() is None


def test_json_values_hash_alike_on_both_backends(repo: SqlRepository, audit: AuditService) -> None:
    """Integral and huge floats, -0.0, non-ASCII and line separators come back from JSON/JSONB so the hash holds."""
    data = {"one": 1.0, "e16": 1e16, "e300": 1e300, "tiny": 1.5e-300, "neg0": -0.0, "tuple": (1, 2.5), 7: "int key"}
    repo.record_event(event(1, data=data, message="snow \u2603 \u2028 sep \U0001f600"))
    seed(repo, 2, start=2)
    assert audit.verify()["ok"] is True


def test_concurrent_writers_keep_one_linear_chain(repo: SqlRepository, audit: AuditService) -> None:
    """Eight threads on their own connections write 160 events: dense ids, one chain, nothing forked or lost."""

    def write(worker: int) -> list[int]:
        return [repo.record_event(event(worker * 100 + i)).id or 0 for i in range(20)]

    with ThreadPoolExecutor(8) as pool:
        ids = sorted(i for batch in pool.map(write, range(8)) for i in batch)
    assert ids == list(range(1, 161))
    report = audit.verify()
    assert (report["ok"], report["checked"], report["head"]["id"]) == (True, 160, 160)


# -- tampering with entries ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"message": "nothing happened"},
        {"data": {"i": 3, "forged": True}},
        {"time": T0 + dt.timedelta(seconds=3, microseconds=4)},  # one microsecond later
        {"kind": "vm.harmless"},
        {"severity": "alarm"},
        {"principal": "token:someone-else"},
        {"vm": "id-other"},
        {"host": "h9"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_an_edited_entry_is_named(repo: SqlRepository, audit: AuditService, change: dict[str, Any]) -> None:
    """Any field of entry 3 changed in the database: verify names entry 3 and says it was edited."""
    seed(repo, 6)
    execute(repo, sa.update(events).where(events.c.id == 3).values(**change))
    entry, reason = broken(audit.verify())
    assert entry == 3
    assert reason.startswith("edited")


def test_an_edited_entry_with_a_recomputed_hash_breaks_the_next_link(repo: SqlRepository, audit: AuditService) -> None:
    """Whoever rehashes the entry they edited breaks the link of the entry after it."""
    seed(repo, 6)
    row = rows(repo)[2]
    forged = Entry(**(row._asdict() | {"message": "nothing happened"}))
    execute(
        repo,
        sa.update(events).where(events.c.id == 3).values(message=forged.message, hash=link_hash(row.prev_hash, forged)),
    )
    assert broken(audit.verify()) == (
        4,
        "does not follow entry 3: entry 3 was rewritten, or entries between them were deleted or reordered",
    )


def test_a_deleted_entry_is_named_by_the_one_after(repo: SqlRepository, audit: AuditService) -> None:
    """Entry 3 deleted: entry 4 no longer follows entry 2."""
    seed(repo, 6)
    execute(repo, sa.delete(events).where(events.c.id == 3))
    entry, reason = broken(audit.verify())
    assert (entry, reason.split(":")[0]) == (4, "does not follow entry 2")


def test_deleting_the_first_entry_is_detected(repo: SqlRepository, audit: AuditService) -> None:
    """The new first entry does not follow the genesis hash."""
    seed(repo, 3)
    execute(repo, sa.delete(events).where(events.c.id == 1))
    assert broken(audit.verify())[0] == 2


def test_reordered_entries_are_named(repo: SqlRepository, audit: AuditService) -> None:
    """Entries 3 and 4 swapped (each row given the other's id): verify names entry 3."""
    seed(repo, 6)
    third, fourth = (r._asdict() for r in rows(repo)[2:4])
    execute(
        repo,
        sa.delete(events).where(events.c.id.in_([3, 4])),
        sa.insert(events).values(**(fourth | {"id": 3})),
        sa.insert(events).values(**(third | {"id": 4})),
    )
    assert broken(audit.verify())[0] == 3


def test_verify_from_an_entry_checks_from_there(repo: SqlRepository, audit: AuditService) -> None:
    """``from`` walks from that entry on (linked to the one before it); an edit before it is not its business."""
    seed(repo, 8)
    execute(repo, sa.update(events).where(events.c.id == 2).values(message="edited"))
    partial = audit.verify(5)
    assert (partial["ok"], partial["checked"], partial["from"]) == (True, 4, 5)
    assert broken(audit.verify())[0] == 2
    execute(repo, sa.update(events).where(events.c.id == 6).values(message="edited"))
    assert broken(audit.verify(5))[0] == 6
    with pytest.raises(InvalidInput):
        audit.verify(0)


def test_the_recorded_head_catches_a_truncated_tail(repo: SqlRepository, audit: AuditService) -> None:
    """Without any checkpoint, the last entries deleted (head row left alone): the head's entry is missing."""
    seed(repo, 6)
    execute(repo, sa.delete(events).where(events.c.id > 4))
    entry, reason = broken(audit.verify())
    assert entry == 6
    assert reason == "missing: the chain ends at entry 4, but the recorded chain head covers entry 6"


# -- checkpoints --------------------------------------------------------------------------------------------------


def test_checkpoints_are_signed_once_per_head(repo: SqlRepository, audit: AuditService, clock: FakeClock) -> None:
    """A checkpoint signs the last entry; an unchanged chain gets no second one; verify checks its signature."""
    seed(repo, 5)
    first = audit.checkpoint()
    assert first is not None
    assert (first["id"], first["event_id"], first["hash"]) == (1, 5, rows(repo)[-1].hash)
    assert audit.checkpoint() == first
    seed(repo, 2, start=6)
    clock.advance(60)
    second = audit.checkpoint()
    assert second is not None and (second["id"], second["event_id"]) == (2, 7)
    report = audit.verify()
    assert report["ok"] and report["checkpoints"] == 2
    assert report["checkpoint"] == second | {"signature_ok": True}


def test_maybe_checkpoint_waits_for_its_interval(repo: SqlRepository, audit: AuditService, clock: FakeClock) -> None:
    """The reconcile loop's call signs at most one checkpoint per interval, and only when the chain moved."""
    assert audit.maybe_checkpoint() is None  # empty log
    seed(repo, 2)
    assert audit.maybe_checkpoint() is not None
    seed(repo, 1, start=3)
    assert audit.maybe_checkpoint() is None  # too soon
    clock.advance(301)
    signed = audit.maybe_checkpoint()
    assert signed is not None and signed["event_id"] == 3
    clock.advance(301)
    assert audit.maybe_checkpoint() is None  # nothing new


def test_a_truncated_tail_is_caught_by_the_checkpoint(repo: SqlRepository, audit: AuditService) -> None:
    """Entries after 4 deleted and the head row moved back to 4: the signed checkpoint of entry 6 is missing."""
    seed(repo, 6)
    audit.checkpoint()
    seed(repo, 2, start=7)
    fourth = rows(repo)[3]
    execute(
        repo,
        sa.delete(events).where(events.c.id > 4),
        sa.update(audit_chain_head).values(event_id=4, hash=fourth.hash),
    )
    assert broken(audit.verify()) == (6, "missing: the chain ends at entry 4, but checkpoint 1 covers entry 6")


def test_a_rewritten_tail_with_recomputed_hashes_is_caught(repo: SqlRepository, audit: AuditService) -> None:
    """The tail after entry 4 replaced by new, correctly chained entries: it no longer passes the checkpointed hash."""
    seed(repo, 6)
    audit.checkpoint()
    fourth = rows(repo)[3]
    execute(
        repo,
        sa.delete(events).where(events.c.id > 4),
        sa.update(audit_chain_head).values(event_id=4, hash=fourth.hash),
    )
    seed(repo, 4, start=50)  # entries 5-8, chained by the ordinary writer
    assert [r.id for r in rows(repo)] == list(range(1, 9))
    assert broken(audit.verify()) == (6, "rewritten: its hash differs from the one in checkpoint 1")


@pytest.mark.parametrize("forge", ["signature", "hash", "event_id"])
def test_a_forged_checkpoint_is_refused(repo: SqlRepository, audit: AuditService, forge: str) -> None:
    """A checkpoint whose signature, hash or entry was altered does not verify."""
    seed(repo, 6)
    audit.checkpoint()
    stored = rows(repo)
    change = {"signature": "MEUCIQ==", "hash": stored[5].prev_hash, "event_id": 5}[forge]
    execute(repo, sa.update(audit_checkpoints).values(**{forge: change}))
    report = audit.verify()
    _, reason = broken(report)
    assert reason == "checkpoint 1: its signature does not verify (forged or altered)"
    assert report["checkpoint"]["signature_ok"] is False


def test_no_checkpoint_is_signed_over_a_broken_chain(
    repo: SqlRepository, audit: AuditService, clock: FakeClock, recorded: list[Event]
) -> None:
    """A broken chain refuses the checkpoint and is written to the log once as an alarm, however often it is found."""
    seed(repo, 4)
    audit.checkpoint()
    seed(repo, 2, start=5)
    execute(repo, sa.update(events).where(events.c.id == 5).values(message="edited"))
    clock.advance(600)
    with pytest.raises(Conflict, match="broken at entry 5"):
        audit.checkpoint()
    assert audit.maybe_checkpoint() is None
    audit.verify()
    assert [(e.kind, e.severity, e.data["entry"]) for e in recorded] == [("audit.chain_broken", Severity.ALARM, 5)]
    latest = SqlAuditLog(repo.engine).latest_checkpoint()
    assert latest is not None and latest.event_id == 4


# -- export ---------------------------------------------------------------------------------------------------------


def test_a_jsonl_export_verifies_on_its_own(repo: SqlRepository, audit: AuditService, recorded: list[Event]) -> None:
    """Every exported line carries the entry and both hashes: the export alone re-verifies; the export is audited."""
    seed(repo, 7)
    lines = "".join(audit.export(None, "jsonl", "token:auditor")).splitlines()
    assert len(lines) == 8  # the export's own event is written before the first line
    assert verify_entries(entry_from_jsonl(line) for line in lines).ok
    assert [(e.kind, e.principal) for e in recorded] == [("audit.exported", "token:auditor")]


def test_export_since_and_cef(repo: SqlRepository, audit: AuditService) -> None:
    """``since`` keeps the entries at or after it, in chain order (not the export's own event, at T0); CEF has one
    line per entry."""
    seed(repo, 7)
    since = T0 + dt.timedelta(seconds=5)
    lines = "".join(audit.export(since, "cef", "token:auditor")).splitlines()
    assert [line.split("externalId=")[1].split(" ")[0] for line in lines] == ["5", "6", "7"]
    assert all(line.startswith("CEF:0|Ferryman|controller|") for line in lines)
    with pytest.raises(InvalidInput):
        audit.export(None, "xml", "token:auditor")


# -- schema upgrade and copies -----------------------------------------------------------------------------------


def test_the_upgrade_chains_the_events_already_stored(repo: SqlRepository, audit: AuditService) -> None:
    """Events written before revision 0010 (with a gap in their ids) are chained by it; new ones follow them."""
    config = alembic_config()
    legacy = sa.table("events", *(sa.column(c.name, c.type) for c in events.c if c.name not in {"prev_hash", "hash"}))
    with repo.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0009")
        for i in (1, 2, 5):
            values = dataclasses.asdict(event(i)) | {"id": i}
            conn.execute(sa.insert(legacy).values(**values | {"severity": values["severity"].value}))
        command.upgrade(config, "head")
    assert SqlAuditLog(repo.engine).head() == (5, rows(repo)[-1].hash)
    assert repo.record_event(event(6)).id == 6
    report = audit.verify()
    assert (report["ok"], report["checked"]) == (True, 4)


@pytest.fixture
def sqlite_repo(tmp_path: Path) -> Iterator[SqlRepository]:
    repository = open_repository(f"sqlite:///{tmp_path / 'cmdb.sqlite'}")
    yield repository
    repository.close()


def test_a_copy_of_the_database_verifies_and_shows_tampering(
    sqlite_repo: SqlRepository, ca: CertificateAuthority, clock: FakeClock, tmp_path: Path
) -> None:
    """A copy of the SQLite file, away from the controller, verifies with the CA certificate; an edit to the copy is
    found there and leaves the original intact."""
    seed(sqlite_repo, 9)
    original = AuditService(SqlAuditLog(sqlite_repo.engine), ca, clock)
    original.checkpoint()
    copy = tmp_path / "copy.sqlite"
    with sqlite3.connect(tmp_path / "cmdb.sqlite") as source, sqlite3.connect(copy) as target:
        source.backup(target)
    engine = create_engine(f"sqlite:///{copy}")
    try:
        copied = AuditService(SqlAuditLog(engine), ca, clock)
        assert copied.verify() == original.verify()
        with engine.begin() as conn:
            conn.execute(sa.update(events).where(events.c.id == 7).values(data={}))
        assert broken(copied.verify())[0] == 7
        assert original.verify()["ok"] is True
    finally:
        engine.dispose()
