"""Alert limits: token buckets with a fake clock, the gate's fairness between VMs, dedup windows, memory bounds."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferryman.core.errors import InvalidInput
from ferryman.incidents.limits import AlertGate, Dedup, RateLimiter, Verdict
from ferryman.testing.clock import FakeClock

T0 = dt.datetime(2026, 12, 6, 10, 0, tzinfo=dt.UTC)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def admitted(gate: AlertGate, key: str, times: int) -> int:
    return sum(gate.admit(key).allowed for _ in range(times))


# ------------------------------------------------------------------------------------------------------ rate limiter


def test_burst_then_refusal_then_refill():
    """A fresh key takes `burst` tokens at once, then waits 1/rate per token; refusals take nothing."""
    clock = FakeClock(T0)
    limiter = RateLimiter(rate_per_s=0.5, burst=3, clock=clock)
    assert [limiter.acquire("vm1") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("vm1") == pytest.approx(2.0)
    assert limiter.acquire("vm1") == pytest.approx(2.0)  # the refusal did not push the wait further
    clock.advance(1.0)
    assert limiter.retry_after("vm1") == pytest.approx(1.0)
    assert limiter.tokens("vm1") == pytest.approx(0.5)
    clock.advance(1.0)
    assert limiter.acquire("vm1") == 0.0
    assert limiter.acquire("vm1") == pytest.approx(2.0)


def test_refill_stops_at_burst():
    """A long idle period refills to `burst`, not beyond."""
    clock = FakeClock(T0)
    limiter = RateLimiter(rate_per_s=10, burst=2, clock=clock)
    limiter.acquire("vm1")
    clock.advance(3600)
    assert limiter.tokens("vm1") == 2
    assert [limiter.acquire("vm1") == 0.0 for _ in range(3)] == [True, True, False]


def test_keys_are_independent():
    """Draining one key leaves another key's bucket full."""
    limiter = RateLimiter(rate_per_s=1, burst=1, clock=FakeClock(T0))
    assert limiter.acquire("vm1") == 0.0
    assert limiter.acquire("vm1") > 0.0
    assert limiter.acquire("vm2") == 0.0


def test_a_clock_stepping_back_refills_nothing():
    """Time going backwards neither refills the bucket nor makes the wait negative or the level exceed burst."""
    clock = FakeClock(T0)
    limiter = RateLimiter(rate_per_s=1, burst=2, clock=clock)
    limiter.acquire("vm1")
    limiter.acquire("vm1")
    clock.advance(-3600)
    assert limiter.tokens("vm1") == 0.0
    assert limiter.retry_after("vm1") == pytest.approx(1.0)
    clock.advance(3601)
    assert limiter.acquire("vm1") == 0.0


def test_float_rounding_does_not_refuse_a_token_that_is_due():
    """Three steps of 0.1 s at 1/0.3 per second refill exactly one token, although 0.1 is not exact in binary."""
    clock = FakeClock(T0)
    limiter = RateLimiter(rate_per_s=1 / 0.3, burst=1, clock=clock)
    limiter.acquire("vm1")
    clock.advance(0.1)
    clock.advance(0.1)
    assert limiter.acquire("vm1") > 0.0
    clock.advance(0.1)
    assert limiter.acquire("vm1") == 0.0


@pytest.mark.parametrize(
    ("rate", "burst", "max_keys", "expected"),
    [
        (0, 1, 10, "rate_per_s must be a finite number greater than 0"),
        (-1, 1, 10, "rate_per_s"),
        (float("inf"), 1, 10, "rate_per_s"),
        (float("nan"), 1, 10, "rate_per_s"),
        (True, 1, 10, "rate_per_s"),
        (1, 0.5, 10, "burst must be at least 1"),
        (1, 0, 10, "burst must be a finite number"),
        (1, 1, 0, "max_keys must be an integer of at least 1"),
        (1, 1, 2.5, "max_keys"),
    ],
)
def test_limiter_settings_are_checked(rate, burst, max_keys, expected):
    """Zero, negative, infinite, NaN and boolean settings are refused."""
    with pytest.raises(InvalidInput, match=expected):
        RateLimiter(rate, burst, FakeClock(T0), max_keys=max_keys)


def test_idle_keys_are_forgotten_without_changing_any_decision():
    """A bucket idle for burst/rate seconds is full, so it is dropped; the key then behaves as new, as it would."""
    clock = FakeClock(T0)
    limiter = RateLimiter(rate_per_s=1, burst=5, clock=clock)
    for n in range(100):
        limiter.acquire(f"vm{n}")
    assert len(limiter) == 100
    clock.advance(4.9)
    limiter.acquire("late")
    assert len(limiter) == 101  # none is full yet
    clock.advance(0.1)
    limiter.acquire("later")
    assert len(limiter) == 2  # vm0..vm99 were full again and are gone; "late" has 0.1 s of its 5 s to go
    assert limiter.evicted == 0
    assert limiter.tokens("vm7") == 5


def test_memory_is_capped_by_evicting_the_least_recently_used_key():
    """Past max_keys the least recently used bucket is evicted (its key forgiven, counted); the size never grows."""
    clock = FakeClock(T0)
    limiter = RateLimiter(rate_per_s=0.001, burst=1, clock=clock, max_keys=100)
    for n in range(1000):
        assert limiter.acquire(f"vm{n}") == 0.0
        assert len(limiter) <= 100
    assert len(limiter) == 100
    assert limiter.evicted == 900
    assert limiter.acquire("vm999") > 0.0  # recently used: still limited
    assert limiter.acquire("vm0") == 0.0  # evicted: fails open for that one key


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.floats(min_value=0, max_value=5), st.sampled_from(["a", "b", "c"]), st.integers(1, 5)),
        max_size=60,
    ),
    rate=st.floats(min_value=0.05, max_value=5),
    burst=st.integers(min_value=1, max_value=5),
)
def test_no_key_ever_exceeds_burst_plus_rate_times_elapsed(steps, rate, burst):
    """Over any run, a key gets at most burst + rate * elapsed tokens."""
    clock = FakeClock(T0)
    limiter = RateLimiter(rate, burst, clock)
    taken: dict[str, int] = {}
    for wait, key, tries in steps:
        clock.advance(wait)
        for _ in range(tries):
            if limiter.acquire(key) == 0.0:
                taken[key] = taken.get(key, 0) + 1
        elapsed = (clock.now() - T0).total_seconds()
        assert all(n <= burst + rate * elapsed + 1e-6 for n in taken.values())


# --------------------------------------------------------------------------------------------------------------- gate


def gate(clock: FakeClock, **overrides: float) -> AlertGate:
    settings_ = {"per_vm_rate": 0.1, "per_vm_burst": 3, "global_rate": 1.0, "global_burst": 10} | overrides
    return AlertGate(clock=clock, **settings_)


def test_one_noisy_vm_gets_its_burst_and_leaves_the_rest_of_the_global_budget_to_others():
    """A VM firing 1000 alerts gets 3; its 997 refusals take no global token, so 7 other VMs still get theirs."""
    clock = FakeClock(T0)
    g = gate(clock)
    assert admitted(g, "noisy", 1000) == 3
    assert g.total.tokens(AlertGate.GLOBAL_KEY) == pytest.approx(7)
    assert [g.admit(f"vm{n}").allowed for n in range(8)] == [True] * 7 + [False]


def test_a_noisy_vm_is_held_to_its_own_rate_over_time():
    """Flooding from t = 0 to 99.9 s, a VM gets its burst of 3 plus one token every 10 s (t = 10 .. 90): 12."""
    clock = FakeClock(T0)
    g = gate(clock)
    total = 0
    for _ in range(1000):
        total += admitted(g, "noisy", 10)
        clock.advance(0.1)
    assert total == 12


def test_refusal_names_the_key_and_the_wait():
    """A per-VM refusal names the VM, the limit and the wait; retry_after_s is when its next token is due."""
    clock = FakeClock(T0)
    g = gate(clock)
    admitted(g, "web-1", 3)
    verdict = g.admit("web-1")
    assert verdict == Verdict(
        allowed=False,
        reason="alert rate limit of 'web-1': burst 3, refill 0.1/s, no token left; retry in 10.0 s",
        retry_after_s=pytest.approx(10.0),
    )
    assert g.admit("web-2") == Verdict(allowed=True)


def test_global_exhaustion_refuses_without_spending_the_vms_budget():
    """When the global bucket is empty, other VMs are refused by it and keep their own tokens for later."""
    clock = FakeClock(T0)
    g = gate(clock)
    assert sum(g.admit(f"vm{n}").allowed for n in range(20)) == 10
    verdict = g.admit("vm15")
    assert not verdict.allowed
    assert verdict.reason is not None and verdict.reason.startswith("global alert rate limit: burst 10, refill 1/s")
    assert verdict.retry_after_s == pytest.approx(1.0)
    assert g.per_key.tokens("vm15") == 3
    clock.advance(3.0)
    assert admitted(g, "vm15", 3) == 3


def test_both_limits_exhausted_reports_the_vm_and_the_longer_wait():
    """A VM over its own limit while the global one is empty too: the reason says both, the wait is the longer."""
    clock = FakeClock(T0)
    g = gate(clock, global_burst=4, global_rate=0.2)
    admitted(g, "noisy", 3)
    g.admit("other")
    verdict = g.admit("noisy")
    assert verdict.reason is not None
    assert verdict.reason.startswith("alert rate limit of 'noisy'")
    assert verdict.reason.endswith("(the global limit is exhausted too)")
    assert verdict.retry_after_s == pytest.approx(10.0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"per_vm_burst": 10},
        {"per_vm_burst": 20},
        {"per_vm_rate": 1.0},
        {"per_vm_rate": 2.0, "per_vm_burst": 1},
    ],
)
def test_one_vm_may_never_be_allowed_the_whole_global_budget(overrides):
    """Per-VM burst or rate at or above the global one is refused at construction."""
    with pytest.raises(InvalidInput, match="must be larger than one VM's"):
        gate(FakeClock(T0), **overrides)


def test_the_per_vm_table_stays_within_its_computed_bound():
    """Under a flood of ever new keys, the per-VM buckets held stay within live_key_bound (+1); none is evicted."""
    clock = FakeClock(T0)
    g = gate(clock, max_keys=10_000)
    bound = g.live_key_bound
    assert bound == pytest.approx(10 + 1.0 * 3 / 0.1)
    largest = 0
    for n in range(5000):
        g.admit(f"spoofed-{n}")
        clock.advance(0.05)
        largest = max(largest, len(g.per_key))
    assert largest <= bound + 1
    assert g.per_key.evicted == 0


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(st.tuples(st.floats(min_value=0, max_value=3), st.integers(0, 30)), max_size=80),
)
def test_gate_admissions_never_exceed_the_global_budget(steps):
    """Whatever the keys and timing, the alerts admitted never exceed global_burst + global_rate * elapsed."""
    clock = FakeClock(T0)
    g = gate(clock)
    total = 0
    for wait, key in steps:
        clock.advance(wait)
        total += g.admit(f"vm{key}").allowed
        elapsed = (clock.now() - T0).total_seconds()
        assert total <= 10 + 1.0 * elapsed + 1e-6


# -------------------------------------------------------------------------------------------------------------- dedup


def test_dedup_window():
    """First sighting is new; repeats inside the window are seen; after the window it is new again."""
    d = Dedup(60)
    assert d.seen("k", at(0)) is False
    assert d.seen("k", at(1)) is True
    assert d.seen("k", at(59.999)) is True
    assert d.seen("other", at(30)) is False
    assert d.seen("k", at(60)) is False
    assert d.seen("k", at(61)) is True


def test_repeats_do_not_extend_the_window():
    """A continuous flood of one key is reported once per window, not once forever."""
    d = Dedup(10)
    reported = [t for t in range(100) if not d.seen("flood", at(t))]
    assert reported == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]


def test_an_earlier_time_counts_as_within_the_window():
    """An event timed before the last report (clock skew, replay) is a repeat."""
    d = Dedup(10)
    d.seen("k", at(100))
    assert d.seen("k", at(50)) is True


def test_dedup_memory_is_bounded():
    """Expired keys are dropped as new ones arrive; past max_keys the oldest is forgotten early."""
    d = Dedup(10, max_keys=50)
    for n in range(1000):
        d.seen(f"k{n}", at(n * 0.001))
        assert len(d) <= 50
    d2 = Dedup(10)
    for n in range(1000):
        d2.seen(f"k{n}", at(n))
    assert len(d2) == 10


def test_dedup_needs_aware_times_and_a_positive_window():
    """A naive time or a window of 0 is refused."""
    with pytest.raises(InvalidInput, match="timezone-aware"):
        Dedup(10).seen("k", dt.datetime(2026, 12, 6, 10, 0))
    with pytest.raises(InvalidInput, match="window_s"):
        Dedup(0)
    with pytest.raises(InvalidInput, match="max_keys"):
        Dedup(1, max_keys=0)
