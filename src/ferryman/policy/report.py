"""The per-tenant SLA co-location report: who shared hosts with a tenant's VMs, without saying who they are.

Why it exists: customers of a multi-tenant cloud ask in their SLAs how many neighbours their VMs had over time, every
change of neighbourhood, the neighbours' profiles and security levels, the incidents that involved their neighbours, and
which sites and hosts their VMs used (DESIGN.md: the neighbourhood and physical location degrees of freedom). The
controller reads the temporal placements from the CMDB, passes them here as plain data, and serves the result as JSON
or as a self-contained HTML page.

What it must not do:

* I/O, read the clock, or import the controller, the CMDB or an HTTP library: it is a pure function of its inputs.
* Tell a tenant who its neighbours are. The report never contains another tenant's name, another tenant's VM names or
  VM ids, nor free-text event messages (they may contain names; :class:`ReportIncident` has no message field at all).
  Neighbours appear only as pseudonyms (``neighbour-1``, ``neighbour-2``, ...), numbered in order of first appearance
  in this report, never derived from their ids, so the numbering means nothing outside one report. As defence in
  depth, a neighbour's profile label whose key or value contains another tenant's name, VM name or VM id is withheld
  (counted, not shown), and so is an incident ``kind``/``severity`` that contains one.

What it does show: the tenant's own VM names, the hosts and sites its VMs used (with their security levels), and for
each neighbour its profile labels, its security level and how long it shared hosts with the tenant.

Time: every input time must be timezone-aware; the output is in UTC. The report covers ``[start, end)`` but states
nothing after ``now``: intervals are clipped to ``[start, min(end, now))`` (an open placement runs until then). All
intervals are half-open, so a VM that leaves at ``t`` and one that arrives at ``t`` were never together.

Definitions:

* A *neighbour* of one of the tenant's VMs is a VM of another tenant with a placement on the same host at the same
  time. VMs of the same tenant are not neighbours.
* A *co-location change* is seen from the own VM: a neighbour arriving on its host, or leaving it; when the own VM
  migrates, it departs from the old neighbours and the new ones arrive. Neighbours already present at ``start`` are
  the initial state, and neighbours still present at the end of the observed period do not depart.
* The *average* neighbour count of a VM is weighted by time over the time the VM was placed within the period
  (a VM that ran for one hour of a day with two neighbours averages 2, not 1/12).
* An incident *involves a neighbour* when its ``vm_id`` is a VM of another tenant that shared a host with one of the
  tenant's VMs at the incident time, or else when its ``host`` carried one of the tenant's VMs at that time (then the
  subject is ``"host"``). Incidents of the tenant's own VMs are not part of this report.
"""

from __future__ import annotations

import datetime as dt
import enum
import html
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ferryman.core.errors import InvalidInput

Interval = tuple[dt.datetime, dt.datetime]
Labels = tuple[tuple[str, str], ...]

WITHHELD = "withheld"
_MIN_SUBSTRING = 3
_WORD_SPLIT = re.compile(r"[^0-9a-z]+")
HOST_SUBJECT = "host"

# ---------------------------------------------------------------------------------------------------------------------
# Inputs (the controller fills these from the CMDB)


@dataclass(frozen=True)
class ReportVM:
    """A VM that appears in the placements: the tenant's own, or a VM that shared a host with one of them."""

    id: str
    name: str
    tenant: str
    profile: Mapping[str, str]
    security_level: int


@dataclass(frozen=True)
class ReportPlacement:
    """The temporal fact "VM ran on host from valid_from until valid_to" (valid_to None: still there)."""

    vm_id: str
    host: str
    valid_from: dt.datetime
    valid_to: dt.datetime | None


@dataclass(frozen=True)
class ReportHost:
    """A host the tenant's VMs used, and the security level of its site."""

    name: str
    site: str
    site_security_level: int


@dataclass(frozen=True)
class ReportIncident:
    """A security event or alarm, without its free-text message (which may name VMs or tenants)."""

    time: dt.datetime
    kind: str
    severity: str
    vm_id: str | None
    host: str | None


# ---------------------------------------------------------------------------------------------------------------------
# Output


class ChangeKind(enum.StrEnum):
    ARRIVAL = "arrival"
    DEPARTURE = "departure"


@dataclass(frozen=True)
class HostStay:
    """One uninterrupted stay of an own VM on a host, clipped to the observed period."""

    host: str
    site: str
    site_security_level: int
    since: dt.datetime
    until: dt.datetime
    ongoing: bool  # the stay reaches observed_until (still running then, or left exactly then)


@dataclass(frozen=True)
class CountPoint:
    """A step of the neighbour-count function: ``count`` holds from ``time`` until the next point."""

    time: dt.datetime
    count: int


@dataclass(frozen=True)
class OwnVMReport:
    """One of the tenant's VMs: where it ran and how many neighbours it had."""

    name: str
    stays: tuple[HostStay, ...]
    timeline: tuple[CountPoint, ...]  # starts at the period start; the last count holds until observed_until
    resident_seconds: float
    max_neighbours: int
    average_neighbours: float  # weighted by time over resident_seconds; 0.0 if the VM never ran in the period


@dataclass(frozen=True)
class NeighbourPresence:
    """A neighbour already on an own VM's host at the period start."""

    own_vm: str
    host: str
    neighbour: str
    profile: Labels
    security_level: int


@dataclass(frozen=True)
class ColocationChange:
    """A neighbour arrived on, or departed from, an own VM's host (from the own VM's point of view)."""

    time: dt.datetime
    own_vm: str
    host: str
    change: ChangeKind
    neighbour: str
    profile: Labels
    security_level: int


@dataclass(frozen=True)
class NeighbourProfile:
    """What the tenant may know about one neighbour."""

    pseudonym: str
    profile: Labels
    labels_withheld: int  # labels not shown because they contained another tenant's name, VM name or id
    security_level: int
    min_security_level: int  # lowest level seen; the input carries one level per VM, so it equals security_level
    coresident_seconds: float  # time it shared a host with at least one of the tenant's VMs


@dataclass(frozen=True)
class NeighbourIncident:
    """An incident of a neighbour (``subject`` is its pseudonym) or of a host the tenant's VM was on (``"host"``)."""

    time: dt.datetime
    kind: str
    severity: str
    subject: str
    host: str


@dataclass(frozen=True)
class ReportSummary:
    distinct_neighbours: int
    max_simultaneous_neighbours: int  # distinct neighbours sharing a host with any of the tenant's VMs at one instant
    lowest_neighbour_security_level: int | None
    sites_used: tuple[str, ...]


@dataclass(frozen=True)
class TenantReport:
    """The SLA co-location report of one tenant for one period. Contains no other tenant's names or ids."""

    tenant: str
    start: dt.datetime
    end: dt.datetime
    generated_at: dt.datetime
    observed_until: dt.datetime  # min(end, generated_at): nothing after it is stated
    vms: tuple[OwnVMReport, ...]
    initial_neighbours: tuple[NeighbourPresence, ...]
    changes: tuple[ColocationChange, ...]
    neighbours: tuple[NeighbourProfile, ...]
    incidents: tuple[NeighbourIncident, ...]
    summary: ReportSummary

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: times as ISO-8601 strings, profiles as objects."""
        return {
            "tenant": self.tenant,
            "period": {"start": _iso(self.start), "end": _iso(self.end)},
            "generated_at": _iso(self.generated_at),
            "observed_until": _iso(self.observed_until),
            "vms": [_vm_dict(vm) for vm in self.vms],
            "initial_neighbours": [
                {
                    "own_vm": p.own_vm,
                    "host": p.host,
                    "neighbour": p.neighbour,
                    "profile": dict(p.profile),
                    "security_level": p.security_level,
                }
                for p in self.initial_neighbours
            ],
            "changes": [
                {
                    "time": _iso(c.time),
                    "own_vm": c.own_vm,
                    "host": c.host,
                    "change": c.change.value,
                    "neighbour": c.neighbour,
                    "profile": dict(c.profile),
                    "security_level": c.security_level,
                }
                for c in self.changes
            ],
            "neighbours": {
                n.pseudonym: {
                    "profile": dict(n.profile),
                    "labels_withheld": n.labels_withheld,
                    "security_level": n.security_level,
                    "min_security_level": n.min_security_level,
                    "coresident_seconds": n.coresident_seconds,
                }
                for n in self.neighbours
            },
            "incidents": [
                {"time": _iso(i.time), "kind": i.kind, "severity": i.severity, "subject": i.subject, "host": i.host}
                for i in self.incidents
            ],
            "summary": {
                "distinct_neighbours": self.summary.distinct_neighbours,
                "max_simultaneous_neighbours": self.summary.max_simultaneous_neighbours,
                "lowest_neighbour_security_level": self.summary.lowest_neighbour_security_level,
                "sites_used": list(self.summary.sites_used),
            },
        }

    def render_html(self) -> str:
        """A complete, self-contained HTML page (inline CSS, no scripts, no external resources); every value escaped."""
        return _render_html(self)


def _iso(value: dt.datetime) -> str:
    return value.isoformat()


def _vm_dict(vm: OwnVMReport) -> dict[str, Any]:
    return {
        "name": vm.name,
        "stays": [
            {
                "host": s.host,
                "site": s.site,
                "site_security_level": s.site_security_level,
                "from": _iso(s.since),
                "to": _iso(s.until),
                "ongoing": s.ongoing,
            }
            for s in vm.stays
        ],
        "timeline": [[_iso(p.time), p.count] for p in vm.timeline],
        "resident_seconds": vm.resident_seconds,
        "max_neighbours": vm.max_neighbours,
        "average_neighbours": vm.average_neighbours,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Interval arithmetic (half-open, sorted, merged lists)


def _merge(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, with overlapping and touching intervals joined (touching: one ends where the next starts)."""
    merged: list[Interval] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _intersect(xs: Sequence[Interval], ys: Sequence[Interval]) -> list[Interval]:
    """The intersection of two merged lists (a merged list)."""
    out: list[Interval] = []
    i = j = 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def _seconds(intervals: Iterable[Interval]) -> float:
    return sum((b - a).total_seconds() for a, b in intervals)


def _contains(intervals: Iterable[Interval], t: dt.datetime) -> bool:
    return any(a <= t < b for a, b in intervals)


def _steps(
    intervals_per_item: Iterable[Sequence[Interval]], start: dt.datetime, until: dt.datetime
) -> list[CountPoint]:
    """How many items are present over ``[start, until)``, as change points (each item's list must be merged)."""
    delta: dict[dt.datetime, int] = defaultdict(int)
    for intervals in intervals_per_item:
        for a, b in intervals:
            delta[a] += 1
            delta[b] -= 1
    points = [CountPoint(start, 0)]
    count = 0
    for t in sorted(delta):
        count += delta[t]
        if t <= start:
            points[0] = CountPoint(start, count)
        elif t >= until:  # the clipping edge, not a change
            break
        elif count != points[-1].count:
            points.append(CountPoint(t, count))
    return points


# ---------------------------------------------------------------------------------------------------------------------
# The privacy guard


class _Guard:
    """Withholds strings that contain another tenant's name, VM name or VM id (case-insensitive).

    Names of three characters or more are looked for anywhere (``zqacme`` in ``owner=zqacme-eu``); shorter ones only
    as whole words, or a VM called ``e`` would withhold every label. This errs on the side of withholding: the label
    ``app=webshop`` is withheld when another tenant has a VM called ``web``.
    """

    def __init__(self, tenant: str, vms: Iterable[ReportVM]) -> None:
        tokens: set[str] = set()
        for vm in vms:
            if vm.tenant != tenant:
                tokens.update({vm.tenant.lower(), vm.name.lower(), vm.id.lower()})
        tokens.discard("")
        self._long = {t for t in tokens if len(t) >= _MIN_SUBSTRING}
        self._short = tokens - self._long

    def tainted(self, text: str) -> bool:
        lowered = text.lower()
        if any(token in lowered for token in self._long):
            return True
        return bool(self._short) and not self._short.isdisjoint(_WORD_SPLIT.split(lowered))

    def labels(self, profile: Mapping[str, str]) -> tuple[Labels, int]:
        shown = sorted((k, v) for k, v in profile.items() if not (self.tainted(k) or self.tainted(v)))
        return tuple(shown), len(profile) - len(shown)

    def text(self, text: str) -> str:
        return WITHHELD if self.tainted(text) else text


# ---------------------------------------------------------------------------------------------------------------------
# Building the report


@dataclass(frozen=True)
class _Period:
    start: dt.datetime
    end: dt.datetime
    now: dt.datetime
    horizon: dt.datetime  # min(end, now), never before start


def _utc(value: dt.datetime, what: str) -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{what} must be timezone-aware (UTC), got a naive time")
    return value.astimezone(dt.UTC)


def _period(start: dt.datetime, end: dt.datetime, now: dt.datetime) -> _Period:
    start, end, now = _utc(start, "report start"), _utc(end, "report end"), _utc(now, "report time (now)")
    if end <= start:
        raise InvalidInput(f"report period is empty: end {end.isoformat()} is not after start {start.isoformat()}")
    return _Period(start, end, now, max(start, min(end, now)))


def _placements_by_vm(
    placements: Iterable[ReportPlacement], vm_by_id: Mapping[str, ReportVM], period: _Period
) -> tuple[dict[str, dict[str, list[Interval]]], dict[str, int]]:
    """vm id → host → merged intervals clipped to the observed period; and each VM's first position in the input."""
    raw: dict[str, dict[str, list[Interval]]] = defaultdict(lambda: defaultdict(list))
    first_seen: dict[str, int] = {}
    for position, p in enumerate(placements):
        # Error messages never name the VM: they may reach the tenant, and the VM may be a neighbour.
        if p.vm_id not in vm_by_id:
            raise InvalidInput("a placement refers to a VM that is missing from the report's VM list")
        since = _utc(p.valid_from, "placement valid_from")
        if p.valid_to is None:
            until = period.horizon
        else:
            until = _utc(p.valid_to, "placement valid_to")
            if until < since:
                raise InvalidInput("a placement ends before it starts")
        a, b = max(since, period.start), min(until, period.horizon)
        if a < b:
            raw[p.vm_id][p.host].append((a, b))
            first_seen.setdefault(p.vm_id, position)
    return {vm: {host: _merge(iv) for host, iv in hosts.items()} for vm, hosts in raw.items()}, first_seen


@dataclass(frozen=True)
class _Overlap:
    own_id: str
    host: str
    neighbour_id: str
    intervals: tuple[Interval, ...]


def _overlaps(
    tenant: str, vm_by_id: Mapping[str, ReportVM], stays: Mapping[str, Mapping[str, list[Interval]]]
) -> list[_Overlap]:
    """Every (own VM, host, neighbour) that shared the host, with the merged times they shared it."""
    others_on_host: dict[str, list[tuple[str, list[Interval]]]] = defaultdict(list)
    for vm_id, hosts in stays.items():
        if vm_by_id[vm_id].tenant != tenant:
            for host, intervals in hosts.items():
                others_on_host[host].append((vm_id, intervals))
    out: list[_Overlap] = []
    for own_id, hosts in stays.items():
        if vm_by_id[own_id].tenant != tenant:
            continue
        for host, own_intervals in hosts.items():
            for other_id, other_intervals in others_on_host[host]:
                shared = _intersect(own_intervals, other_intervals)
                if shared:
                    out.append(_Overlap(own_id, host, other_id, tuple(shared)))
    return out


def _pseudonyms(
    overlaps: Iterable[_Overlap], vm_by_id: Mapping[str, ReportVM], first_seen: Mapping[str, int]
) -> dict[str, str]:
    """neighbour id → ``neighbour-N``, numbered by first appearance (time, own VM name, host, input order)."""
    first: dict[str, tuple[dt.datetime, str, str, int]] = {}
    for o in overlaps:
        key = (o.intervals[0][0], vm_by_id[o.own_id].name, o.host, first_seen[o.neighbour_id])
        if o.neighbour_id not in first or key < first[o.neighbour_id]:
            first[o.neighbour_id] = key
    ordered = sorted(first, key=first.__getitem__)
    return {vm_id: f"neighbour-{n}" for n, vm_id in enumerate(ordered, start=1)}


def _own_vm_report(
    vm: ReportVM,
    stays: Mapping[str, list[Interval]],
    overlaps: Iterable[_Overlap],
    hosts: Mapping[str, ReportHost],
    period: _Period,
) -> OwnVMReport:
    host_stays: list[HostStay] = []
    for host, intervals in stays.items():
        if host not in hosts:
            raise InvalidInput(f"host {host!r} of VM {vm.name!r} is missing from the report's host list")
        info = hosts[host]
        for a, b in intervals:
            ongoing = b == period.horizon
            host_stays.append(HostStay(host, info.site, info.site_security_level, a, b, ongoing))
    host_stays.sort(key=lambda s: (s.since, s.host))
    per_neighbour: dict[str, list[Interval]] = defaultdict(list)
    for o in overlaps:
        per_neighbour[o.neighbour_id].extend(o.intervals)
    merged = [_merge(iv) for iv in per_neighbour.values()]
    timeline = _steps(merged, period.start, period.horizon)
    resident = _seconds(_merge(iv for ivs in stays.values() for iv in ivs))
    average = sum(_seconds(iv) for iv in merged) / resident if resident > 0 else 0.0
    return OwnVMReport(
        name=vm.name,
        stays=tuple(host_stays),
        timeline=tuple(timeline),
        resident_seconds=resident,
        max_neighbours=max(p.count for p in timeline),
        average_neighbours=average,
    )


def _changes(
    overlaps: Iterable[_Overlap],
    vm_by_id: Mapping[str, ReportVM],
    names: Mapping[str, str],
    guard: _Guard,
    period: _Period,
) -> tuple[list[NeighbourPresence], list[ColocationChange]]:
    initial: list[NeighbourPresence] = []
    changes: list[ColocationChange] = []
    for o in overlaps:
        own, other = vm_by_id[o.own_id], vm_by_id[o.neighbour_id]
        profile, _ = guard.labels(other.profile)
        pseudonym, level = names[o.neighbour_id], other.security_level
        for a, b in o.intervals:
            if a == period.start:
                initial.append(NeighbourPresence(own.name, o.host, pseudonym, profile, level))
            else:
                changes.append(ColocationChange(a, own.name, o.host, ChangeKind.ARRIVAL, pseudonym, profile, level))
            if b < period.horizon:
                changes.append(ColocationChange(b, own.name, o.host, ChangeKind.DEPARTURE, pseudonym, profile, level))
    initial.sort(key=lambda p: (p.own_vm, p.host, _number(p.neighbour)))
    # At one instant departures come first: a migrating VM leaves its old neighbours before it meets the new ones.
    changes.sort(key=lambda c: (c.time, c.own_vm, c.change is ChangeKind.ARRIVAL, c.host, _number(c.neighbour)))
    return initial, changes


def _number(pseudonym: str) -> int:
    return int(pseudonym.rsplit("-", 1)[1])


def _neighbour_profiles(
    overlaps: Iterable[_Overlap], vm_by_id: Mapping[str, ReportVM], names: Mapping[str, str], guard: _Guard
) -> tuple[list[NeighbourProfile], dict[str, list[Interval]]]:
    """The neighbours in pseudonym order, and each neighbour's merged co-residence with any own VM."""
    together: dict[str, list[Interval]] = defaultdict(list)
    for o in overlaps:
        together[o.neighbour_id].extend(o.intervals)
    merged = {vm_id: _merge(iv) for vm_id, iv in together.items()}
    profiles: list[NeighbourProfile] = []
    for vm_id in sorted(merged, key=lambda v: _number(names[v])):
        vm = vm_by_id[vm_id]
        labels, withheld = guard.labels(vm.profile)
        profiles.append(
            NeighbourProfile(
                pseudonym=names[vm_id],
                profile=labels,
                labels_withheld=withheld,
                security_level=vm.security_level,
                min_security_level=vm.security_level,
                coresident_seconds=_seconds(merged[vm_id]),
            )
        )
    return profiles, merged


def _incidents(
    incidents: Iterable[ReportIncident],
    tenant: str,
    vm_by_id: Mapping[str, ReportVM],
    overlaps: Sequence[_Overlap],
    stays: Mapping[str, Mapping[str, list[Interval]]],
    names: Mapping[str, str],
    guard: _Guard,
    period: _Period,
) -> list[NeighbourIncident]:
    own_on_host: dict[str, list[Interval]] = defaultdict(list)
    for vm_id, vm_hosts in stays.items():
        if vm_by_id[vm_id].tenant == tenant:
            for host_name, intervals in vm_hosts.items():
                own_on_host[host_name].extend(intervals)
    out: list[NeighbourIncident] = []
    for incident in incidents:
        t = _utc(incident.time, "incident time")
        if not period.start <= t < period.horizon:
            continue
        vm = vm_by_id.get(incident.vm_id) if incident.vm_id is not None else None
        if vm is not None and vm.tenant == tenant:
            continue  # the tenant's own VM: not a neighbour incident
        # A neighbour's incident names the neighbour; anything else on a host the tenant was on names the host.
        # A VM that is not a neighbour at that time (e.g. a stale copy found on the tenant's host) falls to the host.
        shared = (
            [] if vm is None else [o.host for o in overlaps if o.neighbour_id == vm.id and _contains(o.intervals, t)]
        )
        if vm is not None and shared:
            subject, host = names[vm.id], min(shared)
        elif incident.host is not None and _contains(own_on_host.get(incident.host, ()), t):
            subject, host = HOST_SUBJECT, incident.host
        else:
            continue
        out.append(NeighbourIncident(t, guard.text(incident.kind), guard.text(incident.severity), subject, host))
    out.sort(key=lambda i: i.time)
    return out


def build_tenant_report(
    tenant: str,
    start: dt.datetime,
    end: dt.datetime,
    *,
    vms: Iterable[ReportVM],
    placements: Iterable[ReportPlacement],
    hosts: Iterable[ReportHost],
    incidents: Iterable[ReportIncident],
    now: dt.datetime,
) -> TenantReport:
    """The co-location report of ``tenant`` over ``[start, end)``, stating nothing after ``now``.

    ``vms`` must hold every VM named by ``placements``; ``hosts`` every host the tenant's VMs used. Raises
    :class:`InvalidInput` for naive times, an empty period, or inconsistent input; the messages never name a VM or
    tenant other than the caller's.
    """
    period = _period(start, end, now)
    vm_list = list(vms)
    vm_by_id = {vm.id: vm for vm in vm_list}
    if len(vm_by_id) != len(vm_list):
        raise InvalidInput("the report's VM list holds the same VM id twice")
    host_by_name = {h.name: h for h in hosts}
    guard = _Guard(tenant, vm_list)
    stays, first_seen = _placements_by_vm(placements, vm_by_id, period)
    overlaps = _overlaps(tenant, vm_by_id, stays)
    names = _pseudonyms(overlaps, vm_by_id, first_seen)

    own_vms = sorted((vm for vm in vm_list if vm.tenant == tenant), key=lambda vm: (vm.name, vm.id))
    vm_reports = [
        _own_vm_report(vm, stays.get(vm.id, {}), [o for o in overlaps if o.own_id == vm.id], host_by_name, period)
        for vm in own_vms
    ]
    initial, changes = _changes(overlaps, vm_by_id, names, guard, period)
    profiles, together = _neighbour_profiles(overlaps, vm_by_id, names, guard)
    matched = _incidents(incidents, tenant, vm_by_id, overlaps, stays, names, guard, period)
    summary = ReportSummary(
        distinct_neighbours=len(profiles),
        max_simultaneous_neighbours=max(p.count for p in _steps(together.values(), period.start, period.horizon)),
        lowest_neighbour_security_level=min((p.security_level for p in profiles), default=None),
        sites_used=tuple(sorted({s.site for vm in vm_reports for s in vm.stays})),
    )
    return TenantReport(
        tenant=tenant,
        start=period.start,
        end=period.end,
        generated_at=period.now,
        observed_until=period.horizon,
        vms=tuple(vm_reports),
        initial_neighbours=tuple(initial),
        changes=tuple(changes),
        neighbours=tuple(profiles),
        incidents=tuple(matched),
        summary=summary,
    )


# ---------------------------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; } h3 { font-size: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } .empty { color: #777; font-style: italic; }
"""


def _cell(value: object) -> str:
    if isinstance(value, dt.datetime):
        value = value.isoformat()
    elif isinstance(value, float):
        value = f"{value:.2f}"
    elif value is None:
        value = "—"
    return f"<td>{html.escape(str(value))}</td>"


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]], empty: str) -> str:
    body = "".join(f"<tr>{''.join(_cell(v) for v in row)}</tr>" for row in rows)
    if not body:
        return f'<p class="empty">{html.escape(empty)}</p>'
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _labels(profile: Labels) -> str:
    return ", ".join(f"{k}={v}" for k, v in profile) or "—"


def _vm_section(vm: OwnVMReport) -> str:
    e = html.escape
    stays = _table(
        ["host", "site", "site security level", "from", "to", "ongoing"],
        ((s.host, s.site, s.site_security_level, s.since, s.until, "yes" if s.ongoing else "no") for s in vm.stays),
        "did not run in this period",
    )
    timeline = _table(["from", "neighbours"], ((p.time, p.count) for p in vm.timeline), "no data")
    return (
        f"<h3>VM {e(vm.name)}</h3>"
        f"<p>max neighbours: {vm.max_neighbours}; time-weighted average: {vm.average_neighbours:.2f} "
        f"over {vm.resident_seconds:.0f} s running</p>{stays}{timeline}"
    )


def _render_html(report: TenantReport) -> str:
    e = html.escape
    s = report.summary
    lowest = s.lowest_neighbour_security_level
    summary = _table(
        ["distinct neighbours", "max simultaneous neighbours", "lowest neighbour security level", "sites used"],
        [(s.distinct_neighbours, s.max_simultaneous_neighbours, lowest, ", ".join(s.sites_used) or None)],
        "",
    )
    initial = _table(
        ["own VM", "host", "neighbour", "profile", "security level"],
        ((p.own_vm, p.host, p.neighbour, _labels(p.profile), p.security_level) for p in report.initial_neighbours),
        "no neighbours at the start of the period",
    )
    changes = _table(
        ["time", "own VM", "host", "change", "neighbour", "profile", "security level"],
        (
            (c.time, c.own_vm, c.host, c.change.value, c.neighbour, _labels(c.profile), c.security_level)
            for c in report.changes
        ),
        "no co-location changes",
    )
    neighbours = _table(
        ["neighbour", "profile", "labels withheld", "security level", "min security level", "co-resident seconds"],
        (
            (
                n.pseudonym,
                _labels(n.profile),
                n.labels_withheld,
                n.security_level,
                n.min_security_level,
                n.coresident_seconds,
            )
            for n in report.neighbours
        ),
        "no neighbours",
    )
    incidents = _table(
        ["time", "kind", "severity", "subject", "host"],
        ((i.time, i.kind, i.severity, i.subject, i.host) for i in report.incidents),
        "no incidents involving neighbours",
    )
    vms = "".join(_vm_section(vm) for vm in report.vms) or '<p class="empty">no VMs</p>'
    title = f"Co-location report: {report.tenant}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{e(title)}</h1>"
        f"<p>period {e(_iso(report.start))} to {e(_iso(report.end))}; observed until {e(_iso(report.observed_until))}; "
        f"generated {e(_iso(report.generated_at))}. Neighbours are other tenants' VMs, shown under pseudonyms that are "
        "stable within this report only.</p>"
        f"<h2>Summary</h2>{summary}"
        f"<h2>Your VMs</h2>{vms}"
        f"<h2>Neighbours at the start of the period</h2>{initial}"
        f"<h2>Co-location changes</h2>{changes}"
        f"<h2>Neighbours</h2>{neighbours}"
        f"<h2>Incidents involving neighbours</h2>{incidents}"
        "</body></html>\n"
    )
