"""The anti-thrashing governor: each limit with hand-worked numbers, back-off with jitter, the circuit breaker."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferryman.core.errors import InvalidInput
from ferryman.scheduler.governor import (
    Active,
    Attempt,
    AttemptOutcome,
    Decision,
    GiB,
    Governor,
    GovernorSettings,
    MiB,
    MigrationRequest,
    ThrashingAlert,
)

T0 = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def no_random() -> float:
    raise AssertionError("the random source is only for back-off jitter")


def governor(random=no_random, **overrides) -> Governor:
    return Governor(GovernorSettings(**overrides), random)


def request(vm="vm1", source="host-a", destination="host-b", principal="alice", automatic=False) -> MigrationRequest:
    return MigrationRequest(vm, source, destination, principal, automatic)


def attempt(
    outcome: AttemptOutcome,
    ended: float,
    vm="vm1",
    source="host-a",
    destination="host-b",
    principal="alice",
    took: float = 30.0,
) -> Attempt:
    return Attempt(vm, source, destination, principal, at(ended - took), outcome, at(ended))


def decide(gov: Governor, req: MigrationRequest, active=(), history=(), now=T0, attempt_no=1) -> Decision:
    return gov.decide(req, now=now, active=list(active), history=list(history), attempt=attempt_no)


def test_defaults_are_the_documented_limits():
    """The defaults are the documented ones (DESIGN.md thrashing threat)."""
    s = GovernorSettings()
    assert (s.max_parallel, s.max_outbound_per_host, s.max_inbound_per_host) == (4, 2, 2)
    assert (s.vm_cooldown_s, s.principal_rate, s.bandwidth_cap_bytes_per_s) == (300, 10, 200 * MiB)
    assert (s.backoff_base_s, s.backoff_max_s, s.jitter) == (5, 600, 0.2)
    assert (s.breaker_threshold, s.breaker_window_s) == (3, 3600)
    assert (s.progress_timeout_s, s.completion_timeout_s_per_gib, s.max_attempts_per_request) == (60, 120, 5)


def test_a_quiet_cluster_allows():
    """No activity, no history: allowed, no reasons, no alert."""
    assert decide(governor(), request()) == Decision(allowed=True)


# ----------------------------------------------------------------------------------------------------- capacity


def four_elsewhere(n: int = 4) -> list[Active]:
    return [Active(f"other{i}", f"src{i}", f"dst{i}") for i in range(n)]


def test_cluster_limit():
    """Four running migrations fill max_parallel=4; three leave room."""
    decision = decide(governor(), request(), active=four_elsewhere(4))
    assert not decision.allowed and decision.retry_after_s is None
    assert decision.reasons == ("cluster limit: 4 migrations running, limit 4 (max_parallel=4)",)
    assert decide(governor(), request(), active=four_elsewhere(3)).allowed


def test_automatic_requests_leave_a_slot_for_manual_ones():
    """With 3 of 4 slots busy the balancer is refused, an operator is not."""
    decision = decide(governor(), request(automatic=True), active=four_elsewhere(3))
    assert not decision.allowed
    assert decision.reasons == (
        "cluster limit: 3 migrations running, limit 3 (max_parallel=4, 1 of max_parallel=4 kept for manual migrations)",
    )
    assert decide(governor(), request(automatic=True), active=four_elsewhere(2)).allowed
    assert decide(governor(), request(automatic=False), active=four_elsewhere(3)).allowed


def test_outbound_limit_per_host():
    """Two migrations leaving host-a fill max_outbound_per_host=2; other sources are unaffected."""
    busy = [Active("x1", "host-a", "host-c"), Active("x2", "host-a", "host-d")]
    decision = decide(governor(), request(), active=busy)
    assert decision.reasons == ("outbound limit of host host-a: 2 migrations leaving it, max_outbound_per_host=2",)
    assert decide(governor(), request(source="host-e"), active=busy).allowed
    assert decide(governor(), request(), active=busy[:1]).allowed


def test_inbound_limit_per_host():
    """Two migrations arriving at host-b fill max_inbound_per_host=2."""
    busy = [Active("x1", "host-c", "host-b"), Active("x2", "host-d", "host-b")]
    decision = decide(governor(), request(), active=busy)
    assert decision.reasons == ("inbound limit of host host-b: 2 migrations arriving, max_inbound_per_host=2",)
    assert decide(governor(), request(destination="host-e"), active=busy).allowed


def test_one_migration_per_vm_at_a_time():
    """A VM already migrating cannot start a second migration."""
    decision = decide(governor(), request(), active=[Active("vm1", "host-x", "host-y")])
    assert decision.reasons == ("VM vm1 is already migrating (one migration per VM at a time)",)


# ------------------------------------------------------------------------------------------------- time limits


def test_vm_cooldown_after_a_completed_migration():
    """Done 100 s ago with vm_cooldown_s=300: refused, 200 s to wait; after 300 s allowed."""
    history = [attempt("done", ended=-100)]
    decision = decide(governor(), request(), history=history)
    assert decision.reasons == ("VM vm1 cooldown: its last migration ended 100 s ago, vm_cooldown_s=300; 200 s left",)
    assert decision.retry_after_s == pytest.approx(200)
    assert decide(governor(), request(), history=history, now=at(200)).allowed
    assert decide(governor(), request(vm="vm2"), history=history).allowed


def test_principal_rate_over_the_last_minute():
    """Ten requests in the last minute fill principal_rate=10; the oldest leaves the window after 1 s."""
    history = [attempt("refused", ended=-59 + i, vm=f"v{i}", took=0) for i in range(10)]
    decision = decide(governor(), request(vm="fresh"), history=history)
    assert decision.reasons == ("principal alice rate limit: 10 requests in the last 60 s, principal_rate=10/min",)
    assert decision.retry_after_s == pytest.approx(1)
    assert decide(governor(), request(vm="fresh"), history=history, now=at(1)).allowed
    assert decide(governor(), request(vm="fresh", principal="bob"), history=history).allowed


def test_principal_rate_counts_running_migrations_and_waits_for_enough_to_expire():
    """Twelve requests (two still running) with rate 10: three must leave, the third oldest at -57 s: wait 3 s."""
    history = [attempt("refused", ended=-59 + i, vm=f"v{i}", took=0) for i in range(10)]
    active = [Active(f"run{i}", f"s{i}", f"d{i}", principal="alice", started_at=at(-5)) for i in range(2)]
    decision = decide(governor(max_parallel=8), request(vm="fresh"), active=active, history=history)
    assert "12 requests in the last 60 s" in decision.reasons[0]
    assert decision.retry_after_s == pytest.approx(3)


def test_backoff_sequence_doubles_and_caps():
    """base 5 s doubling per consecutive failure, capped at 600 s."""
    gov = governor()
    assert [gov.backoff_s(n) for n in range(10)] == [0, 5, 10, 20, 40, 80, 160, 320, 600, 600]
    assert gov.backoff_s(10_000) == 600


@pytest.mark.parametrize(("r", "expected"), [(0.0, 10.0), (0.5, 12.0), (0.999, 13.996)])
def test_backoff_refuses_until_the_wait_is_over_and_jitters_the_hint(r, expected):
    """Three failures, the last 10 s ago: 20 s wait, 10 s left; the hint is 10 s + 20 s x 0.2 x r."""
    history = [attempt("rolled_back", ended=e) for e in (-700, -400, -10)]
    decision = decide(governor(lambda: r), request(), history=history)
    assert decision.reasons == (
        "VM vm1 back-off: 3 consecutive failed attempts, wait 20 s (backoff_base_s=5 * 2^2, backoff_max_s=600); "
        "10 s left",
    )
    assert decision.retry_after_s == pytest.approx(expected)
    assert 10 <= decision.retry_after_s < 10 + 20 * 0.2
    assert decide(governor(lambda: r), request(), history=history, now=at(10)).allowed


def test_backoff_counts_only_failures_since_the_last_success_and_skips_refusals():
    """A success resets the count; governor refusals are neither failures nor successes."""
    history = [
        attempt("rolled_back", ended=-2000),
        attempt("done", ended=-1000),
        attempt("rolled_back", ended=-500),
        attempt("refused", ended=-300, took=0),
        attempt("rolled_back", ended=-6),
    ]
    decision = decide(governor(lambda: 0.0), request(), history=history)
    assert "2 consecutive failed attempts, wait 10 s" in decision.reasons[0]
    assert decision.retry_after_s == pytest.approx(4)


# --------------------------------------------------------------------------------------------------------- breaker


def test_breaker_opens_per_vm_and_alerts():
    """Three disruptions of vm1 within the hour, on different host pairs: refused with a VM alert until the oldest
    leaves the window; another VM is unaffected."""
    history = [
        attempt("disrupted", ended=-3000, source="h1", destination="h2"),
        attempt("disrupted", ended=-2000, source="h3", destination="h4"),
        attempt("disrupted", ended=-1000, source="h5", destination="h6"),
    ]
    decision = decide(governor(), request(), history=history)
    assert not decision.allowed
    assert decision.alert == ThrashingAlert("vm", "vm1", 3, 3600.0, until=at(600))
    assert decision.reasons == (
        "circuit breaker open for VM vm1: 3 disrupted attempts in the last 3600 s, breaker_threshold=3; "
        f"closes at {at(600).isoformat()}",
    )
    assert decision.retry_after_s == pytest.approx(600)
    assert "possible thrashing: 3 disrupted migrations of VM vm1" in decision.alert.message
    assert decide(governor(), request(vm="vm2"), history=history).allowed
    assert decide(governor(), request(), history=history[1:]).allowed  # two are below the threshold
    assert decide(governor(), request(), history=history, now=at(600)).allowed  # closed by time


def test_a_success_does_not_close_the_breaker():
    """A completed migration inside the window leaves the breaker open: only time closes it."""
    history = [
        attempt("disrupted", ended=-3000, source="h1"),
        attempt("disrupted", ended=-2500, source="h2"),
        attempt("disrupted", ended=-2000, source="h3"),
        attempt("done", ended=-1000),
    ]
    decision = decide(governor(), request(), history=history)
    assert not decision.allowed and [a.kind for a in decision.alerts] == ["vm"]


def test_breaker_opens_per_host_pair_in_both_directions():
    """Three disruptions of different VMs between host-a and host-b open the pair breaker for both directions;
    another pair and the same VMs elsewhere are unaffected."""
    history = [attempt("disrupted", ended=-1000 * (i + 1), vm=f"v{i}") for i in range(3)]
    decision = decide(governor(), request(vm="vm9"), history=history)
    assert decision.alert == ThrashingAlert("host_pair", "host-a<->host-b", 3, 3600.0, until=at(600))
    assert decision.reasons[0].startswith("circuit breaker open for hosts host-a<->host-b: 3 disrupted attempts")
    reverse = decide(governor(), request(vm="vm9", source="host-b", destination="host-a"), history=history)
    assert not reverse.allowed and reverse.alert is not None and reverse.alert.kind == "host_pair"
    assert decide(governor(), request(vm="vm9", destination="host-c"), history=history).allowed
    assert decide(governor(), request(vm="v0", source="host-c", destination="host-d"), history=history).allowed


def test_both_breakers_open_report_the_pair_first():
    """When the VM and its host pair are both tripped, both alerts are returned, the broader (pair) first."""
    history = [attempt("disrupted", ended=-1000 * (i + 1)) for i in range(3)]
    decision = decide(governor(), request(), history=history)
    assert [a.kind for a in decision.alerts] == ["host_pair", "vm"]
    assert decision.alert is decision.alerts[0]


# ------------------------------------------------------------------------------------------ final and combinations


def test_attempt_budget_and_same_host_are_final():
    """The sixth attempt of a request, or a move to the same host, is refused for good (no retry hint)."""
    decision = decide(governor(), request(), attempt_no=6)
    assert decision.final and decision.retry_after_s is None
    assert decision.reasons == ("request for VM vm1 gave up: attempt 6 exceeds max_attempts_per_request=5",)
    assert decide(governor(), request(), attempt_no=5).allowed
    same = decide(governor(), request(destination="host-a"))
    assert same.final and "same host" in same.reasons[0]


def test_all_reasons_are_reported_and_the_hint_is_the_longest_wait():
    """Every failing limit is named; retry_after is the longest of the time-bounded waits."""
    history = [attempt("done", ended=-100)]  # cooldown: 200 s left
    history += [attempt("refused", ended=-30, vm=f"v{i}", took=0) for i in range(10)]  # rate: 30 s left
    decision = decide(governor(), request(), active=four_elsewhere(4), history=history)
    assert len(decision.reasons) == 3
    assert decision.retry_after_s == pytest.approx(200)


# ------------------------------------------------------------------------------------------------------ timeouts


def test_timeouts():
    """120 s per GiB, at least one GiB's worth, never below twice what the bandwidth cap needs."""
    gov = governor()
    assert gov.progress_timeout_s == 60
    assert gov.completion_timeout_s(512 * MiB) == 120
    assert gov.completion_timeout_s(4 * GiB) == 480
    assert governor(bandwidth_cap_bytes_per_s=1 * MiB).completion_timeout_s(1 * GiB) == 2048
    assert governor(bandwidth_cap_bytes_per_s=None).completion_timeout_s(3 * GiB) == 360


@pytest.mark.parametrize(
    "bad",
    [
        {"max_parallel": 0},
        {"jitter": 1.5},
        {"manual_reserved_slots": 4},
        {"backoff_max_s": 1, "backoff_base_s": 5},
        {"bandwidth_cap_bytes_per_s": 0},
        {"breaker_window_s": 0},
    ],
)
def test_bad_settings_are_refused(bad):
    """Settings that would disable a limit or block everything are rejected with the setting's name."""
    with pytest.raises(InvalidInput, match=next(iter(bad))):
        GovernorSettings(**bad)


# ---------------------------------------------------------------------------------------------- property test

VMS = st.sampled_from(["vm1", "vm2", "vm3"])
HOSTS = st.sampled_from(["h1", "h2", "h3"])
PRINCIPALS = st.sampled_from(["alice", "bob"])


@st.composite
def governor_settings(draw: st.DrawFn) -> GovernorSettings:
    max_parallel = draw(st.integers(1, 4))
    return GovernorSettings(
        max_parallel=max_parallel,
        max_outbound_per_host=draw(st.integers(1, 3)),
        max_inbound_per_host=draw(st.integers(1, 3)),
        vm_cooldown_s=draw(st.sampled_from([0, 60, 300])),
        principal_rate=draw(st.integers(1, 4)),
        breaker_threshold=draw(st.integers(1, 3)),
        breaker_window_s=draw(st.sampled_from([600, 3600])),
        manual_reserved_slots=draw(st.integers(0, max_parallel - 1)),
    )


@st.composite
def attempts(draw: st.DrawFn) -> Attempt:
    ended = draw(st.integers(-4000, 0))  # history holds finished attempts: none ends after now
    return Attempt(
        draw(VMS),
        draw(HOSTS),
        draw(HOSTS),
        draw(PRINCIPALS),
        at(ended - draw(st.integers(0, 120))),
        draw(st.sampled_from(["done", "rolled_back", "disrupted", "refused"])),
        at(ended),
    )


actives = st.builds(Active, VMS, HOSTS, HOSTS, st.none() | PRINCIPALS, st.none() | st.builds(at, st.integers(-120, 0)))


def within(t: dt.datetime, seconds: float) -> bool:
    return t > T0 - dt.timedelta(seconds=seconds)


@settings(max_examples=500, deadline=None)
@given(
    s=governor_settings(),
    req=st.builds(MigrationRequest, VMS, HOSTS, HOSTS, PRINCIPALS, st.booleans()),
    active=st.lists(actives, max_size=5),
    history=st.lists(attempts(), max_size=12),
    r=st.floats(0, 1, exclude_max=True),
    attempt_no=st.integers(1, 6),
)
def test_refusals_have_reasons_and_allowed_decisions_respect_every_limit(s, req, active, history, r, attempt_no):
    """For any history: a refusal names at least one reason; an allowance never exceeds any limit."""
    gov = Governor(s, lambda: r)
    decision = gov.decide(req, now=T0, active=active, history=history, attempt=attempt_no)
    if not decision.allowed:
        assert decision.reasons
        assert decision.retry_after_s is None or decision.retry_after_s > 0
        assert not decision.final or decision.retry_after_s is None
        return
    assert decision.reasons == () and decision.alerts == ()
    assert req.source != req.destination and attempt_no <= s.max_attempts_per_request
    # capacity, counting the new migration
    cluster_limit = s.max_parallel - (s.manual_reserved_slots if req.automatic else 0)
    assert len(active) + 1 <= cluster_limit
    assert sum(a.source == req.source for a in active) + 1 <= s.max_outbound_per_host
    assert sum(a.destination == req.destination for a in active) + 1 <= s.max_inbound_per_host
    assert all(a.vm_id != req.vm_id for a in active)
    # time limits
    mine = [h for h in history if h.vm_id == req.vm_id]
    assert all(h.ended_at <= T0 - dt.timedelta(seconds=s.vm_cooldown_s) for h in mine if h.outcome == "done")
    requests = [h.started_at for h in history if h.principal == req.principal]
    requests += [a.started_at for a in active if a.principal == req.principal and a.started_at is not None]
    assert sum(within(t, 60) for t in requests) + 1 <= s.principal_rate
    since_success = [h for h in mine if not any(d.outcome == "done" and d.ended_at >= h.ended_at for d in mine)]
    failures = [h for h in since_success if h.outcome in ("rolled_back", "disrupted")]
    if failures:
        wait = min(s.backoff_base_s * 2 ** (len(failures) - 1), s.backoff_max_s)
        assert max(h.ended_at for h in failures) + dt.timedelta(seconds=wait) <= T0
    # breaker
    disrupted = [h for h in history if h.outcome == "disrupted" and within(h.ended_at, s.breaker_window_s)]
    assert sum(h.vm_id == req.vm_id for h in disrupted) < s.breaker_threshold
    pair = {req.source, req.destination}
    assert sum({h.source, h.destination} == pair for h in disrupted) < s.breaker_threshold
