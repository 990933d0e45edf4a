"""Incident response: incidents opened by hand or from alerts, their timeline, forensic capture into the evidence
store, evidence verification with a chain of custody, and impact over present and past neighbours.

Every step is persisted before its side effect: an action is written to the incident's timeline (and the audit log)
before a host is asked to act, and its result after. An alert storm cannot become a thrashing vector: alerts pass a
per-subject and a global rate limit (:mod:`ferryman.incidents.limits`) before they touch the CMDB, repeats of one
alert count on its open incident, and captures of one incident run one at a time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from ferryman.cmdb.impact import tenant_view
from ferryman.cmdb.impact_sql import SqlImpact
from ferryman.cmdb.incidents import EvidenceRecord, IncidentAction, IncidentRecord, ManifestRecord
from ferryman.controller.evidence import EvidenceStore, Verified
from ferryman.controller.fleet import Fleet
from ferryman.controller.offload import blocking
from ferryman.core import errors
from ferryman.core.models import VM, Host, Severity, VMState
from ferryman.incidents.alerts import Alert, IncidentSeverity, parse
from ferryman.incidents.limits import AlertGate, Dedup
from ferryman.wire import forensics as wf

log = structlog.get_logger(__name__)

SEVERITIES = tuple(s.value for s in IncidentSeverity)
_EVENT_SEVERITY = {"low": Severity.INFO, "medium": Severity.WARNING, "high": Severity.ALARM, "critical": Severity.ALARM}


@dataclass(frozen=True)
class Subject:
    vm: VM | None
    host: str | None


class IncidentService:
    def __init__(self, fleet: Fleet, store: EvidenceStore, gate: AlertGate, impact: SqlImpact) -> None:
        self.fleet = fleet
        self.repo = fleet.repo
        self.store = store
        self.gate = gate
        self.impact_queries = impact
        self._limited_noted = Dedup(60.0)
        self._capturing: dict[int, asyncio.Lock] = {}
        self.on_opened: Callable[[int], None] | None = None  # a new incident's playbook starts (any thread)

    # -- the timeline ------------------------------------------------------------------------------------------------

    def note(self, incident: IncidentRecord, principal: str, kind: str, message: str, **data: Any) -> None:
        """One timeline entry, and the same in the audit log (with the incident's id)."""
        data = {("on_" + k if k in ("vm", "host", "severity") else k): v for k, v in data.items()}
        at = self.fleet.clock.now()
        self.repo.add_incident_action(IncidentAction(incident.id, at, principal, kind, message, data))
        self.fleet.audit(
            f"incident.{kind}",
            f"incident {incident.id}: {message}",
            principal,
            vm=incident.vm_id,
            host=incident.host,
            severity=_EVENT_SEVERITY.get(incident.severity, Severity.INFO) if kind == "opened" else Severity.INFO,
            incident=incident.id,
            **data,
        )

    # -- opening and closing -----------------------------------------------------------------------------------------

    def _subject(self, vm: str | None, host: str | None) -> Subject:
        if vm is None and host is None:
            raise errors.InvalidInput("an incident needs a VM (--vm) or a host (--host)")
        found = None
        if vm is not None:
            found = self.repo.get_vm(vm)
            if found.state is VMState.DELETED:
                raise errors.NotFound(f"VM {vm!r} not found (deleted)")
        if host is not None:
            self.repo.get_host(host)
        return Subject(found, host)

    def open(
        self,
        *,
        vm: str | None,
        host: str | None,
        severity: str,
        summary: str,
        principal: str,
        source: str = "manual",
        dedup_key: str | None = None,
        data: dict[str, Any] | None = None,
        playbook: bool = True,
    ) -> tuple[IncidentRecord, bool]:
        if severity not in SEVERITIES:
            raise errors.InvalidInput(f"bad severity {severity!r}: use {', '.join(SEVERITIES)}")
        summary = summary.strip()
        if not summary or len(summary) > 2000:
            raise errors.InvalidInput("a summary is 1-2000 characters")
        subject = self._subject(vm, host)
        now = self.fleet.clock.now()
        record, new = self.repo.open_incident(
            IncidentRecord(
                id=0,
                severity=severity,
                summary=summary,
                vm_id=subject.vm.id if subject.vm else None,
                host=subject.host,
                tenant=subject.vm.tenant if subject.vm else None,
                source=source,
                state="open",
                opened_at=now,
                opened_by=principal,
                dedup_key=dedup_key,
                alerts=1 if source != "manual" else 0,
                last_alert_at=now if source != "manual" else None,
            )
        )
        what = subject.vm.name if subject.vm else f"host {subject.host}"
        if new:
            self.note(record, principal, "opened", f"{severity} on {what}: {summary}", source=source, **(data or {}))
            if playbook and self.on_opened is not None:
                self.on_opened(record.id)
        else:
            self.note(record, principal, "alert", f"again: {summary} ({record.alerts} alerts)", **(data or {}))
        return record, new

    def close(self, incident_id: int, resolution: str, principal: str) -> IncidentRecord:
        if not resolution.strip():
            raise errors.InvalidInput("closing an incident needs a resolution")
        record = self.repo.close_incident(incident_id, self.fleet.clock.now(), principal, resolution.strip())
        self.note(record, principal, "closed", f"closed: {resolution.strip()}")
        return record

    def view(self, incident_id: int) -> dict[str, Any]:
        record = self.repo.get_incident(incident_id)
        return {
            **incident_out(record, self._vm_name(record)),
            "timeline": [
                {"at": a.at.isoformat(), "principal": a.principal, "kind": a.kind, "message": a.message, "data": a.data}
                for a in self.repo.incident_actions(incident_id)
            ],
            "evidence": [evidence_out(e) for e in self.repo.list_evidence(incident_id)],
        }

    def listing(self, *, open_only: bool = False) -> list[dict[str, Any]]:
        return [incident_out(r, self._vm_name(r)) for r in self.repo.list_incidents(open_only=open_only)]

    def _vm_name(self, record: IncidentRecord) -> str | None:
        if record.vm_id is None:
            return None
        try:
            return self.repo.get_vm(record.vm_id).name
        except errors.NotFound:
            return None

    # -- alerts ------------------------------------------------------------------------------------------------------

    def ingest(self, source: str, body: Any, principal: str) -> dict[str, Any]:
        """Map each alert of ``body`` to a VM or host and open or update its incident, within the rate limits."""
        alerts = parse(source, body, received=self.fleet.clock.now())
        opened: list[int] = []
        updated: list[int] = []
        unmatched: list[str] = []
        limited = 0
        for alert in alerts:
            subject, why = self._map(alert)
            if subject is None:
                unmatched.append(f"{alert.rule}: {why}")
                continue
            key = subject.vm.id if subject.vm else f"host:{subject.host}"
            verdict = self.gate.admit(key)
            if not verdict.allowed:
                limited += 1
                if not self._limited_noted.seen(key, self.fleet.clock.now()):
                    self.fleet.audit(
                        "alert.rate_limited",
                        f"alerts about {subject.vm.name if subject.vm else subject.host} dropped: {verdict.reason}",
                        principal,
                        vm=subject.vm.id if subject.vm else None,
                        host=subject.host,
                        severity=Severity.WARNING,
                        source=source,
                    )
                continue
            record, new = self.open(
                vm=subject.vm.id if subject.vm else None,
                host=subject.host,
                severity=alert.severity.value,
                summary=alert.summary,
                principal=principal,
                source=source,
                dedup_key=alert.dedup_key,
                data={"rule": alert.rule, "ips": list(alert.ips), "alert_time": alert.time.isoformat()},
            )
            (opened if new else updated).append(record.id)
        if unmatched:
            self.fleet.audit(
                "alert.unmatched",
                f"{len(unmatched)} {source} alert(s) name no VM or host Ferryman knows: {unmatched[0]}",
                principal,
                severity=Severity.WARNING,
                alerts=unmatched[:20],
            )
        return {
            "received": len(alerts),
            "opened": opened,
            "updated": sorted(set(updated)),
            "unmatched": len(unmatched),
            "rate_limited": limited,
        }

    def _map(self, alert: Alert) -> tuple[Subject | None, str]:
        """The VM (by name or id, MAC, or address of a live NIC) or the host an alert is about."""
        unmapped = "no VM, address or host of the fleet in it"
        if alert.vm is not None:
            try:
                vm: VM | None = self.repo.get_vm(alert.vm)
            except errors.NotFound:
                return None, f"no VM {alert.vm!r}"
            except errors.InvalidInput:  # a name several tenants use: never guess which; its addresses may tell
                vm, unmapped = None, f"VM name {alert.vm!r} is used in several tenants"
            if vm is not None and vm.state is not VMState.DELETED:
                return Subject(vm, None), ""
        nics = self.repo.all_live_nics() if alert.ips or alert.macs else []
        for mac in alert.macs:
            for nic in nics:
                if nic.mac == mac.lower():
                    return Subject(self.repo.get_vm(nic.vm_id), None), ""
        for ip in alert.ips:
            owners = {nic.vm_id for nic in nics if ip in (nic.ipv4, nic.ipv6)}
            if len(owners) == 1:
                return Subject(self.repo.get_vm(owners.pop()), None), ""
            if len(owners) > 1:  # the same address in two tenants' networks: never guess which
                return None, f"address {ip} is used in {len(owners)} networks"
        if alert.host is not None:
            try:
                self.repo.get_host(alert.host)
            except errors.NotFound:
                return None, f"no host {alert.host!r}"
            return Subject(None, alert.host), ""
        return None, unmapped

    # -- forensic capture --------------------------------------------------------------------------------------------

    async def capture(
        self, incident_id: int, principal: str, *, memory: bool = True, disks: bool = True
    ) -> dict[str, Any]:
        """Capture the incident VM's memory and disks on its host, sealed; move them to the evidence store, have the
        host scrub its copy, and sign the capture's manifest. One capture of an incident at a time."""
        if not (memory or disks):
            raise errors.InvalidInput("capture memory, disks or both")
        lock = self._capturing.setdefault(incident_id, asyncio.Lock())
        if lock.locked():
            raise errors.Conflict(f"a capture of incident {incident_id} is running already")
        async with lock:
            record, vm, host = await blocking(self._capture_target, incident_id)
            capture_id = f"c{uuid.uuid4().hex[:16]}"
            artefacts = (["memory"] if memory else []) + ([f"disk{i}" for i in range(1)] if disks else [])
            keys = {name: self.store.new_key() for name in artefacts}
            await blocking(
                self.note,
                record,
                principal,
                "capture",
                f"capture {capture_id} of {vm.name} on {host.name}: " + ", ".join(artefacts),
                capture=capture_id,
                host=host.name,
            )
            disk_key = await blocking(self.fleet.disk_key, vm, host.name)
            started = self.fleet.clock.now()
            request = wf.Capture(capture=capture_id, artefacts=artefacts, keys=keys, disk_key=disk_key)
            try:
                captured = await self.fleet.agents.call(host, vm.id, request, limit_s=3600)
                for item in captured.artefacts:
                    await self._fetch(host, capture_id, item)
            except errors.FerrymanError as err:
                await blocking(self.note, record, principal, "capture_failed", f"capture {capture_id}: {err}")
                await self._discard(host, capture_id, record, principal)
                raise
            receipts = await self._discard(host, capture_id, record, principal)
            body = {
                "incident": record.id,
                "capture": capture_id,
                "vm": {"id": vm.id, "name": vm.name, "tenant": vm.tenant, "generation": captured.generation},
                "host": host.name,
                "collector": principal,
                "requested_at": started.isoformat(),
                "artefacts": [item.model_dump() for item in captured.artefacts],
            }
            text, signature = self.store.sign(body)
            rows = [
                EvidenceRecord(
                    incident_id=record.id,
                    capture=capture_id,
                    artefact=item.artefact,
                    vm_id=vm.id,
                    generation=captured.generation,
                    host=host.name,
                    started_at=dt.datetime.fromisoformat(item.started_at),
                    finished_at=dt.datetime.fromisoformat(item.finished_at),
                    plaintext_sha256=item.plaintext_sha256,
                    plaintext_bytes=item.plaintext_bytes,
                    sealed_sha256=item.sealed_sha256,
                    sealed_bytes=item.sealed_bytes,
                    wrapped_key=self.store.wrap(capture_id, item.artefact, keys[item.artefact]),
                    collector=principal,
                )
                for item in captured.artefacts
            ]
            manifest = ManifestRecord(capture_id, record.id, self.fleet.clock.now(), text, signature)
            await blocking(self.repo.add_evidence, rows, manifest)
            await blocking(
                self.note,
                record,
                principal,
                "evidence",
                f"capture {capture_id}: "
                + ", ".join(f"{r.artefact} {r.plaintext_bytes >> 20} MiB {r.plaintext_sha256[:19]}" for r in rows)
                + f"; host copy scrubbed ({len(receipts)} receipts); manifest signed",
                capture=capture_id,
                custody="collected",
            )
            return {"capture": capture_id, "manifest": body, "signature": signature, "receipts": receipts}

    def _capture_target(self, incident_id: int) -> tuple[IncidentRecord, VM, Host]:
        record = self.repo.get_incident(incident_id)
        if record.vm_id is None:
            raise errors.Conflict(f"incident {incident_id} is about host {record.host}: capture its VMs' incidents")
        vm = self.repo.get_vm(record.vm_id)
        placement = self.repo.current_placement(vm.id)
        if vm.state is VMState.DELETED or placement is None:
            raise errors.Conflict(f"{vm.name} no longer runs anywhere: nothing to capture")
        if any(m.vm_id == vm.id for m in self.repo.list_migrations(active_only=True)):
            raise errors.Conflict(f"{vm.name} is being migrated; capture it when the migration has ended")
        return record, vm, self.repo.get_host(placement.host)

    async def _fetch(self, host: Host, capture_id: str, item: wf.CapturedArtefact) -> None:
        path = wf.FETCH_PATH.format(capture=capture_id, artefact=item.artefact)

        def receive(chunks: Iterator[bytes]) -> int:  # in the fetch's worker thread
            return self.store.receive(capture_id, item.artefact, chunks, item.sealed_sha256)

        began = time.monotonic()
        size = await self.fleet.agents.fetch(host, path, receive)
        took = time.monotonic() - began
        log.info(
            "evidence fetched",
            capture=capture_id,
            artefact=item.artefact,
            host=host.name,
            bytes=size,
            seconds=round(took, 3),
            mib_s=round(size / (1 << 20) / max(took, 1e-6), 1),
        )

    async def _discard(self, host: Host, capture_id: str, record: IncidentRecord, principal: str) -> list[str]:
        began = time.monotonic()
        try:
            done = await self.fleet.agents.call(host, capture_id, wf.DiscardCapture())
            log.info("capture scrubbed on its host", capture=capture_id, seconds=round(time.monotonic() - began, 3))
        except errors.FerrymanError as err:
            await blocking(
                self.note,
                record,
                principal,
                "capture_residue",
                f"{host.name} could not scrub capture {capture_id}: {err}",
            )
            return []
        return [f"{r.path} {r.bytes}B {r.mode}" for r in done.receipts]

    # -- evidence ----------------------------------------------------------------------------------------------------

    def evidence(self, incident_id: int, principal: str, *, verify: bool = False) -> dict[str, Any]:
        """The incident's evidence and manifests; ``verify``: re-hash, unseal and check every signature (each read
        is a custody event)."""
        record = self.repo.get_incident(incident_id)
        rows = self.repo.list_evidence(incident_id)
        manifests = self.repo.list_manifests(incident_id)
        out: dict[str, Any] = {
            "incident": incident_id,
            "evidence": [evidence_out(e) for e in rows],
            "manifests": [{"capture": m.capture, "body": m.body, "signature": m.signature} for m in manifests],
            # what checks a manifest's signature without Ferryman: the controller CA's certificate
            "signer": {**self.store.signer, "certificate_pem": self.store.signer_pem},
        }
        if not verify:
            return out
        results: list[dict[str, Any]] = []
        by_capture = {m.capture: m for m in manifests}
        for row in rows:
            manifest = by_capture.get(row.capture)
            listed = _listed(manifest.body, row.artefact) if manifest else None
            if manifest is None or listed is None or not self.store.signature_ok(manifest.body, manifest.signature):
                checked = Verified(row.artefact, False, "manifest missing or its signature does not verify")
            else:
                key = self.store.unwrap(row.capture, row.artefact, row.wrapped_key)
                checked = self.store.verify(row.capture, row.artefact, key, listed)
            results.append(
                {"capture": row.capture, "artefact": row.artefact, "ok": checked.ok, "detail": checked.detail}
            )
        ok = all(r["ok"] for r in results)
        self.note(
            record,
            principal,
            "custody",
            f"evidence verified: {'all intact' if ok else 'FAILED'} ({len(results)} artefacts)",
            verified=ok,
        )
        out["verification"] = {"ok": ok, "artefacts": results}
        return out

    def read(self, incident_id: int, capture: str, artefact: str, principal: str) -> Iterable[bytes]:
        """The plaintext of one artefact, for an export (a custody event before the first byte leaves)."""
        record = self.repo.get_incident(incident_id)
        row = next(
            (e for e in self.repo.list_evidence(incident_id) if (e.capture, e.artefact) == (capture, artefact)), None
        )
        if row is None:
            raise errors.NotFound(f"incident {incident_id} has no evidence {capture}/{artefact}")
        self.note(
            record,
            principal,
            "custody",
            f"{capture}/{artefact} exported (plaintext)",
            capture=capture,
            artefact=artefact,
        )
        key = self.store.unwrap(capture, artefact, row.wrapped_key)
        return self.store.plaintext(capture, artefact, key)

    # -- impact ------------------------------------------------------------------------------------------------------

    def impact(
        self, incident_id: int, since: dt.datetime | None, principal: str, *, tenant: str | None = None
    ) -> dict[str, Any]:
        record = self.repo.get_incident(incident_id)
        start = since or record.opened_at - dt.timedelta(days=7)
        if record.vm_id is not None:
            report = self.impact_queries.vm_report(record.vm_id, start)
        else:
            assert record.host is not None  # the CMDB guarantees a subject
            report = self.impact_queries.host_report(record.host, start)
        self.note(
            record, principal, "impact", f"impact since {start:%Y-%m-%d %H:%M}Z" + (f" for {tenant}" if tenant else "")
        )
        return tenant_view(report, tenant) if tenant is not None else report.to_dict()


def _listed(body: str, artefact: str) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return next((a for a in parsed.get("artefacts", []) if a.get("artefact") == artefact), None)


def incident_out(record: IncidentRecord, vm_name: str | None) -> dict[str, Any]:
    return {
        "id": record.id,
        "severity": record.severity,
        "summary": record.summary,
        "vm": vm_name,
        "vm_id": record.vm_id,
        "host": record.host,
        "tenant": record.tenant,
        "source": record.source,
        "state": record.state,
        "opened_at": record.opened_at.isoformat(),
        "opened_by": record.opened_by,
        "alerts": record.alerts,
        "last_alert_at": record.last_alert_at.isoformat() if record.last_alert_at else None,
        "closed_at": record.closed_at.isoformat() if record.closed_at else None,
        "closed_by": record.closed_by,
        "resolution": record.resolution,
    }


def evidence_out(e: EvidenceRecord) -> dict[str, Any]:
    return {
        "capture": e.capture,
        "artefact": e.artefact,
        "vm_id": e.vm_id,
        "generation": e.generation,
        "host": e.host,
        "started_at": e.started_at.isoformat(),
        "finished_at": e.finished_at.isoformat(),
        "plaintext_sha256": e.plaintext_sha256,
        "plaintext_bytes": e.plaintext_bytes,
        "sealed_sha256": e.sealed_sha256,
        "sealed_bytes": e.sealed_bytes,
        "collector": e.collector,
    }
