"""Limits on what alerts may set off: token buckets per key and global, and deduplication over a time window.

Why it exists: alerts start playbooks, and playbooks isolate, pause and migrate VMs. Whoever can make a sensor fire
(an attacker spoofing addresses in traffic that Suricata watches, a tenant tripping Falco rules in its own guest)
could otherwise turn an alert storm into a thrashing or denial-of-service lever (DESIGN.md, "Threats"). So every
alert passes :meth:`AlertGate.admit` before it may act, repeats collapse in :class:`Dedup`, and every structure here
has a memory bound.

What it must not do: I/O, or read the system clock: time comes from an injected :class:`~ferryman.core.clock.Clock`
(the limiter and the gate) or from the caller (``Dedup.seen(key, at)``; pass the receive time, not the event's own
claimed time, which the sender controls). Not thread-safe: the controller calls it from one event loop.

Token buckets (:class:`RateLimiter`): each key has a bucket of ``burst`` tokens refilled at ``rate_per_s``; an
action takes one token. A wall clock that steps backwards refills nothing (elapsed time is clamped at 0); one that
jumps forwards refills at most to ``burst``, so a clock fault costs at most one burst. Memory: a bucket untouched
for ``burst / rate_per_s`` seconds is full again, which is exactly what an unknown key is, so forgetting it changes
no decision; such buckets are dropped as keys are touched (least recently used first, amortised O(1)). If
``max_keys`` buckets are all still refilling, the least recently used one is evicted anyway (counted in
:attr:`RateLimiter.evicted`): that key is forgiven its debt, failing open on that one key rather than refusing every
new key, which would let a flood of fresh keys blind the limiter to everyone else. The global bucket of the gate is
never evicted, so the total stays bounded either way.

The gate (:class:`AlertGate`): an alert is admitted only if both its key's bucket and the global bucket hold a token,
and only then are both taken. Hence:

* a refused alert takes nothing: a VM refused by its own limit does not drain the global budget other VMs need, and
  an alert refused by the global limit does not use up its VM's budget;
* one key takes at most ``per_vm_burst + per_vm_rate * t`` of the global budget over ``t`` seconds, and the settings
  must leave the global budget strictly larger than one key's (checked at construction), so one noisy VM can never
  take it all; many noisy keys together can, and then the global cap is what bounds the actions;
* refusals are not counted against the key (unlike the governor's principal rate): keys are VMs named by sensors,
  not authenticated callers, and punishing a VM for alerts others trigger about it would let an attacker keep that
  VM's genuine alerts out indefinitely;
* the per-key table only grows on admissions, and admissions are bounded by the global bucket, so it holds at most
  ``global_burst + global_rate * per_vm_burst / per_vm_rate`` live keys; with ``max_keys`` above that no eviction
  ever happens (:attr:`AlertGate.live_key_bound`).

Deduplication (:class:`Dedup`): ``seen(key, at)`` is true if ``key`` was last *reported* (seen returned false) less
than ``window_s`` before ``at``. Repeats within the window do not extend it, so a continuous flood of one alert is
reported once per window rather than once forever. Memory: entries older than the window are dropped as new keys
arrive; past ``max_keys`` the oldest entry is forgotten early, which can only let one repeat through (the gate still
bounds it).
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from dataclasses import dataclass

from ferryman.core.clock import Clock
from ferryman.core.errors import InvalidInput

__all__ = ["DEFAULT_MAX_KEYS", "AlertGate", "Dedup", "RateLimiter", "Verdict"]

DEFAULT_MAX_KEYS = 10_000
"""Buckets one limiter keeps (each a few hundred bytes)."""
DEFAULT_DEDUP_KEYS = 100_000
"""Keys a :class:`Dedup` remembers."""
_EPSILON = 1e-9  # tokens lost to float rounding: a bucket refilled to 0.9999999999 holds a token
_MAX_KEY_SHOWN = 64


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or value == float("inf"):
        raise InvalidInput(f"{name} must be a finite number greater than 0, got {value!r}")
    return float(value)


def _show_key(key: str) -> str:
    return repr(key if len(key) <= _MAX_KEY_SHOWN else key[: _MAX_KEY_SHOWN - 1] + "…")


class _Bucket:
    __slots__ = ("at", "tokens")

    def __init__(self, tokens: float, at: dt.datetime) -> None:
        self.tokens = tokens
        self.at = at


class RateLimiter:
    """Token buckets keyed by string: at most ``burst`` actions at once per key, refilled at ``rate_per_s``."""

    def __init__(self, rate_per_s: float, burst: float, clock: Clock, *, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.rate = _positive("rate_per_s", rate_per_s)
        self.burst = _positive("burst", burst)
        if self.burst < 1:
            raise InvalidInput(f"burst must be at least 1 (one action), got {burst!r}")
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise InvalidInput(f"max_keys must be an integer of at least 1, got {max_keys!r}")
        self.max_keys = max_keys
        self.evicted = 0
        """Buckets dropped while still refilling because ``max_keys`` was reached (each forgave its key's debt)."""
        self._clock = clock
        self._refill_s = self.burst / self.rate  # an empty bucket is full again after this long
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently taken first

    def __len__(self) -> int:
        """Buckets held (keys whose bucket is not known to be full)."""
        return len(self._buckets)

    def acquire(self, key: str) -> float:
        """Take a token of ``key``: 0.0 if taken, else the seconds until one is available (nothing is taken)."""
        now = self._clock.now()
        wait = self._wait(key, now)
        if wait == 0.0:
            self._take(key, now)
        return wait

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` has a token (0.0: it has one now); takes nothing."""
        return self._wait(key, self._clock.now())

    def tokens(self, key: str) -> float:
        """The tokens ``key`` holds now (``burst`` for a key not held)."""
        return self._level(key, self._clock.now())

    # ---------------------------------------------------------------------- used by AlertGate at one instant

    def _level(self, key: str, now: dt.datetime) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            return self.burst
        elapsed = max((now - bucket.at).total_seconds(), 0.0)
        return min(self.burst, bucket.tokens + elapsed * self.rate)

    def _wait(self, key: str, now: dt.datetime) -> float:
        missing = 1.0 - self._level(key, now)
        return 0.0 if missing <= _EPSILON else missing / self.rate

    def _take(self, key: str, now: dt.datetime) -> None:
        """Take one token of ``key``; the caller has checked ``_wait(key, now) == 0``."""
        level = self._level(key, now)
        self._forget_idle(now)
        bucket = self._buckets.pop(key, None)
        if bucket is None and len(self._buckets) >= self.max_keys:
            self._buckets.popitem(last=False)
            self.evicted += 1
        self._buckets[key] = _Bucket(max(level - 1.0, 0.0), now)

    def _forget_idle(self, now: dt.datetime) -> None:
        # Buckets are kept in the order they were last taken from, so the idle ones are at the front.
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if (now - oldest.at).total_seconds() < self._refill_s:
                return
            self._buckets.popitem(last=False)


@dataclass(frozen=True)
class Verdict:
    """The gate's answer. ``retry_after_s``: 0.0 when allowed, else no retry can succeed sooner (a lower bound:
    other keys may take the global tokens first)."""

    allowed: bool
    reason: str | None = None
    retry_after_s: float = 0.0


class AlertGate:
    """Admission of alerts: a bucket per key (normally the VM the alert maps to, or the host) and a global bucket.
    See the module docstring for why a refusal takes nothing and why the global budget must exceed one key's."""

    GLOBAL_KEY = "*"

    def __init__(
        self,
        per_vm_rate: float,
        per_vm_burst: float,
        global_rate: float,
        global_burst: float,
        clock: Clock,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self.per_key = RateLimiter(per_vm_rate, per_vm_burst, clock, max_keys=max_keys)
        self.total = RateLimiter(global_rate, global_burst, clock, max_keys=1)
        if not (self.per_key.rate < self.total.rate and self.per_key.burst < self.total.burst):
            raise InvalidInput(
                f"alert limits: the global budget (burst {global_burst:g}, {global_rate:g}/s) must be larger than "
                f"one VM's (burst {per_vm_burst:g}, {per_vm_rate:g}/s) in burst and rate, or one VM could take it all"
            )
        self._clock = clock

    @property
    def live_key_bound(self) -> float:
        """The most per-key buckets that can be refilling at once: admissions in one per-key refill period."""
        refill_s = self.per_key.burst / self.per_key.rate
        return self.total.burst + self.total.rate * refill_s

    def admit(self, key: str) -> Verdict:
        """Whether an alert for ``key`` may act now; if so, one token of ``key`` and one global token are taken."""
        now = self._clock.now()
        own = self.per_key._wait(key, now)
        total = self.total._wait(self.GLOBAL_KEY, now)
        if own == 0.0 and total == 0.0:
            self.per_key._take(key, now)
            self.total._take(self.GLOBAL_KEY, now)
            return Verdict(allowed=True)
        wait = max(own, total)
        if own > 0.0:
            limiter, what = self.per_key, f"alert rate limit of {_show_key(key)}"
        else:
            limiter, what = self.total, "global alert rate limit"
        reason = f"{what}: burst {limiter.burst:g}, refill {limiter.rate:g}/s, no token left; retry in {wait:.1f} s" + (
            " (the global limit is exhausted too)" if own > 0.0 and total > 0.0 else ""
        )
        return Verdict(allowed=False, reason=reason, retry_after_s=wait)


class Dedup:
    """Which alert keys were reported within the last ``window_s`` seconds (see the module docstring)."""

    def __init__(self, window_s: float, *, max_keys: int = DEFAULT_DEDUP_KEYS) -> None:
        self.window = dt.timedelta(seconds=_positive("window_s", window_s))
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise InvalidInput(f"max_keys must be an integer of at least 1, got {max_keys!r}")
        self.max_keys = max_keys
        self._reported: OrderedDict[str, dt.datetime] = OrderedDict()  # oldest report first

    def __len__(self) -> int:
        return len(self._reported)

    def seen(self, dedup_key: str, at: dt.datetime) -> bool:
        """True if ``dedup_key`` was reported less than ``window_s`` before ``at`` (``at`` earlier than that report
        counts as within); otherwise record ``at`` as its report and return False."""
        if at.tzinfo is None or at.utcoffset() is None:
            raise InvalidInput("Dedup.seen: the time must be timezone-aware")
        last = self._reported.get(dedup_key)
        if last is not None and at - last < self.window:
            return True
        self._forget_old(at)
        self._reported.pop(dedup_key, None)
        if len(self._reported) >= self.max_keys:
            self._reported.popitem(last=False)
        self._reported[dedup_key] = at
        return False

    def _forget_old(self, at: dt.datetime) -> None:
        while self._reported:
            oldest = next(iter(self._reported.values()))
            if at - oldest < self.window:
                return
            self._reported.popitem(last=False)
