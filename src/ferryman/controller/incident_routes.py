"""REST routes of incident response: incidents (``/api/v1/incidents``), alerts in (``/api/v1/alerts/{source}``),
forensic capture, evidence with its verification and export, and impact analysis.

Alerts come as the tools write them (Suricata EVE JSON, Falco JSON) or in a small generic form; a body of alerts is
judged alert by alert, within the rate limits, and the answer counts what was opened, updated, left unmatched or
dropped by a limit. Who may do what is in
:data:`ferryman.controller.access.RULES`; an export of evidence (two-person rule) streams its plaintext,
authenticated chunk by chunk, after a custody entry.
"""

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from ferryman.controller.incidents import IncidentService
from ferryman.controller.offload import blocking
from ferryman.controller.playbooks import HostCompromise, PlaybookRunner, quarantine_capacity
from ferryman.core import errors
from ferryman.core.clock import parse_time

MAX_ALERT_BODY = 4 << 20


class IncidentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vm: str | None = None
    host: str | None = None
    severity: str = "medium"
    summary: str
    playbook: bool = True  # run the playbook of its severity (false: only record it)


class CloseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resolution: str


class CaptureIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    memory: bool = True
    disks: bool = True


class PlaybookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    filename: str = "playbook.yaml"


class CompromiseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: str


def playbook_routes(app: FastAPI, runner: PlaybookRunner, Person: Any) -> None:
    compromise = HostCompromise(runner)

    @app.get("/api/v1/playbook")
    def show_playbook(_: Person) -> dict[str, Any]:
        current = runner.repo.current_playbook()
        playbook = runner.playbook()
        return {
            "version": current.version if current else None,
            "digest": playbook.digest,
            "name": playbook.name,
            "document": playbook.to_document(),
            "default": current is None,
        }

    @app.put("/api/v1/playbook")
    def apply_playbook(body: PlaybookIn, who: Person) -> dict[str, Any]:
        return runner.apply(body.text, body.filename, who.name)

    @app.get("/api/v1/incidents/{incident_id}/playbook")
    def playbook_run(incident_id: int, _: Person) -> dict[str, Any]:
        runner.repo.get_incident(incident_id)
        run = runner.repo.get_playbook_run(incident_id)
        if run is None:
            return {"incident": incident_id, "state": None}
        return {
            "incident": incident_id,
            "state": run.state,
            "steps": run.steps,
            "next_step": run.next_step,
            "attempts": run.attempts,
            "error": run.error,
        }

    @app.get("/api/v1/capacity/quarantine")
    def capacity(_: Person) -> dict[str, Any]:
        playbook = runner.playbook()
        return quarantine_capacity(runner.incidents, playbook.quarantine_role, playbook.reserve).as_dict()

    @app.post("/api/v1/hosts/{name}/compromise", status_code=202)
    async def host_compromise(name: str, body: CompromiseIn, who: Person) -> dict[str, Any]:
        since = parse_time(body.since, runner.fleet.clock)
        return await compromise.start(name, since, who.name)


def incident_routes(app: FastAPI, incidents: IncidentService, Person: Any) -> None:
    @app.post("/api/v1/alerts/{source}", status_code=202)
    async def alerts(source: str, request: Request, who: Person) -> dict[str, Any]:
        body = await request.body()
        if len(body) > MAX_ALERT_BODY:
            raise errors.InvalidInput(f"an alert body is at most {MAX_ALERT_BODY >> 20} MiB")
        try:
            parsed = json.loads(body or b"null")
        except ValueError as err:
            raise errors.InvalidInput(f"the alert body is not JSON: {err}") from None
        return await blocking(incidents.ingest, source, parsed, f"alert:{source}:{who.name}")

    @app.post("/api/v1/incidents", status_code=201)
    def open_incident(body: IncidentIn, who: Person) -> dict[str, Any]:
        record, _ = incidents.open(
            vm=body.vm,
            host=body.host,
            severity=body.severity,
            summary=body.summary,
            principal=who.name,
            playbook=body.playbook,
        )
        return incidents.view(record.id)

    @app.get("/api/v1/incidents")
    def list_incidents(_: Person, open: bool = False) -> list[dict[str, Any]]:
        return incidents.listing(open_only=open)

    @app.get("/api/v1/incidents/{incident_id}")
    def show_incident(incident_id: int, _: Person) -> dict[str, Any]:
        return incidents.view(incident_id)

    @app.post("/api/v1/incidents/{incident_id}/close")
    def close_incident(incident_id: int, body: CloseIn, who: Person) -> dict[str, Any]:
        incidents.close(incident_id, body.resolution, who.name)
        return incidents.view(incident_id)

    @app.post("/api/v1/incidents/{incident_id}/capture")
    async def capture(incident_id: int, body: CaptureIn, who: Person) -> dict[str, Any]:
        return await incidents.capture(incident_id, who.name, memory=body.memory, disks=body.disks)

    @app.get("/api/v1/incidents/{incident_id}/evidence")
    def evidence(incident_id: int, who: Person, verify: bool = False) -> dict[str, Any]:
        return incidents.evidence(incident_id, who.name, verify=verify)

    @app.get("/api/v1/incidents/{incident_id}/evidence/{capture}/{artefact}")
    def export(incident_id: int, capture: str, artefact: str, who: Person) -> StreamingResponse:
        chunks = incidents.read(incident_id, capture, artefact, who.name)
        return StreamingResponse(iter(chunks), media_type="application/octet-stream")

    @app.get("/api/v1/incidents/{incident_id}/impact")
    def impact(incident_id: int, who: Person, since: str | None = None, tenant: str | None = None) -> dict[str, Any]:
        start = parse_time(since, incidents.fleet.clock) if since else None
        return incidents.impact(incident_id, start, who.name, tenant=tenant)
