"""REST routes of placement policies, compliance and the per-tenant report (``/api/v1/policies``, ``/api/v1/place``,
``/api/v1/compliance``), and host attribute changes, which compliance re-checks.

Routes that read the CMDB, parse or compile policies, audit or plan are plain functions, which FastAPI runs in its
thread pool: the event loop that drives migrations never waits for them. The compliance service is safe to use from
those threads (:mod:`ferryman.controller.compliance`). Routes that wait for migrations stay coroutines and hand
their blocking steps to the thread pool.
"""

import dataclasses
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ferryman.controller.compliance import Compliance, Preview
from ferryman.controller.fleet import Fleet
from ferryman.controller.migrations import MigrationService
from ferryman.controller.reports import tenant_report
from ferryman.controller.rollback import awaiting_remediation
from ferryman.core import errors
from ferryman.core.clock import parse_time
from ferryman.core.models import Event
from ferryman.core.units import parse_mib
from ferryman.policy.schema import PolicyErrors


class PolicyFilesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    documents: dict[str, str] = Field(description="file name -> YAML text")
    dry_run: bool = False


class PlaceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str
    profile: dict[str, str] = Field(default_factory=dict)
    memory: str = "256M"
    name: str = "(new)"  # policies may select VMs by name


class HostPatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    zone: str | None = None
    subnet: str | None = None
    virt_type: str | None = None
    hypervisor: str | None = None
    hypervisor_version: str | None = None
    patch_level: int | None = Field(default=None, ge=0)
    role: str | None = None
    memory_mb: int | None = Field(default=None, ge=64)


def _vm_names(fleet: Fleet) -> dict[str, str]:
    return {vm.id: vm.name for vm in fleet.repo.list_vms(include_deleted=True)}


def _errors(err: PolicyErrors) -> list[dict[str, Any]]:
    return [e.as_dict() for e in err.errors]


def _finding(f: Any) -> dict[str, Any]:
    return {"vm_id": f.vm_id, "policy": f.policy, "rule": f.rule, "host": f.host, "message": f.message}


def _preview_out(preview: Preview, names: dict[str, str]) -> dict[str, Any]:
    return {
        "would_violate": [{**_finding(f), "vm": names.get(f.vm_id)} for f in preview.would_violate],
        "would_resolve": [{**_finding(f), "vm": names.get(f.vm_id)} for f in preview.would_resolve],
    }


def policy_routes(app: FastAPI, fleet: Fleet, compliance: Compliance, svc: MigrationService, Person: Any) -> None:
    def vm_names() -> dict[str, str]:
        return _vm_names(fleet)

    @app.post("/api/v1/policies/validate")
    def validate(body: PolicyFilesIn, _: Person) -> dict[str, Any]:
        try:
            policy_set = compliance.validate(body.documents)
        except PolicyErrors as err:
            return {"ok": False, "errors": _errors(err), "policies": []}
        return {"ok": True, "errors": [], "policies": list(policy_set.names)}

    @app.post("/api/v1/policies/preview")
    def preview(body: PolicyFilesIn, who: Person) -> dict[str, Any]:
        """What applying would open and resolve, without applying: a read (policy:read), whatever ``dry_run`` says."""
        return apply(body.model_copy(update={"dry_run": True}), who)

    @app.post("/api/v1/policies/apply")
    def apply(body: PolicyFilesIn, who: Person) -> dict[str, Any]:
        # parsed and compiled once: the same candidate is checked, previewed and put in force
        try:
            candidate = compliance.prepare(body.documents)
        except PolicyErrors as err:
            return {"applied": False, "version": None, "errors": _errors(err)}
        out: dict[str, Any] = {
            "applied": False,
            "version": None,
            "errors": [],
            "policies": list(candidate.policies.names),
            **_preview_out(compliance.preview(candidate), vm_names()),
        }
        if body.dry_run:
            return out
        version = compliance.install(candidate, who.name)
        return {**out, "applied": True, "version": version.version}

    @app.post("/api/v1/policies/clear")
    def clear(who: Person) -> dict[str, Any]:
        return {"version": compliance.clear(who.name).version}

    @app.get("/api/v1/policies")
    async def list_policies(_: Person) -> list[dict[str, Any]]:
        version, policies = compliance.in_force()
        if policies is None or version is None:
            return []
        return [
            {
                "name": p.name,
                "description": p.description or "",
                "file": policies.source(p.name).file,
                "version": version.version,
                "applied_at": version.applied_at,
                "applied_by": version.principal,
            }
            for p in policies
        ]

    @app.get("/api/v1/policies/versions")
    def policy_versions(_: Person) -> list[dict[str, Any]]:
        return [
            {"version": v.version, "applied_at": v.applied_at, "applied_by": v.principal, "files": sorted(v.documents)}
            for v in fleet.repo.list_policy_versions()
        ]

    @app.get("/api/v1/policies/{name}")
    async def show_policy(name: str, _: Person) -> dict[str, Any]:
        version, policies = compliance.in_force()
        if policies is None or name not in policies:
            raise errors.NotFound(f"policy {name!r} is not in force")
        policy = policies[name]
        source = policies.source(name)
        return {
            "name": name,
            "file": source.file,
            "version": version.version if version else None,
            "document": policy.model_dump(mode="json", exclude_none=True),
        }

    @app.post("/api/v1/place")
    def place(body: PlaceIn, _: Person) -> dict[str, Any]:
        decision = compliance.place(body.tenant, body.profile, parse_mib(body.memory), body.name)
        rejections = {host: [dataclasses.asdict(r) for r in reasons] for host, reasons in decision.rejections.items()}
        return {"host": decision.host, "score": decision.score, "ranked": decision.ranked, "rejections": rejections}

    compliance_routes(app, fleet, compliance, svc, Person)


def compliance_routes(app: FastAPI, fleet: Fleet, compliance: Compliance, svc: MigrationService, Person: Any) -> None:
    def vm_names() -> dict[str, str]:
        return _vm_names(fleet)

    @app.get("/api/v1/compliance/violations")
    def violations(_: Person, all: bool = False) -> list[dict[str, Any]]:
        names = vm_names()
        found = [
            {**dataclasses.asdict(v), "vm": names.get(v.vm_id)} for v in fleet.repo.list_violations(open_only=not all)
        ]
        return found + [remediation_out(vm_id, mark, names) for vm_id, mark in awaiting_remediation(fleet).items()]

    @app.post("/api/v1/compliance/check")
    def check(_: Person) -> dict[str, Any]:
        opened, resolved = compliance.audit_all()
        return {"opened": len(opened), "resolved": len(resolved), "open": len(fleet.repo.list_violations())}

    def planned_now() -> dict[str, Any]:
        return _plan_out(compliance, vm_names())

    def audit_and_count() -> int:
        compliance.audit_all()
        return len(fleet.repo.list_violations())

    @app.get("/api/v1/compliance/plan")
    def plan(_: Person) -> dict[str, Any]:
        return planned_now()

    @app.post("/api/v1/compliance/plan/execute")
    async def execute(who: Person) -> dict[str, Any]:
        planned = await run_in_threadpool(planned_now)
        started = []
        for move in planned["moves"]:
            try:
                record = await svc.request(
                    move["vm"],
                    move["target"],
                    shared_storage=False,
                    principal=who.name,
                    role=who.role,
                    automatic=True,
                )
            except errors.FerrymanError as err:
                started.append({**move, "migration": None, "error": str(err)})
                continue
            started.append({**move, "migration": record.id, "error": None})
            await svc.wait_finished(record.id)
        remaining = await run_in_threadpool(audit_and_count)
        return {**planned, "executed": started, "remaining": remaining}

    @app.get("/api/v1/compliance/report", response_model=None)
    def report(_: Person, tenant: str, since: str = "-30d", until: str = "now", format: str = "json") -> Any:
        start, end = parse_time(since, fleet.clock), parse_time(until, fleet.clock)
        built = tenant_report(fleet, tenant, start, end)
        if format == "html":
            return HTMLResponse(built.render_html())
        if format != "json":
            raise errors.InvalidInput("format must be json or html")
        return built.to_dict()

    @app.patch("/api/v1/hosts/{name}")
    def update_host(name: str, body: HostPatchIn, who: Person) -> dict[str, Any]:
        changes = body.model_dump(exclude_none=True)
        if not changes:
            raise errors.InvalidInput("nothing to change")
        host = fleet.update_host(name, who.name, **changes)
        return dataclasses.asdict(host)


def remediation_out(vm_id: str, mark: Event, names: dict[str, str]) -> dict[str, Any]:
    """A VM restored below its security baseline, as a violation (open until it is marked remediated)."""
    return {
        "id": None,
        "vm_id": vm_id,
        "vm": names.get(vm_id),
        "policy": "rollback-guard",
        "rule": "remediation_needed",
        "host": None,
        "message": mark.message,
        "first_seen": mark.time,
        "last_seen": mark.time,
        "resolved_at": None,
    }


def _plan_out(compliance: Compliance, names: dict[str, str]) -> dict[str, Any]:
    plan = compliance.plan()
    return {
        "moves": [
            {
                "vm": m.vm_name,
                "vm_id": m.vm_id,
                "source": m.source,
                "target": m.target,
                "fixes": [list(k) for k in m.fixes],
            }
            for m in plan.moves
        ],
        "unresolved": [{**_finding(v), "vm": names.get(v.vm_id), "why": why} for v, why in plan.unresolved],
    }
