"""The per-tenant SLA co-location report: hand-worked timelines, incident matching, privacy and HTML escaping."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferryman.core.errors import InvalidInput
from ferryman.policy.report import (
    ChangeKind,
    ColocationChange,
    CountPoint,
    HostStay,
    NeighbourIncident,
    NeighbourPresence,
    ReportHost,
    ReportIncident,
    ReportPlacement,
    ReportVM,
    TenantReport,
    build_tenant_report,
)

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
HOUR = 3600.0
HOSTS = [ReportHost("host-a", "paris", 3), ReportHost("host-b", "berlin", 4)]
PROD = {"env": "prod", "sensitivity": "high"}
TEST = {"env": "test"}


def h(hours: float) -> dt.datetime:
    return T0 + dt.timedelta(hours=hours)


def vm(vm_id: str, tenant: str = "acme", name: str | None = None, profile=None, level: int = 3) -> ReportVM:
    return ReportVM(vm_id, name or vm_id, tenant, dict(profile or PROD), level)


def on(vm_id: str, host: str, since: float, until: float | None = None) -> ReportPlacement:
    return ReportPlacement(vm_id, host, h(since), None if until is None else h(until))


def report(
    vms: Sequence[ReportVM],
    placements: Sequence[ReportPlacement],
    incidents: Sequence[ReportIncident] = (),
    *,
    tenant: str = "acme",
    start: float = 0,
    end: float = 10,
    now: float = 12,
) -> TenantReport:
    return build_tenant_report(
        tenant, h(start), h(end), vms=vms, placements=placements, hosts=HOSTS, incidents=incidents, now=h(now)
    )


def timeline(*points: tuple[float, int]) -> tuple[CountPoint, ...]:
    return tuple(CountPoint(h(t), n) for t, n in points)


def arrival(t: float, own: str, host: str, who: str, profile=PROD, level: int = 3) -> ColocationChange:
    return ColocationChange(h(t), own, host, ChangeKind.ARRIVAL, who, tuple(sorted(profile.items())), level)


def departure(t: float, own: str, host: str, who: str, profile=PROD, level: int = 3) -> ColocationChange:
    return ColocationChange(h(t), own, host, ChangeKind.DEPARTURE, who, tuple(sorted(profile.items())), level)


# ---------------------------------------------------------------------------------------------------------------------
# Hand-worked timelines


def test_arrivals_and_departures_on_one_host():
    """Neighbours present at the start are the initial state; later ones arrive and depart in time order."""
    vms = [
        vm("web"),
        vm("db"),  # same tenant on the same host: never a neighbour
        vm("g1", "globex", level=2),
        vm("g2", "globex", profile=TEST, level=1),
        vm("i1", "initech", level=5),
    ]
    placements = [
        on("web", "host-a", -5),
        on("db", "host-a", -5),
        on("g1", "host-a", -2, 4),
        on("g2", "host-a", 2, 6),
        on("i1", "host-a", 8),
    ]
    r = report(vms, placements)

    web = next(v for v in r.vms if v.name == "web")
    assert web.timeline == timeline((0, 1), (2, 2), (4, 1), (6, 0), (8, 1))
    assert web.max_neighbours == 2
    # (4 h of g1 + 4 h of g2 + 2 h of i1) / 10 h running
    assert web.average_neighbours == pytest.approx(1.0)
    assert web.resident_seconds == 10 * HOUR
    assert web.stays == (HostStay("host-a", "paris", 3, h(0), h(10), True),)

    assert [p for p in r.initial_neighbours if p.own_vm == "web"] == [
        NeighbourPresence("web", "host-a", "neighbour-1", tuple(sorted(PROD.items())), 2)
    ]
    assert [c for c in r.changes if c.own_vm == "web"] == [
        arrival(2, "web", "host-a", "neighbour-2", TEST, 1),
        departure(4, "web", "host-a", "neighbour-1", PROD, 2),
        departure(6, "web", "host-a", "neighbour-2", TEST, 1),
        arrival(8, "web", "host-a", "neighbour-3", PROD, 5),
    ]
    assert [(n.pseudonym, n.security_level, n.coresident_seconds) for n in r.neighbours] == [
        ("neighbour-1", 2, 4 * HOUR),
        ("neighbour-2", 1, 4 * HOUR),
        ("neighbour-3", 5, 2 * HOUR),
    ]
    assert r.summary.distinct_neighbours == 3
    assert r.summary.max_simultaneous_neighbours == 2
    assert r.summary.lowest_neighbour_security_level == 1
    assert r.summary.sites_used == ("paris",)


def migration_fleet() -> tuple[list[ReportVM], list[ReportPlacement]]:
    vms = [vm("web"), vm("a1", "globex"), vm("b1", "initech", profile=TEST, level=1), vm("b2", "globex", level=4)]
    placements = [
        on("web", "host-a", -1, 5),
        on("web", "host-b", 5),
        on("a1", "host-a", -10),
        on("b1", "host-b", 3, 7),  # listed before b2: wins the tie for the pseudonym at 05:00
        on("b2", "host-b", -3),
    ]
    return vms, placements


def test_own_vm_migration_departs_old_neighbours_and_meets_new_ones():
    """A move of the tenant's VM yields departures on the old host, then arrivals on the new one, at the same time."""
    vms, placements = migration_fleet()
    r = report(vms, placements)

    (web,) = r.vms
    assert web.stays == (
        HostStay("host-a", "paris", 3, h(0), h(5), False),
        HostStay("host-b", "berlin", 4, h(5), h(10), True),
    )
    assert web.timeline == timeline((0, 1), (5, 2), (7, 1))
    assert web.average_neighbours == pytest.approx((5 * 1 + 2 * 2 + 3 * 1) / 10)
    assert r.initial_neighbours == (NeighbourPresence("web", "host-a", "neighbour-1", tuple(sorted(PROD.items())), 3),)
    assert r.changes == (
        departure(5, "web", "host-a", "neighbour-1"),
        arrival(5, "web", "host-b", "neighbour-2", TEST, 1),
        arrival(5, "web", "host-b", "neighbour-3", PROD, 4),
        departure(7, "web", "host-b", "neighbour-2", TEST, 1),
    )
    assert r.summary.sites_used == ("berlin", "paris")
    assert r.summary.max_simultaneous_neighbours == 2


def test_clipping_to_the_period_and_to_now():
    """Intervals are clipped to [start, min(end, now)); open ones run until now; nothing after now is stated."""
    vms = [vm("web"), vm("n", "globex"), vm("m", "globex"), vm("f", "globex")]
    placements = [
        on("web", "host-a", 2),
        on("n", "host-a", -5),
        on("m", "host-a", 1, 3),
        on("f", "host-a", 8, 9),  # after now: not reported, though inside the period
    ]
    r = report(vms, placements, now=6)

    assert r.observed_until == h(6)
    assert r.end == h(10)
    (web,) = r.vms
    assert web.timeline == timeline((0, 0), (2, 2), (3, 1))
    assert web.resident_seconds == 4 * HOUR
    assert web.average_neighbours == pytest.approx((4 + 1) / 4)  # n for 4 h, m for 1 h, over 4 h running
    assert web.stays == (HostStay("host-a", "paris", 3, h(2), h(6), True),)
    assert r.initial_neighbours == ()
    # The own VM arrived at 02:00 to find both; tie broken by input order. n does not depart: it is still there.
    assert r.changes == (
        arrival(2, "web", "host-a", "neighbour-1"),
        arrival(2, "web", "host-a", "neighbour-2"),
        departure(3, "web", "host-a", "neighbour-2"),
    )
    assert r.summary.distinct_neighbours == 2


def test_intervals_are_half_open_and_touching_stays_are_one():
    """A neighbour leaving as the own VM arrives never met it; back-to-back placements on one host are one stay."""
    vms = [vm("web"), vm("gone", "globex"), vm("split", "globex")]
    placements = [
        on("web", "host-a", -1, 3),
        on("web", "host-a", 3, 6),
        on("gone", "host-a", -4, -1),
        on("split", "host-a", 1, 2),
        on("split", "host-a", 2, 4),
    ]
    r = report(vms, placements)

    (web,) = r.vms
    assert web.stays == (HostStay("host-a", "paris", 3, h(0), h(6), False),)
    assert web.timeline == timeline((0, 0), (1, 1), (4, 0))
    assert web.average_neighbours == pytest.approx(3 / 6)
    assert r.changes == (arrival(1, "web", "host-a", "neighbour-1"), departure(4, "web", "host-a", "neighbour-1"))


def test_a_vm_that_did_not_run_in_the_period_is_listed_with_no_neighbours():
    """An own VM with no placement in the period has no stays, a flat zero timeline and an average of zero."""
    r = report([vm("web"), vm("g", "globex")], [on("web", "host-a", -5, -1), on("g", "host-a", -5)])
    (web,) = r.vms
    assert web.stays == ()
    assert web.timeline == timeline((0, 0))
    assert (web.resident_seconds, web.max_neighbours, web.average_neighbours) == (0.0, 0, 0.0)
    assert r.summary.distinct_neighbours == 0
    assert r.summary.lowest_neighbour_security_level is None


def test_now_before_the_period_states_nothing():
    """A report generated before its period starts observes nothing."""
    r = report([vm("web")], [on("web", "host-a", -5)], now=-1)
    assert r.observed_until == h(0)
    assert r.vms[0].stays == ()


def test_max_simultaneous_neighbours_counts_distinct_vms_across_own_vms():
    """One neighbour next to two of the tenant's VMs counts once; co-resident time is the union, not the sum."""
    vms = [vm("web"), vm("db"), vm("g", "globex")]
    placements = [on("web", "host-a", -1), on("db", "host-a", -1), on("g", "host-a", 2, 5)]
    r = report(vms, placements)
    assert r.summary.max_simultaneous_neighbours == 1
    assert r.neighbours[0].coresident_seconds == 3 * HOUR
    assert len(r.changes) == 4  # an arrival and a departure seen from each own VM


# ---------------------------------------------------------------------------------------------------------------------
# Incidents


def incident(t: float, vm_id: str | None, host: str | None, kind: str = "security.thrashing") -> ReportIncident:
    return ReportIncident(h(t), kind, "alarm", vm_id, host)


def test_incidents_are_matched_by_time_window_and_host():
    """Only incidents of a neighbour while it shared a host, or of a host the tenant's VM was on at that time, count."""
    vms, placements = migration_fleet()  # web: host-a until 05:00, then host-b; a1 on host-a; b1, b2 on host-b
    incidents = [
        incident(-1, "a1", "host-a"),  # before the period
        incident(1, "a1", None),  # a1 next to web: neighbour-1
        incident(4, None, "host-a", "compliance.violation"),  # web's host at 04:00
        incident(6, "a1", None),  # a1 is no neighbour any more
        incident(6, None, "host-a"),  # web left host-a at 05:00
        incident(6, "b1", "host-b", "vm.stale_copy"),  # b1 next to web on host-b: neighbour-2
        incident(6, "web", "host-b"),  # the tenant's own VM: not a neighbour incident
        incident(6, "zz-unknown", "host-b"),  # not a known VM, but on web's host: the host
        incident(7, "b1", None),  # b1 left at 07:00 (half-open)
        incident(7, "b1", "host-b"),  # ... but the host it names carries web: the host
        incident(11, "b2", "host-b"),  # after the period
    ]
    r = report(vms, placements, incidents)
    assert r.incidents == (
        NeighbourIncident(h(1), "security.thrashing", "alarm", "neighbour-1", "host-a"),
        NeighbourIncident(h(4), "compliance.violation", "alarm", "host", "host-a"),
        NeighbourIncident(h(6), "vm.stale_copy", "alarm", "neighbour-2", "host-b"),
        NeighbourIncident(h(6), "security.thrashing", "alarm", "host", "host-b"),
        NeighbourIncident(h(7), "security.thrashing", "alarm", "host", "host-b"),
    )
    assert "zz-unknown" not in json.dumps(r.to_dict())


def test_incidents_after_now_are_not_reported():
    """An incident timestamped after the report time is outside the observed period."""
    vms, placements = migration_fleet()
    r = report(vms, placements, [incident(8, "b2", None)], now=7)
    assert r.incidents == ()


# ---------------------------------------------------------------------------------------------------------------------
# Privacy


def test_labels_and_kinds_naming_another_tenant_are_withheld():
    """A neighbour's label or an incident kind that contains another tenant's name or VM id is withheld, not shown."""
    vms = [vm("web"), vm("g-7781", "globex", name="payroll", profile={"owner": "globex", "env": "prod"})]
    placements = [on("web", "host-a", -1), on("g-7781", "host-a", 1)]
    r = report(vms, placements, [ReportIncident(h(2), "stale.g-7781", "payroll-high", "g-7781", None)])

    (n,) = r.neighbours
    assert n.profile == (("env", "prod"),)
    assert n.labels_withheld == 1
    assert r.incidents == (NeighbourIncident(h(2), "withheld", "withheld", "neighbour-1", "host-a"),)
    dump = json.dumps(r.to_dict()) + r.render_html()
    for secret in ("globex", "g-7781", "payroll"):
        assert secret not in dump


def test_short_names_are_withheld_only_as_whole_words():
    """A one-letter VM name of another tenant withholds a label equal to it, not every label holding that letter."""
    vms = [vm("web"), vm("n", "globex", profile={"env": "prod", "peer": "n", "app": "nginx-n"})]
    r = report(vms, [on("web", "host-a", -1), on("n", "host-a", 1)])
    assert r.neighbours[0].profile == (("env", "prod"),)
    assert r.neighbours[0].labels_withheld == 2


def test_error_messages_do_not_name_other_vms():
    """Inconsistent input is refused without naming a VM the tenant might not own."""
    with pytest.raises(InvalidInput) as err:
        report([vm("web")], [on("web", "host-a", 0), on("zq-secret", "host-a", 0)])
    assert "zq-secret" not in str(err.value)


HEX = st.text("0123456789abcdef", min_size=12, max_size=12)
KINDS = ["security.thrashing", "vm.stale_copy", "compliance.violation"]


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[ReportVM], list[ReportPlacement], list[ReportIncident], dt.datetime]:
    """Random tenants and VMs named "zq" + 12 hex digits (never a substring of the report's fixed words)."""
    n_tenants = draw(st.integers(2, 4))
    owners = draw(st.lists(st.integers(0, n_tenants - 1), min_size=n_tenants, max_size=12))
    owners = list(range(n_tenants)) + owners  # every tenant owns at least one VM
    tokens = ["zq" + t for t in draw(st.lists(HEX, min_size=n_tenants + 2 * len(owners), unique=True).map(list))]
    tenants, ids, names = tokens[:n_tenants], tokens[n_tenants::2], tokens[n_tenants + 1 :: 2]
    hosts = [host.name for host in HOSTS]
    vms: list[ReportVM] = []
    placements: list[ReportPlacement] = []
    for vm_id, name, owner in zip(ids, names, owners, strict=False):
        profile = {"env": draw(st.sampled_from(["prod", "test"]))}
        if draw(st.booleans()):  # labels that would leak if shown
            profile[draw(st.sampled_from(["owner", tenants[owner]]))] = draw(st.sampled_from([tenants[owner], name]))
        vms.append(ReportVM(vm_id, name, tenants[owner], profile, draw(st.integers(0, 5))))
        times = sorted(draw(st.lists(st.integers(-300, 900), min_size=1, max_size=5, unique=True)))
        bounds = [T0 + dt.timedelta(minutes=m) for m in times]
        ends: list[dt.datetime | None] = [
            *bounds[1:],
            None if draw(st.booleans()) else bounds[-1] + dt.timedelta(hours=2),
        ]
        placements += [
            ReportPlacement(vm_id, draw(st.sampled_from(hosts)), a, b) for a, b in zip(bounds, ends, strict=True)
        ]
    incident_list = [
        ReportIncident(
            T0 + dt.timedelta(minutes=draw(st.integers(-60, 900))),
            draw(st.sampled_from(KINDS)),
            draw(st.sampled_from(["warning", "alarm"])),
            draw(st.sampled_from([None, *ids])),
            draw(st.sampled_from([None, *hosts])),
        )
        for _ in range(draw(st.integers(0, 8)))
    ]
    now = T0 + dt.timedelta(minutes=draw(st.integers(-60, 900)))
    return vms, draw(st.permutations(placements)), incident_list, now


def build(tenant: str, vms, placements, incidents, now) -> TenantReport:
    return build_tenant_report(
        tenant,
        T0,
        T0 + dt.timedelta(hours=10),
        vms=vms,
        placements=placements,
        hosts=HOSTS,
        incidents=incidents,
        now=now,
    )


@settings(max_examples=200, deadline=None)
@given(fleets())
def test_a_report_never_names_another_tenant_or_its_vms(fleet):
    """Neither the JSON nor the HTML holds another tenant's name, VM name or VM id; own names do appear."""
    vms, placements, incidents, now = fleet
    for tenant in {v.tenant for v in vms}:
        r = build(tenant, vms, placements, incidents, now)
        dumped, page = json.dumps(r.to_dict()).lower(), r.render_html().lower()
        for other in (v for v in vms if v.tenant != tenant):
            for secret in (other.tenant, other.name, other.id):
                assert secret not in dumped
                assert secret not in page
        for own in (v for v in vms if v.tenant == tenant):
            assert own.tenant in dumped
            assert own.tenant in page
            assert own.name in dumped
            assert own.name in page


def count_at(points: Sequence[CountPoint], t: dt.datetime) -> int:
    return [p.count for p in points if p.time <= t][-1]


@settings(max_examples=200, deadline=None)
@given(fleets())
def test_replaying_the_changes_gives_the_timeline(fleet):
    """Initial neighbours plus the arrivals and departures up to any change reproduce each VM's neighbour count."""
    vms, placements, incidents, now = fleet
    for tenant in {v.tenant for v in vms}:
        r = build(tenant, vms, placements, incidents, now)
        for own in r.vms:
            present = {p.neighbour for p in r.initial_neighbours if p.own_vm == own.name}
            assert count_at(own.timeline, r.start) == len(present)
            changes = [c for c in r.changes if c.own_vm == own.name]
            for i, c in enumerate(changes):
                if c.change is ChangeKind.ARRIVAL:
                    present.add(c.neighbour)
                else:
                    present.remove(c.neighbour)
                if i + 1 == len(changes) or changes[i + 1].time != c.time:
                    assert count_at(own.timeline, c.time) == len(present)
            assert own.average_neighbours <= own.max_neighbours
        assert r.summary.distinct_neighbours == len(r.neighbours)
        assert [n.pseudonym for n in r.neighbours] == [f"neighbour-{i}" for i in range(1, len(r.neighbours) + 1)]


# ---------------------------------------------------------------------------------------------------------------------
# Output formats and input checks


def test_html_escapes_every_value_and_loads_nothing():
    """A VM name holding markup is escaped, and the page has no scripts and no external resources."""
    name = "<script>alert('x')</script>"
    r = report([vm("v1", name=name), vm("g", "globex")], [on("v1", "host-a", -1), on("g", "host-a", 2)])
    page = r.render_html()
    assert page.startswith("<!DOCTYPE html>")
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    lowered = page.lower()
    for forbidden in ("<script", "src=", "href=", "<link", "@import", "url("):
        assert forbidden not in lowered


def test_html_escapes_the_tenant_name():
    """The tenant name in the title and heading is escaped."""
    r = report([vm("web", tenant="a&<b>")], [on("web", "host-a", 0)], tenant="a&<b>")
    page = r.render_html()
    assert "a&amp;&lt;b&gt;" in page
    assert "<b>" not in page


def test_to_dict_is_json_with_iso_times():
    """to_dict() survives json.dumps, with ISO-8601 UTC times and the neighbour-count steps as pairs."""
    vms, placements = migration_fleet()
    d = json.loads(json.dumps(report(vms, placements).to_dict()))
    assert d["period"] == {"start": "2026-11-01T00:00:00+00:00", "end": "2026-11-01T10:00:00+00:00"}
    assert d["vms"][0]["timeline"] == [
        ["2026-11-01T00:00:00+00:00", 1],
        ["2026-11-01T05:00:00+00:00", 2],
        ["2026-11-01T07:00:00+00:00", 1],
    ]
    assert d["changes"][0]["change"] == "departure"
    assert set(d["neighbours"]) == {"neighbour-1", "neighbour-2", "neighbour-3"}
    assert d["neighbours"]["neighbour-2"]["profile"] == {"env": "test"}


def test_times_in_other_zones_are_reported_in_utc():
    """Aware times in another zone are converted to UTC."""
    paris = dt.timezone(dt.timedelta(hours=1))
    r = build_tenant_report(
        "acme",
        dt.datetime(2026, 11, 1, 1, tzinfo=paris),
        h(10),
        vms=[vm("web")],
        placements=[on("web", "host-a", 0)],
        hosts=HOSTS,
        incidents=[],
        now=h(12),
    )
    assert r.start == h(0)
    assert r.start.tzinfo == dt.UTC


@pytest.mark.parametrize(
    ("start", "end", "now"),
    [
        (dt.datetime(2026, 11, 1), h(10), h(12)),  # naive
        (h(0), h(10), dt.datetime(2026, 11, 1, 12)),  # naive now
        (h(5), h(5), h(12)),  # empty period
    ],
)
def test_bad_periods_are_refused(start, end, now):
    """Naive times and empty periods raise InvalidInput."""
    with pytest.raises(InvalidInput):
        build_tenant_report("acme", start, end, vms=[], placements=[], hosts=HOSTS, incidents=[], now=now)


def test_a_host_missing_from_the_host_list_is_refused():
    """A host the tenant's VM used must be described (its site is part of the report)."""
    with pytest.raises(InvalidInput, match="host-z"):
        report([vm("web")], [on("web", "host-z", 0)])
