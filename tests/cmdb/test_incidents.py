"""Incidents on SQLite and PostgreSQL: an alert with the key of an open incident counts on it instead of opening
another, a closed incident's key opens a new one, closing is written once, the timeline keeps its order, and a
capture's evidence and manifest are stored together."""

from __future__ import annotations

import datetime as dt

import pytest

from ferryman.cmdb.incidents import EvidenceRecord, IncidentAction, IncidentRecord, ManifestRecord
from ferryman.cmdb.sql import SqlRepository
from ferryman.core.errors import Conflict, NotFound

T0 = dt.datetime(2026, 12, 6, 10, tzinfo=dt.UTC)


def incident(**changes: object) -> IncidentRecord:
    base = {
        "id": 0,
        "severity": "high",
        "summary": "ET SCAN",
        "vm_id": "id-web",
        "host": None,
        "tenant": "acme",
        "source": "suricata",
        "state": "open",
        "opened_at": T0,
        "opened_by": "alert:suricata",
        "dedup_key": "k1",
        "alerts": 1,
    }
    return IncidentRecord(**(base | changes))  # type: ignore[arg-type]


def test_dedup_counts_alerts_on_the_open_incident(repo: SqlRepository) -> None:
    first, new = repo.open_incident(incident())
    assert new and first.id > 0 and first.alerts == 1 and first.state == "open"
    again, new = repo.open_incident(incident(opened_at=T0 + dt.timedelta(minutes=1)))
    assert not new and again.id == first.id and again.alerts == 2
    assert again.last_alert_at == T0 + dt.timedelta(minutes=1)
    other, new = repo.open_incident(incident(dedup_key="k2"))
    assert new and other.id != first.id
    manual, new = repo.open_incident(incident(dedup_key=None, source="manual"))
    manual2, new2 = repo.open_incident(incident(dedup_key=None, source="manual"))
    assert new and new2 and manual.id != manual2.id  # manual incidents never merge
    closed = repo.close_incident(first.id, T0 + dt.timedelta(hours=1), "token:admin", "reimaged")
    assert closed.state == "closed" and closed.resolution == "reimaged"
    with pytest.raises(Conflict, match="closed already"):
        repo.close_incident(first.id, T0 + dt.timedelta(hours=2), "token:admin", "again")
    reopened, new = repo.open_incident(incident(opened_at=T0 + dt.timedelta(hours=3)))
    assert new and reopened.id not in (first.id, other.id)  # after closing, the same attack is a new incident
    assert [i.id for i in repo.list_incidents(open_only=True)] == sorted(
        [reopened.id, other.id, manual.id, manual2.id], reverse=True
    )
    with pytest.raises(NotFound):
        repo.get_incident(99999)


def test_an_incident_needs_a_subject(repo: SqlRepository) -> None:
    with pytest.raises(Conflict, match="refused"):  # the database refuses it (the service checks first)
        repo.open_incident(incident(vm_id=None, host=None))


def test_timeline_and_evidence(repo: SqlRepository) -> None:
    opened, _ = repo.open_incident(incident())
    for minute, kind in [(0, "opened"), (2, "capture"), (1, "alert")]:
        repo.add_incident_action(IncidentAction(opened.id, T0 + dt.timedelta(minutes=minute), "system", kind, kind))
    assert [a.kind for a in repo.incident_actions(opened.id)] == ["opened", "alert", "capture"]
    with pytest.raises(NotFound):
        repo.add_incident_action(IncidentAction(12345, T0, "system", "x", "x"))
    record = EvidenceRecord(
        incident_id=opened.id,
        capture="c1",
        artefact="memory",
        vm_id="id-web",
        generation=2,
        host="h1",
        started_at=T0,
        finished_at=T0,
        plaintext_sha256="sha256:" + "a" * 64,
        plaintext_bytes=10,
        sealed_sha256="sha256:" + "b" * 64,
        sealed_bytes=99,
        wrapped_key="d3JhcHBlZA==",
        collector="token:admin",
    )
    manifest = ManifestRecord("c1", opened.id, T0, '{"capture":"c1"}', "c2ln")
    repo.add_evidence([record], manifest)
    assert [e.artefact for e in repo.list_evidence(opened.id)] == ["memory"]
    assert repo.list_manifests(opened.id)[0].body == '{"capture":"c1"}'
    with pytest.raises(Conflict, match="refused"):  # one artefact name per capture
        repo.add_evidence([record], ManifestRecord("c1", opened.id, T0, "{}", "x"))
    assert len(repo.list_evidence(opened.id)) == 1  # the refused capture wrote nothing
