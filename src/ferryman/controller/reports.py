"""The per-tenant co-location report, fed from the CMDB's temporal placements and event log.

:mod:`ferryman.policy.report` builds it and guarantees the privacy rules (neighbours only under pseudonyms, no other
tenant's names or ids, no free-text messages); this module only gathers the facts: the tenant's VMs and their host
chains, every VM that ran on those hosts during the period, the hosts' sites, and warning-or-worse events.
"""

from __future__ import annotations

import datetime as dt

from ferryman.controller.fleet import Fleet
from ferryman.core import errors
from ferryman.core.models import Event, Severity
from ferryman.policy.facts import profile_security_level
from ferryman.policy.report import (
    ReportHost,
    ReportIncident,
    ReportPlacement,
    ReportVM,
    TenantReport,
    build_tenant_report,
)

MAX_INCIDENTS = 5000


def _overlaps(valid_from: dt.datetime, valid_to: dt.datetime | None, start: dt.datetime, end: dt.datetime) -> bool:
    return valid_from < end and (valid_to is None or valid_to > start)


def tenant_report(fleet: Fleet, tenant: str, start: dt.datetime, end: dt.datetime) -> TenantReport:
    repo = fleet.repo
    every_vm = {vm.id: vm for vm in repo.list_vms(include_deleted=True)}
    own = [vm for vm in every_vm.values() if vm.tenant == tenant]
    if not own:
        raise errors.NotFound(f"tenant {tenant!r} has no VMs")
    placements: dict[tuple[str, str, dt.datetime], ReportPlacement] = {}
    used_hosts: set[str] = set()
    for vm in own:
        for p in repo.host_chain(vm.id):
            if _overlaps(p.valid_from, p.valid_to, start, end):
                placements[(p.vm_id, p.host, p.valid_from)] = ReportPlacement(p.vm_id, p.host, p.valid_from, p.valid_to)
                used_hosts.add(p.host)
    for host in sorted(used_hosts):
        for p in repo.vms_ever_on_host(host):
            if p.vm_id in every_vm and _overlaps(p.valid_from, p.valid_to, start, end):
                placements[(p.vm_id, p.host, p.valid_from)] = ReportPlacement(p.vm_id, p.host, p.valid_from, p.valid_to)
    seen = {p.vm_id for p in placements.values()} | {vm.id for vm in own}
    vms = [
        ReportVM(vm.id, vm.name, vm.tenant, dict(vm.profile), profile_security_level(vm.profile))
        for vm in (every_vm[i] for i in sorted(seen))
    ]
    levels = {site.name: site.security_level for site in repo.list_sites()}
    hosts = [ReportHost(h.name, h.site, levels.get(h.site, 0)) for h in repo.list_hosts() if h.name in used_hosts]
    # the events about the hosts the tenant used and the VMs it met there, read per host and for those VMs: a flood
    # of events elsewhere in the fleet (denied requests, say) never pushes them out of the report
    found: dict[int | None, Event] = {}
    for query in [{"host": h} for h in sorted(used_hosts)] + [{"vm_ids": sorted(seen)}]:
        for e in repo.list_events(since=start, until=end, min_severity=Severity.WARNING, limit=MAX_INCIDENTS, **query):
            found[e.id] = e
    incidents = [ReportIncident(e.time, e.kind, e.severity.value, e.vm, e.host) for _, e in sorted(found.items())]
    ordered = sorted(
        placements.values(), key=lambda p: (p.valid_from, p.host, every_vm[p.vm_id].created_at or p.valid_from)
    )
    return build_tenant_report(
        tenant, start, end, vms=vms, placements=ordered, hosts=hosts, incidents=incidents, now=fleet.clock.now()
    )
