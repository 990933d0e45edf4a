"""Impact analysis of a security incident over the CMDB's history (problem management): the records, the interval
arithmetic, the report and each tenant's own view of it.

Why it exists: when a VM is compromised, an exploit of the hypervisor may have reached every VM that shared a host
with it, and the same vulnerability may sit in every VM booted from the same image or baseline; when a host is
compromised, every VM that ran on it is exposed (the paper's *problem management*, issue 12). The queries live in
:mod:`ferryman.cmdb.impact_sql`; this module turns their rows into an :class:`ImpactReport` and a per-tenant view.

What it must not do: run SQL or any other I/O, read the clock, or import SQLAlchemy; and :func:`tenant_view` must
never name another tenant, another tenant's VM names or VM ids. Other tenants' VMs appear there only as pseudonyms
(``neighbour-1``, ...), numbered in order of first appearance in one view, never derived from their ids; as defence in
depth, a host or image name that contains another tenant's name, VM name or VM id is replaced by ``withheld`` (the rule
of :mod:`ferryman.policy.report`).

Time: every interval is half-open, ``[from, to)``; two placements that merely touch (one ends when the other starts)
never overlapped. Intervals are clipped to the analysis window ``[since, until)``; ``to`` is None for a stay that is
still going on and the window is open (``until`` None). Zero-length placements are ignored.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ferryman.core.errors import InvalidInput

WITHHELD = "withheld"
_MIN_SUBSTRING = 3
_WORD_SPLIT = re.compile(r"[^0-9a-z]+")


# -- records -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """The period analysed, ``[since, until)``; ``until`` None: up to now, open-ended."""

    since: dt.datetime
    until: dt.datetime | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "since", _utc(self.since, "since"))
        if self.until is not None:
            until = _utc(self.until, "until")
            if until <= self.since:
                raise InvalidInput(
                    f"empty window: until {until.isoformat()} is not after since {self.since.isoformat()}"
                )
            object.__setattr__(self, "until", until)

    def clip(self, start: dt.datetime, end: dt.datetime | None) -> tuple[dt.datetime, dt.datetime | None] | None:
        """``[start, end)`` (end None: open) clipped to the window; None if nothing of it is inside."""
        a = max(start, self.since)
        b = _earliest(end, self.until)
        if b is not None and b <= a:
            return None
        return a, b


@dataclass(frozen=True)
class Span:
    """One placement of a VM as the queries read it: the VM ran on ``host`` during ``[valid_from, valid_to)``."""

    vm_id: str
    vm_name: str
    tenant: str
    deleted: bool
    host: str
    valid_from: dt.datetime
    valid_to: dt.datetime | None


@dataclass(frozen=True)
class CoResidence:
    """Another VM shared ``host`` with the incident VM during ``[overlap_from, overlap_to)`` within the window
    (``overlap_to`` None: both are still there). ``deleted``: the other VM has been deleted since (it ran there)."""

    vm_id: str
    vm_name: str
    tenant: str
    host: str
    overlap_from: dt.datetime
    overlap_to: dt.datetime | None
    deleted: bool = False


@dataclass(frozen=True)
class HostResidence:
    """A VM ran on ``host`` during ``[resident_from, resident_to)`` within the window (``resident_to`` None: it still
    does). One per placement: a VM that came back to the host appears once per stay."""

    vm_id: str
    vm_name: str
    tenant: str
    host: str
    resident_from: dt.datetime
    resident_to: dt.datetime | None
    deleted: bool = False


@dataclass(frozen=True)
class ImageMatch:
    """A live VM that may carry the incident VM's vulnerability: booted from ``image``, whose registry entry (if any)
    says ``os`` and ``version``."""

    vm_id: str
    vm_name: str
    tenant: str
    image: str
    os: str | None
    version: str | None


@dataclass(frozen=True)
class IncidentVM:
    """The VM an incident is about."""

    id: str
    name: str
    tenant: str
    image: str
    deleted: bool = False


class Subject(enum.StrEnum):
    VM = "vm"
    HOST = "host"


@dataclass(frozen=True)
class ImpactReport:
    """What an incident may have touched within ``window``.

    For a VM incident (``vm`` set): ``co_residents`` (one row per uninterrupted overlap per host), the incident VM's
    ``host_chain`` in the window, and the live VMs of the ``same_image`` and of the ``same_baseline`` (same registry
    os and version; a superset of ``same_image``). For a host incident (``host`` set): ``host_residents``, every stay on
    the host. ``tenants_touched``: the tenants of those VMs other than the incident VM's own, sorted (for a host
    incident, every tenant that had a VM there).
    """

    subject: Subject
    window: Window
    vm: IncidentVM | None
    host: str | None
    co_residents: tuple[CoResidence, ...]
    host_residents: tuple[HostResidence, ...]
    host_chain: tuple[HostResidence, ...]
    tenants_touched: tuple[str, ...]
    same_image: tuple[ImageMatch, ...]
    same_baseline: tuple[ImageMatch, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict for operators; it names every tenant, so never hand it to one (see :func:`tenant_view`)."""
        return {
            "subject": self.subject.value,
            "vm": None if self.vm is None else dataclasses.asdict(self.vm),
            "host": self.host,
            "window": _window_dict(self.window),
            "co_residents": [_json_ready(dataclasses.asdict(c)) for c in self.co_residents],
            "host_residents": [_json_ready(dataclasses.asdict(r)) for r in self.host_residents],
            "host_chain": [_json_ready(dataclasses.asdict(r)) for r in self.host_chain],
            "tenants_touched": list(self.tenants_touched),
            "same_image": [dataclasses.asdict(m) for m in self.same_image],
            "same_baseline": [dataclasses.asdict(m) for m in self.same_baseline],
        }


# -- interval arithmetic -----------------------------------------------------------------------------------------------


def _utc(value: dt.datetime, what: str) -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{what} {value.isoformat()} has no timezone: pass an aware UTC datetime")
    return value.astimezone(dt.UTC)


def _earliest(a: dt.datetime | None, b: dt.datetime | None) -> dt.datetime | None:
    """The earlier of two ends, None meaning "open" (later than any time)."""
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _end_key(end: dt.datetime | None) -> tuple[int, dt.datetime]:
    return (1, dt.datetime.max.replace(tzinfo=dt.UTC)) if end is None else (0, end)


def overlap(subject: Span, other: Span, window: Window) -> CoResidence | None:
    """The time ``other`` shared ``subject``'s host with it inside ``window``; None if they never did (different
    hosts, touching or disjoint intervals, or outside the window)."""
    if subject.host != other.host or subject.vm_id == other.vm_id:
        return None
    if subject.valid_to is not None and subject.valid_to <= subject.valid_from:
        return None
    if other.valid_to is not None and other.valid_to <= other.valid_from:
        return None
    a = max(subject.valid_from, other.valid_from)
    b = _earliest(subject.valid_to, other.valid_to)
    if b is not None and b <= a:
        return None
    clipped = window.clip(a, b)
    if clipped is None:
        return None
    return CoResidence(other.vm_id, other.vm_name, other.tenant, other.host, *clipped, deleted=other.deleted)


def residence(span: Span, window: Window) -> HostResidence | None:
    """The part of one placement inside ``window``; None if it is empty or outside."""
    if span.valid_to is not None and span.valid_to <= span.valid_from:
        return None
    clipped = window.clip(span.valid_from, span.valid_to)
    if clipped is None:
        return None
    return HostResidence(span.vm_id, span.vm_name, span.tenant, span.host, *clipped, deleted=span.deleted)


def merge_co_residences(found: Iterable[CoResidence]) -> list[CoResidence]:
    """One row per uninterrupted overlap: intervals of the same VM on the same host that overlap or touch are joined
    (the incident VM left and came back at the same instant, or the other VM did). Ordered by start, VM name, host."""
    by_key: dict[tuple[str, str], list[CoResidence]] = defaultdict(list)
    for c in found:
        by_key[(c.vm_id, c.host)].append(c)
    merged: list[CoResidence] = []
    for rows in by_key.values():
        if len(rows) == 1:  # the common case
            merged.append(rows[0])
            continue
        rows.sort(key=lambda c: (c.overlap_from, _end_key(c.overlap_to)))
        current = rows[0]
        for c in rows[1:]:
            if current.overlap_to is None:
                continue  # open-ended: it covers every later row
            if c.overlap_from <= current.overlap_to:
                end = None if c.overlap_to is None else max(c.overlap_to, current.overlap_to)
                current = dataclasses.replace(current, overlap_to=end)
            else:
                merged.append(current)
                current = c
        merged.append(current)
    merged.sort(key=lambda c: (c.overlap_from, c.vm_name, c.host, c.vm_id))
    return merged


def co_residences(subject: Sequence[Span], others: Iterable[Span], window: Window) -> list[CoResidence]:
    """Every overlap within ``window`` between a placement of ``subject`` (one VM's) and one of ``others``, merged
    by :func:`merge_co_residences`. ``others`` may hold any placements; those that never met the subject drop out."""
    on_host: dict[str, list[Span]] = defaultdict(list)
    for s in subject:
        on_host[s.host].append(s)
    found = [c for o in others for s in on_host.get(o.host, ()) if (c := overlap(s, o, window)) is not None]
    return merge_co_residences(found)


def residences(spans: Iterable[Span], window: Window) -> list[HostResidence]:
    """Each placement's part inside ``window``, ordered by start, VM name, host."""
    found = [r for s in spans if (r := residence(s, window)) is not None]
    return sorted(found, key=lambda r: (r.resident_from, r.vm_name, r.host, r.vm_id))


# -- the report --------------------------------------------------------------------------------------------------------


def vm_impact(
    vm: IncidentVM,
    window: Window,
    *,
    co_residents: Iterable[CoResidence],
    host_chain: Iterable[HostResidence],
    same_image: Iterable[ImageMatch],
    same_baseline: Iterable[ImageMatch],
) -> ImpactReport:
    """The report of an incident at ``vm``; the incident VM itself is left out of every list but its host chain."""
    rows = merge_co_residences(c for c in co_residents if c.vm_id != vm.id)
    return ImpactReport(
        subject=Subject.VM,
        window=window,
        vm=vm,
        host=None,
        co_residents=tuple(rows),
        host_residents=(),
        host_chain=tuple(sorted(host_chain, key=lambda r: (r.resident_from, r.host))),
        tenants_touched=tuple(sorted({c.tenant for c in rows} - {vm.tenant})),
        same_image=_matches(same_image, vm.id),
        same_baseline=_matches(same_baseline, vm.id),
    )


def host_impact(host: str, window: Window, *, residents: Iterable[HostResidence]) -> ImpactReport:
    """The report of an incident at ``host``: every VM whose host chain includes it within the window."""
    rows = sorted(residents, key=lambda r: (r.resident_from, r.vm_name, r.host, r.vm_id))
    return ImpactReport(
        subject=Subject.HOST,
        window=window,
        vm=None,
        host=host,
        co_residents=(),
        host_residents=tuple(rows),
        host_chain=(),
        tenants_touched=tuple(sorted({r.tenant for r in rows})),
        same_image=(),
        same_baseline=(),
    )


def _matches(found: Iterable[ImageMatch], incident_vm: str) -> tuple[ImageMatch, ...]:
    unique = {m.vm_id: m for m in found if m.vm_id != incident_vm}
    return tuple(sorted(unique.values(), key=lambda m: (m.tenant, m.vm_name, m.vm_id)))


# -- a tenant's view ---------------------------------------------------------------------------------------------------


class _Guard:
    """Withholds strings that contain another tenant's name, VM name or VM id (case-insensitive): names of three
    characters or more anywhere, shorter ones only as whole words (as :mod:`ferryman.policy.report` does)."""

    def __init__(self, tokens: Iterable[str]) -> None:
        lowered = {t.lower() for t in tokens} - {""}
        self._long = {t for t in lowered if len(t) >= _MIN_SUBSTRING}
        self._short = lowered - self._long

    def text(self, text: str) -> str:
        lowered = text.lower()
        if any(token in lowered for token in self._long):
            return WITHHELD
        if self._short and not self._short.isdisjoint(_WORD_SPLIT.split(lowered)):
            return WITHHELD
        return text


def _others(report: ImpactReport, tenant: str) -> set[str]:
    """Every identifier of another tenant that the report holds: tenant names, VM names, VM ids."""
    tokens: set[str] = set()
    vms: list[tuple[str, str, str]] = [(c.tenant, c.vm_name, c.vm_id) for c in report.co_residents]
    vms += [(r.tenant, r.vm_name, r.vm_id) for r in (*report.host_residents, *report.host_chain)]
    vms += [(m.tenant, m.vm_name, m.vm_id) for m in (*report.same_image, *report.same_baseline)]
    if report.vm is not None:
        vms.append((report.vm.tenant, report.vm.name, report.vm.id))
    for owner, name, vm_id in vms:
        if owner != tenant:
            tokens.update({owner, name, vm_id})
    tokens.update(t for t in report.tenants_touched if t != tenant)
    return tokens


def tenant_view(report: ImpactReport, tenant: str) -> dict[str, Any]:
    """What ``tenant`` may be told of the incident: its own VMs that shared a host with the incident VM (or ran on the
    incident host) and when, and its own live VMs of the same image or baseline. JSON-ready.

    The incident VM is named only to its own tenant (with its host chain); to any other tenant it is ``neighbour-1``.
    Nothing else of another tenant appears, not even a count of its VMs. A tenant the incident did not touch gets
    the same shape with empty lists.
    """
    guard = _Guard(_others(report, tenant))
    own_vm = report.vm is not None and report.vm.tenant == tenant
    pseudonyms: dict[str, str] = {}

    def call(vm_id: str, vm_name: str, owner: str) -> dict[str, str]:
        if owner == tenant:
            return {"vm": vm_name, "vm_id": vm_id}
        name = pseudonyms.setdefault(vm_id, f"neighbour-{len(pseudonyms) + 1}")
        return {"vm": name}

    incident: dict[str, Any] = {"kind": report.subject.value}
    if report.vm is not None:
        incident |= call(report.vm.id, report.vm.name, report.vm.tenant)
    if report.host is not None:
        incident["host"] = guard.text(report.host)
    stays = report.co_residents if report.vm is not None else report.host_residents
    view: dict[str, Any] = {
        "tenant": tenant,
        "window": _window_dict(report.window),
        "incident": incident,
        "host_chain": [_stay(r.host, r.resident_from, r.resident_to, guard) for r in report.host_chain]
        if own_vm
        else [],
        "affected_vms": [_affected(row, guard) for row in stays if row.tenant == tenant],
        "same_image": [_match(m, guard) for m in report.same_image if m.tenant == tenant],
        "same_baseline": [_match(m, guard) for m in report.same_baseline if m.tenant == tenant],
    }
    return view


def _affected(row: CoResidence | HostResidence, guard: _Guard) -> dict[str, Any]:
    if isinstance(row, CoResidence):
        start, end = row.overlap_from, row.overlap_to
    else:
        start, end = row.resident_from, row.resident_to
    return {"vm": row.vm_name, "vm_id": row.vm_id, "deleted": row.deleted, **_stay(row.host, start, end, guard)}


def _stay(host: str, start: dt.datetime, end: dt.datetime | None, guard: _Guard) -> dict[str, Any]:
    return {"host": guard.text(host), "from": start.isoformat(), "to": None if end is None else end.isoformat()}


def _match(m: ImageMatch, guard: _Guard) -> dict[str, Any]:
    return {"vm": m.vm_name, "vm_id": m.vm_id, "image": guard.text(m.image)}


def _window_dict(window: Window) -> dict[str, str | None]:
    return {"since": window.since.isoformat(), "until": None if window.until is None else window.until.isoformat()}


def _json_ready(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, dt.datetime) else v for k, v in row.items()}
