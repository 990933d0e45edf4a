"""What the CMDB keeps of security incidents: the incident (its subject, a VM or a host; its severity; the alerts it
gathered; its closure), a timeline of everything done about it and by whom, the sealed evidence captured for it and
the signed manifest of each capture.

Evidence rows hold hashes, sizes and the artefact's key wrapped under the controller's evidence key; the sealed bytes
live in the controller's evidence store. Nothing here is ever deleted: an incident is closed, not removed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class IncidentRecord:
    id: int
    severity: str  # low | medium | high | critical
    summary: str
    vm_id: str | None
    host: str | None
    tenant: str | None
    source: str  # manual | suricata | falco | generic
    state: str  # open | closed
    opened_at: dt.datetime
    opened_by: str
    dedup_key: str | None = None
    alerts: int = 0
    last_alert_at: dt.datetime | None = None
    closed_at: dt.datetime | None = None
    closed_by: str | None = None
    resolution: str | None = None


@dataclass(frozen=True)
class IncidentAction:
    """One entry of an incident's timeline."""

    incident_id: int
    at: dt.datetime
    principal: str
    kind: str  # opened | alert | capture | evidence | custody | impact | closed | playbook.* | isolate | ...
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    id: int | None = None


@dataclass(frozen=True)
class EvidenceRecord:
    incident_id: int
    capture: str  # the capture's id: its artefacts share one manifest
    artefact: str  # memory | disk0 | disk1 ...
    vm_id: str
    generation: int
    host: str
    started_at: dt.datetime
    finished_at: dt.datetime
    plaintext_sha256: str
    plaintext_bytes: int
    sealed_sha256: str
    sealed_bytes: int
    wrapped_key: str
    collector: str
    id: int | None = None


@dataclass(frozen=True)
class ManifestRecord:
    capture: str
    incident_id: int
    created_at: dt.datetime
    body: str  # canonical JSON, the exact bytes signed
    signature: str  # base64


@dataclass(frozen=True)
class PlaybookVersion:
    version: int
    digest: str
    text: str
    applied_at: dt.datetime
    applied_by: str


@dataclass(frozen=True)
class PlaybookRun:
    incident_id: int
    playbook: str  # the digest of the playbook version it follows
    steps: list[dict[str, Any]]  # as planned at its start: {"kind": ..., options}
    next_step: int
    attempts: int  # of the next step
    state: str  # running | done | failed
    started_at: dt.datetime
    updated_at: dt.datetime
    error: str | None = None


class IncidentRepository(Protocol):
    def open_incident(self, incident: IncidentRecord) -> tuple[IncidentRecord, bool]:
        """Store a new open incident, or, when an open one has the same ``dedup_key``, count one more alert on it;
        (the incident, whether it is new). The incident's ``id`` is ignored on insert."""
        ...

    def get_incident(self, incident_id: int) -> IncidentRecord: ...
    def list_incidents(self, *, open_only: bool = False, vm_id: str | None = None) -> list[IncidentRecord]: ...
    def close_incident(self, incident_id: int, at: dt.datetime, by: str, resolution: str) -> IncidentRecord: ...
    def add_incident_action(self, action: IncidentAction) -> IncidentAction: ...
    def incident_actions(self, incident_id: int) -> list[IncidentAction]: ...
    def add_evidence(self, records: list[EvidenceRecord], manifest: ManifestRecord) -> None:
        """The artefacts of one capture and its signed manifest, in one transaction."""
        ...

    def list_evidence(self, incident_id: int) -> list[EvidenceRecord]: ...
    def list_manifests(self, incident_id: int) -> list[ManifestRecord]: ...
    def add_playbook_version(self, digest: str, text: str, at: dt.datetime, by: str) -> PlaybookVersion: ...
    def current_playbook(self) -> PlaybookVersion | None: ...
    def start_playbook_run(self, run: PlaybookRun) -> tuple[PlaybookRun, bool]:
        """Store a new run, or return the incident's existing one (one run per incident); (run, whether new)."""
        ...

    def update_playbook_run(self, incident_id: int, **changes: Any) -> PlaybookRun:
        """Change ``next_step``, ``attempts``, ``state``, ``error`` (``updated_at`` is required)."""
        ...

    def get_playbook_run(self, incident_id: int) -> PlaybookRun | None: ...
    def running_playbook_runs(self) -> list[PlaybookRun]: ...
