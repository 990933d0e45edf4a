"""The controller's FastAPI application: routes, authentication and the one place where errors become HTTP codes.

People and tools authenticate with bearer API tokens; agents authenticate with their host certificate (mTLS) and are
identified by that certificate only, never by anything in a request body.

The event loop drives migrations, so it must not wait on the CMDB: a route that only reads or writes the CMDB (or
signs a certificate) is a plain function, which FastAPI runs in its thread pool, and a coroutine route that must
await an agent or a migration hands its CMDB steps to the pool (``run_in_threadpool``). Each CMDB call is its own
transaction on its own pooled connection. Routes that change state only the loop may change (the reconciler's reports
and the tasks it schedules, the migration service) stay on the loop; routes in the pool only read single entries of
the loop's dictionaries (a host's last report, a migration's progress).
"""

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import structlog
from fastapi import Depends, FastAPI, Request
from starlette.concurrency import run_in_threadpool

from ferryman.cmdb.journal import MigrationRecord
from ferryman.cmdb.networks import NicRequest
from ferryman.controller import schemas as s
from ferryman.controller import snapshots, spent
from ferryman.controller.access import APPROVAL_HEADER, RULES, AccessControl, Principal, Rule, not_found
from ferryman.controller.access_routes import access_routes
from ferryman.controller.audit import AuditService
from ferryman.controller.audit_routes import audit_routes
from ferryman.controller.compliance import Compliance
from ferryman.controller.fleet import Fleet, VMRequest
from ferryman.controller.image_routes import image_routes
from ferryman.controller.images import ImageService
from ferryman.controller.incident_routes import incident_routes, playbook_routes
from ferryman.controller.incidents import IncidentService
from ferryman.controller.migrations import MigrationService
from ferryman.controller.network_routes import network_routes
from ferryman.controller.networks import NetworkService
from ferryman.controller.playbooks import PlaybookRunner
from ferryman.controller.policy_routes import policy_routes
from ferryman.controller.rollback import guard, rollback_routes
from ferryman.core import errors
from ferryman.core.clock import parse_time
from ferryman.core.models import Event, Host, Severity, Site, VMAction
from ferryman.core.units import parse_mib, parse_size
from ferryman.httperrors import install_error_handlers
from ferryman.pki.identity import check_peer
from ferryman.security.asgi_tls import peer_certificate
from ferryman.security.authz import Resource
from ferryman.wire.vms import runtime_from_dict

log = structlog.get_logger(__name__)


def _lifespan(
    fleet: Fleet,
    background: Callable[[], Any] | None,
    migrations: MigrationService | None,
    playbooks: PlaybookRunner | None,
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """Background work, recovery of migrations and then of playbook runs at start; their end at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(background()) if background else None
        if migrations is not None:
            await migrations.recover()
        if playbooks is not None:  # after the migrations: a resumed quarantine finds its migration in flight
            await playbooks.recover()
        try:
            yield
        finally:
            if playbooks is not None:
                await playbooks.close()
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if migrations is not None:
                await migrations.close()
            await fleet.agents.aclose()

    return lifespan


def create_app(
    fleet: Fleet,
    *,
    migrations: MigrationService | None = None,
    background: Callable[[], Any] | None = None,
    compliance: Compliance | None = None,
    images: ImageService | None = None,
    networks: NetworkService | None = None,
    incidents: IncidentService | None = None,
    playbooks: PlaybookRunner | None = None,
    audit: AuditService | None = None,
    access: AccessControl | None = None,
) -> FastAPI:
    """Build the API around ``fleet``; ``background`` is an async callable run for the app's lifetime."""

    lifespan = _lifespan(fleet, background, migrations, playbooks)
    app = FastAPI(title="Ferryman controller", version="0.1.0", lifespan=lifespan)

    install_error_handlers(app)
    access = access or AccessControl(fleet.repo, fleet.clock, fleet.audit)

    person = _authenticated(access)

    def agent_host(request: Request) -> Host:
        der = peer_certificate(request.scope)
        if der is None:
            raise errors.Unauthenticated("agent endpoints need a host certificate")
        try:
            identity = check_peer(
                der, expected_role="host", expected_name=None, is_revoked=fleet.is_revoked, clock=fleet.clock
            )
        except errors.Forbidden as err:
            fleet.audit("agent.refused", str(err), "anonymous", severity=Severity.WARNING)
            raise
        return fleet.repo.get_host(identity.common_name)

    Person = Annotated[Principal, Depends(person)]
    AgentHost = Annotated[Host, Depends(agent_host)]

    if migrations is not None:  # before the VM routes: /vms/{name}/migrate must win over /vms/{name}/{action}
        _migrations(app, fleet, migrations, access, Person, playbooks.reserve_without if playbooks else None)
        if compliance is not None:
            policy_routes(app, fleet, compliance, migrations, Person)
    _registry_routes(app, fleet, images, networks, incidents, Person)
    if playbooks is not None:  # before the host routes: /hosts/{name}/compromise
        playbook_routes(app, playbooks, Person)
    _sites_and_hosts(app, fleet, Person)
    rollback_routes(app, fleet, access, Person)  # before the VM routes, as above
    _vms(app, fleet, access, Person)
    _events(app, fleet, access, Person)
    if audit is not None:
        audit_routes(app, audit, Person)
    access_routes(app, access, Person)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/api/v1/enrol", response_model=s.EnrolOut)
    def enrol(body: s.EnrolIn) -> s.EnrolOut:
        cert, pem = fleet.enrol(body.host, body.token, body.csr_pem.encode())
        return s.EnrolOut(certificate_pem=pem.decode(), ca_pem=fleet.ca.cert_pem.decode(), serial=str(cert.serial))

    _agent_reports(app, fleet, AgentHost)

    return app


def _authenticated(access: AccessControl) -> Callable[[Request], AsyncIterator[Principal]]:
    """The dependency every API route takes: the caller, authenticated by its API token and allowed by Cedar to do
    what the route does. A single-use approval the request used is given back if the request fails."""

    async def person(request: Request) -> AsyncIterator[Principal]:
        """The caller, authenticated by its API token and allowed by Cedar to do what this route does."""
        route = request.scope.get("route")
        rule = RULES.get((request.method, getattr(route, "path", "")))
        body: Any = None
        is_json = request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
        if rule is not None and rule.needs_body and is_json:  # a route reads no other body as its model
            with contextlib.suppress(ValueError, RecursionError):  # the route's validation answers bad JSON
                body = json.loads(await request.body() or b"null")
        who, resource = await run_in_threadpool(
            _admit,
            request.headers.get("authorization", ""),
            request.headers.get(APPROVAL_HEADER),
            rule,
            dict(request.path_params),
            dict(request.query_params),
            body,
        )
        where, _, param = (rule.source or "").partition(":") if rule is not None else ("", "", "")
        if resource.kind == "Vm" and resource.key is not None and where == "path":
            # the route acts on the VM that was decided on: a name resolves in the caller's tenant, an id anywhere
            request.scope["path_params"][param] = resource.key
        spent.track(who.spent)
        try:
            yield who
        except BaseException as failure:
            if who.spent:  # what was approved did not take effect (see ferryman.controller.spent)
                await run_in_threadpool(access.return_spent, who, failure)
            raise

    def _admit(
        header: str, approval: str | None, rule: Rule | None, params: dict[str, str], query: dict[str, str], body: Any
    ) -> tuple[Principal, Resource]:
        who = access.authenticate(header, approval)
        if rule is None:  # a route missing from the table is closed, never open by omission
            access.denied(who, f"{who.id} ({who.role}) called a route without an access rule", "none")
            raise errors.Forbidden("this route has no access rule")
        return who, access.admit(who, rule, params, query, body)

    return person


def _registry_routes(
    app: FastAPI,
    fleet: Fleet,
    images: ImageService | None,
    networks: NetworkService | None,
    incidents: IncidentService | None,
    Person: Any,
) -> None:
    if images is not None:
        image_routes(app, images, Person)
    if incidents is not None:
        incident_routes(app, incidents, Person)
    if networks is not None:  # before the VM routes: /vms/{name}/isolate must win over /vms/{name}/{action}
        network_routes(app, fleet, networks, Person)


def _agent_reports(app: FastAPI, fleet: Fleet, AgentHost: Any) -> None:
    """What agents push: inventory (reconciled at once) and QEMU events. The host is the certificate's."""

    @app.post("/agent/v1/report", response_model=s.ReportAck)
    async def report(body: s.ReportIn, host: AgentHost) -> s.ReportAck:
        vms = [runtime_from_dict(r.model_dump()) for r in body.vms]
        fleet.reconciler.accept(host.name, vms, body.network)
        fleet.reconciler.run()
        peers = await run_in_threadpool(fleet.underlay_peers, host) if host.underlay else None
        return s.ReportAck(host=host.name, accepted=len(vms), underlay_peers=peers)

    @app.post("/agent/v1/events", response_model=s.ReportAck)
    def agent_events(body: s.AgentEventsIn, host: AgentHost) -> s.ReportAck:
        for e in body.events:
            fleet.repo.record_event(
                Event(
                    kind=f"qemu.{e.event.lower()}",
                    message=f"QEMU event {e.event} of {e.vm_id} on {host.name}",
                    time=fleet.clock.now(),
                    principal=f"host:{host.name}",
                    vm=e.vm_id,
                    host=host.name,
                    data=e.data,
                )
            )
        return s.ReportAck(host=host.name, accepted=len(body.events))


def _sites_and_hosts(app: FastAPI, fleet: Fleet, Person: Any) -> None:
    @app.post("/api/v1/sites", response_model=s.SiteOut, status_code=201)
    def add_site(body: s.SiteIn, who: Person) -> s.SiteOut:
        return s.SiteOut.of(fleet.add_site(Site(body.name, body.security_level, body.description), who.name))

    @app.get("/api/v1/sites", response_model=list[s.SiteOut])
    def list_sites(_: Person) -> list[s.SiteOut]:
        return [s.SiteOut.of(site) for site in fleet.repo.list_sites()]

    def levels() -> dict[str, int]:
        return {site.name: site.security_level for site in fleet.repo.list_sites()}

    @app.post("/api/v1/hosts", response_model=s.HostCreated, status_code=201)
    def add_host(body: s.HostIn, who: Person) -> s.HostCreated:
        host, token = fleet.add_host(Host(**body.model_dump()), who.name)
        return s.HostCreated(host=s.HostOut.of(host, levels().get(host.site)), enrol_token=token)

    @app.get("/api/v1/hosts", response_model=list[s.HostOut])
    def list_hosts(_: Person) -> list[s.HostOut]:
        lv = levels()
        return [
            s.HostOut.of(
                u.host,
                lv.get(u.host.site),
                vm_count=u.vm_count,
                memory_used_mb=u.memory_used_mb,
                reachable=u.reachable,
                last_report=u.last_report,
            )
            for u in fleet.host_usage()
        ]

    @app.get("/api/v1/hosts/{name}", response_model=s.HostOut)
    def show_host(name: str, _: Person) -> s.HostOut:
        for u in fleet.host_usage():
            if u.host.name == name:
                return s.HostOut.of(
                    u.host,
                    levels().get(u.host.site),
                    vm_count=u.vm_count,
                    memory_used_mb=u.memory_used_mb,
                    reachable=u.reachable,
                    last_report=u.last_report,
                )
        raise errors.NotFound(f"host {name!r} not found")

    @app.post("/api/v1/hosts/{name}/enrol-token")
    def enrol_token(name: str, who: Person) -> dict[str, str]:
        return {"host": name, "enrol_token": fleet.new_enrol_token(name, who.name)}

    @app.post("/api/v1/hosts/{name}/revoke")
    def revoke(name: str, who: Person) -> dict[str, Any]:
        return {"host": name, "revoked": [str(c.serial) for c in fleet.revoke_host(name, who.name)]}

    @app.get("/api/v1/hosts/{name}/neighbours", response_model=list[s.NeighbourOut])
    def host_neighbours(name: str, _: Person, at: str = "now") -> list[s.NeighbourOut]:
        return [s.NeighbourOut.of(n) for n in fleet.neighbours_on_host(name, parse_time(at, fleet.clock))]

    @app.get("/api/v1/hosts/{name}/history", response_model=list[s.PlacementOut])
    def host_history(name: str, _: Person) -> list[s.PlacementOut]:
        fleet.repo.get_host(name)
        return [s.PlacementOut.of(p) for p in fleet.repo.vms_ever_on_host(name)]


def _vms(app: FastAPI, fleet: Fleet, access: AccessControl, Person: Any) -> None:
    @app.post("/api/v1/vms", response_model=s.VMOut, status_code=201)
    async def create_vm(body: s.VMIn, who: Person) -> s.VMOut:
        if who.tenant is not None and body.host is not None:  # choosing a host is choosing one's neighbours
            problem = "a tenant's principal cannot choose the host: placement decides it"
            await run_in_threadpool(access.denied, who, f"{who.id} ({who.role}): {problem}", "vm:create")
            raise errors.Forbidden(problem)
        req = VMRequest(
            name=body.name,
            tenant=body.tenant,
            memory_mb=parse_mib(body.memory),
            vcpus=body.vcpus,
            disk_bytes=parse_size(body.disk),
            profile=body.profile,
            host=body.host,
            dirty_kib_per_s=body.dirty_kib_per_s,
            record_interval_ms=body.record_interval_ms,
            resident_mib=body.resident_mib,
            force=body.force,
            role=who.role,
            encrypted=body.encrypted,
            image=body.image,
            image_copy=body.full_copy,
            networks=tuple(NicRequest(n.network, n.ip) for n in body.networks),
        )
        vm = await fleet.create_vm(req, who.name)
        return s.VMOut.of(vm, await run_in_threadpool(fleet.repo.current_placement, vm.id))

    @app.get("/api/v1/vms", response_model=list[s.VMOut])
    def list_vms(who: Person, tenant: str | None = None, host: str | None = None) -> list[s.VMOut]:
        out = []
        if who.tenant is not None:  # a tenant's principal sees its tenant's VMs only
            if tenant not in (None, who.tenant):
                return []
            tenant = who.tenant
        placed = fleet.repo.open_placements()
        for vm in fleet.repo.list_vms():
            placement = placed.get(vm.id)
            if tenant and vm.tenant != tenant:
                continue
            if host and (placement is None or placement.host != host):
                continue
            out.append(s.VMOut.of(vm, placement))
        return out

    @app.get("/api/v1/vms/{name}", response_model=s.VMDetail)
    def show_vm(name: str, who: Person) -> s.VMDetail:
        vm, placement = fleet.get_vm(name)
        neighbours = fleet.repo.neighbours_of_vm(vm.id, fleet.clock.now()) if placement else []
        if who.tenant is not None:  # other tenants' VMs are not a tenant's to know (the report names no one)
            neighbours = [n for n in neighbours if n.tenant == who.tenant]
        base = s.VMOut.of(vm, placement).model_dump()
        nics = [s.NicOut.of(n) for n in fleet.repo.nics_of(vm.id)]
        return s.VMDetail(**base, canary=vm.canary, neighbours=[s.NeighbourOut.of(n) for n in neighbours], nics=nics)

    @app.get("/api/v1/vms/{name}/history", response_model=list[s.PlacementOut])
    def vm_history(name: str, _: Person) -> list[s.PlacementOut]:
        vm = fleet.repo.get_vm(name)
        return [s.PlacementOut.of(p) for p in fleet.repo.host_chain(vm.id)]

    @app.get("/api/v1/vms/{name}/keys", response_model=list[s.DiskKeyOut])
    def vm_keys(name: str, _: Person) -> list[s.DiskKeyOut]:
        vm = fleet.repo.get_vm(name)
        return [s.DiskKeyOut.of(k) for k in fleet.repo.list_disk_keys(vm.id)]

    @app.post("/api/v1/vms/{name}/{action}", response_model=s.VMOut)
    async def vm_action(name: str, action: str, who: Person) -> s.VMOut:
        allowed = {a.value: a for a in (VMAction.START, VMAction.STOP, VMAction.PAUSE, VMAction.RESUME)}
        if action not in allowed:
            raise errors.NotFound(f"unknown action {action!r} (use {', '.join(allowed)})")
        vm = await fleet.vm_action(name, allowed[action], who.name)
        return s.VMOut.of(vm, await run_in_threadpool(fleet.repo.current_placement, vm.id))

    @app.delete("/api/v1/vms/{name}", response_model=s.VMOut)
    async def delete_vm(name: str, who: Person) -> s.VMOut:
        vm = await fleet.vm_action(name, VMAction.DELETE, who.name)
        return s.VMOut.of(vm, None)


def _events(app: FastAPI, fleet: Fleet, access: AccessControl, Person: Any) -> None:
    @app.get("/api/v1/events", response_model=list[s.EventOut])
    def list_events(
        who: Person,
        since: str | None = None,
        kind: str | None = None,
        vm: str | None = None,
        host: str | None = None,
        severity: str | None = None,
        limit: int = 200,
    ) -> list[s.EventOut]:
        own = None
        if who.tenant is not None:  # a tenant's principal reads its own VMs' events only, without free text
            own = [v.id for v in fleet.repo.list_vms(include_deleted=True) if v.tenant == who.tenant]
        vm_id = None
        if vm:
            try:
                vm_id = fleet.repo.get_vm(vm, tenant=who.tenant).id
            except errors.NotFound:
                if who.tenant is None:
                    raise
                access.denied(who, f"{who.id} ({who.role}) asked for the events of VM {vm!r}", "event:read")
                raise not_found("Vm", vm) from None
        try:
            min_sev = Severity(severity) if severity else None
        except ValueError:
            raise errors.InvalidInput(f"bad severity {severity!r} (use info, warning, alarm)") from None
        events = fleet.repo.list_events(
            since=parse_time(since, fleet.clock) if since else None,
            kind_prefix=kind,
            vm_id=vm_id,
            host=host,
            min_severity=min_sev,
            limit=max(1, min(limit, 5000)),
            vm_ids=own,
        )
        if own is not None:  # nor the entry's number: the gaps between its own would count every tenant's events
            return [
                s.EventOut.of(dataclasses.replace(e, id=None, message=e.kind, principal="", data={})) for e in events
            ]
        return [s.EventOut.of(e) for e in events]

    @app.get("/api/v1/alarms", response_model=list[s.AlarmOut])
    def list_alarms(_: Person, all: bool = False) -> list[s.AlarmOut]:
        return [s.AlarmOut.of(a) for a in fleet.repo.list_alarms(open_only=not all)]


def _migration_out(fleet: Fleet, svc: MigrationService, r: MigrationRecord) -> dict[str, Any]:
    vm = fleet.repo.get_vm(r.vm_id)
    total = (r.finished_at - r.requested_at).total_seconds() if r.finished_at else None
    out = {**dataclasses.asdict(r), "vm": vm.name, "total_s": total, "progress": svc.progress.get(r.id)}
    out["data"] = {k: v for k, v in r.data.items() if k not in {"ticket", "machine"}}
    out["data"]["facts"] = r.data.get("machine", {}).get("facts", {})
    return out


def _migrations(
    app: FastAPI,
    fleet: Fleet,
    svc: MigrationService,
    access: AccessControl,
    Person: Any,
    reserve_check: Callable[[str], str | None] | None,
) -> None:
    @app.post("/api/v1/vms/{name}/migrate", response_model=s.MigrationOut, status_code=202)
    async def migrate(name: str, body: s.MigrateIn, who: Person) -> dict[str, Any]:
        record = await svc.request(
            name,
            body.to,
            shared_storage=body.shared_storage,
            principal=who.name,
            bandwidth_mib_s=body.bandwidth_mib_s,
            force=body.force,
            role=who.role,
        )
        return await run_in_threadpool(_migration_out, fleet, svc, record)

    @app.get("/api/v1/migrations", response_model=list[s.MigrationOut])
    def list_migrations(_: Person, vm: str | None = None, active: bool = False) -> list[dict[str, Any]]:
        vm_id = fleet.repo.get_vm(vm).id if vm else None
        return [_migration_out(fleet, svc, r) for r in fleet.repo.list_migrations(vm_id=vm_id, active_only=active)]

    def find(migration_id: str) -> MigrationRecord:
        if len(migration_id) < 36:  # a prefix, as listings show
            hits = [r for r in fleet.repo.list_migrations(limit=5000) if r.id.startswith(migration_id)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise errors.InvalidInput(f"migration id prefix {migration_id!r} is ambiguous")
        return fleet.repo.get_migration(migration_id)

    @app.get("/api/v1/migrations/{migration_id}", response_model=s.MigrationDetail)
    def show_migration(migration_id: str, _: Person) -> dict[str, Any]:
        r = find(migration_id)
        steps = [dataclasses.asdict(x) for x in fleet.repo.migration_steps(r.id)]
        receipts = [dataclasses.asdict(x) for x in fleet.repo.list_scrub_receipts(r.id)]
        return {**_migration_out(fleet, svc, r), "steps": steps, "scrub_receipts": receipts}

    @app.post("/api/v1/migrations/{migration_id}/cancel", response_model=s.MigrationOut)
    async def cancel(migration_id: str, who: Person) -> dict[str, Any]:
        found = await run_in_threadpool(find, migration_id)
        return await run_in_threadpool(_migration_out, fleet, svc, await svc.cancel(found.id, who.name))

    @app.get("/api/v1/vms/{name}/snapshots")
    async def vm_snapshots(name: str, _: Person) -> list[dict[str, Any]]:
        return await snapshots.list_snapshots(fleet, name)

    @app.post("/api/v1/vms/{name}/restore")
    async def restore_vm(name: str, body: s.RestoreIn, who: Person) -> dict[str, Any]:
        return await snapshots.restore(fleet, name, body.tag, who.name, guard(fleet, access, who))

    @app.post("/api/v1/hosts/{name}/drain")
    async def drain(name: str, who: Person) -> dict[str, Any]:
        warning = await run_in_threadpool(reserve_check, name) if reserve_check is not None else None
        if warning is not None:
            await run_in_threadpool(
                fleet.audit, "host.reserve_broken", warning, who.name, host=name, severity=Severity.WARNING
            )
        started, refused = await svc.drain(name, who.name)
        out = await run_in_threadpool(lambda: [_migration_out(fleet, svc, r) for r in started])
        return {"host": name, "migrations": out, "refused": refused, "warnings": [warning] if warning else []}
