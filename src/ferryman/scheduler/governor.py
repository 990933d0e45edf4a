"""The anti-thrashing governor: may this migration start now?

Why it exists: migration is when isolation is weakest and costs the most (CPU, network, a paused guest), so the
ability to start, disrupt or repeat migrations is a denial-of-service lever (DESIGN.md, "Threats": thrashing). Every
migration, manual or automatic, passes :meth:`Governor.decide` before it is admitted, and every limit here has a cap
and an end: nothing retries forever.

What it must not do: I/O, read the clock or a global random source. Callers pass plain data (the request, the
migrations running now, the recent attempts), the current time and a random source; the decision is a pure function
of them, so the same inputs explain the same refusal in the audit log.

The checks, each producing a human-readable reason that names the limit and the numbers:

* cluster parallelism, outbound per source host, inbound per destination host, one migration per VM at a time;
  automatic (balancing) requests leave ``manual_reserved_slots`` cluster slots free so an operator or an incident
  playbook (quarantine) can always move a VM;
* per-VM cooldown after its last completed migration;
* per-principal rate over the last minute (refused requests count: hammering the API does not get through);
* exponential back-off after consecutive failed attempts of the VM, with jitter;
* a circuit breaker per VM and per host pair: ``breaker_threshold`` disrupted attempts within ``breaker_window_s``
  refuse further migrations and raise a :class:`ThrashingAlert`.

The breaker closes only with time, when fewer than ``breaker_threshold`` disruptions remain in the window. A success
does not reset it: while it is open nothing of that VM or pair can be admitted anyway, and an attacker who can
disrupt at will could otherwise interleave one success to keep thrashing forever. The back-off, on the other hand,
counts only the failures since the VM's last success.

All times are timezone-aware datetimes (UTC), as the rest of Ferryman uses.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from ferryman.core.errors import InvalidInput

MiB = 1 << 20
GiB = 1 << 30

RATE_WINDOW_S = 60.0
"""The principal rate is counted over this many seconds."""

AttemptOutcome = Literal["done", "rolled_back", "disrupted", "refused"]
_FAILED: frozenset[str] = frozenset({"rolled_back", "disrupted"})


@dataclass(frozen=True)
class GovernorSettings:
    """Limits of the governor. The defaults suit a lab or a small cell; each is explained at its field."""

    max_parallel: int = 4  # migrations running at once in the cluster
    max_outbound_per_host: int = 2  # migrations leaving one host at once (its NIC and CPU are shared by its tenants)
    max_inbound_per_host: int = 2  # migrations arriving at one host at once
    vm_cooldown_s: float = 300.0  # after a VM's migration completes, it stays put this long
    principal_rate: int = 10  # migration requests per principal per minute
    bandwidth_cap_bytes_per_s: int | None = 200 * MiB  # per migration, the runner sets it on QEMU; None: uncapped
    backoff_base_s: float = 5.0  # wait after the first failed attempt; doubles with each further failure
    backoff_max_s: float = 600.0  # the doubling stops here
    jitter: float = 0.2  # retry hints are spread over [wait, wait * (1 + jitter)]
    breaker_threshold: int = 3  # disrupted attempts of one VM or one host pair that open the breaker
    breaker_window_s: float = 3600.0  # ... counted over this sliding window
    progress_timeout_s: float = 60.0  # a step that reports no progress for this long is timed out
    completion_timeout_s_per_gib: float = 120.0  # a transfer may take this long per GiB of memory + disk
    max_attempts_per_request: int = 5  # attempts of one request, the first included, before it is given up
    manual_reserved_slots: int = 1  # cluster slots automatic requests may not take

    def __post_init__(self) -> None:
        positive_ints = ("max_parallel", "max_outbound_per_host", "max_inbound_per_host", "principal_rate")
        for name in (*positive_ints, "breaker_threshold", "max_attempts_per_request"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"governor setting {name} must be at least 1, got {getattr(self, name)}")
        positive_floats = (
            "backoff_base_s",
            "backoff_max_s",
            "breaker_window_s",
            "progress_timeout_s",
            "completion_timeout_s_per_gib",
        )
        for name in positive_floats:
            if not getattr(self, name) > 0:
                raise InvalidInput(f"governor setting {name} must be greater than 0, got {getattr(self, name)}")
        if self.vm_cooldown_s < 0:
            raise InvalidInput(f"governor setting vm_cooldown_s must be >= 0, got {self.vm_cooldown_s}")
        if not 0 <= self.jitter <= 1:
            raise InvalidInput(f"governor setting jitter must be between 0 and 1, got {self.jitter}")
        if self.backoff_max_s < self.backoff_base_s:
            raise InvalidInput(
                f"governor setting backoff_max_s ({self.backoff_max_s}) is below backoff_base_s ({self.backoff_base_s})"
            )
        if self.bandwidth_cap_bytes_per_s is not None and self.bandwidth_cap_bytes_per_s < 1:
            raise InvalidInput("governor setting bandwidth_cap_bytes_per_s must be positive or None (uncapped)")
        if not 0 <= self.manual_reserved_slots < self.max_parallel:
            raise InvalidInput(
                f"governor setting manual_reserved_slots ({self.manual_reserved_slots}) must be >= 0 and below "
                f"max_parallel ({self.max_parallel}), or automatic migrations could never run"
            )


@dataclass(frozen=True)
class MigrationRequest:
    """A request to move ``vm_id`` from ``source`` to ``destination``; ``automatic`` for the balancer's own moves."""

    vm_id: str
    source: str
    destination: str
    principal: str
    automatic: bool = False


@dataclass(frozen=True)
class Active:
    """A migration admitted and not finished (a STUCK one stays active until an operator clears it)."""

    vm_id: str
    source: str
    destination: str
    principal: str | None = None  # with started_at, counts for the principal's rate
    started_at: dt.datetime | None = None


@dataclass(frozen=True)
class Attempt:
    """A finished attempt, including requests the governor refused (outcome ``refused``, started = ended = refusal
    time). ``disrupted``: rolled back because a step failed or timed out, or left STUCK; ``rolled_back``: cancelled,
    vetoed by a pre-hook, or interrupted by a controller restart."""

    vm_id: str
    source: str
    destination: str
    principal: str
    started_at: dt.datetime
    outcome: AttemptOutcome
    ended_at: dt.datetime


@dataclass(frozen=True)
class ThrashingAlert:
    """The circuit breaker is open for a VM or a host pair: a security alert, not just a refusal."""

    kind: Literal["vm", "host_pair"]
    subject: str  # the VM id, or "host-a<->host-b" (sorted: the pair is undirected)
    count: int  # disrupted attempts in the window
    window_s: float
    until: dt.datetime  # when the breaker closes if nothing else is disrupted

    @property
    def message(self) -> str:
        what = f"VM {self.subject}" if self.kind == "vm" else f"host pair {self.subject}"
        return (
            f"possible thrashing: {self.count} disrupted migrations of {what} in the last {self.window_s:g} s; "
            f"migrations refused until {self.until.isoformat()}"
        )


@dataclass(frozen=True)
class Decision:
    """The governor's answer. A refusal has at least one reason.

    ``retry_after_s``: no retry can succeed sooner (a lower bound, jittered); None when allowed, when the refusal
    waits only on other migrations ending, or when it is ``final`` (retrying the same request can never succeed).
    """

    allowed: bool
    reasons: tuple[str, ...] = ()
    retry_after_s: float | None = None
    alerts: tuple[ThrashingAlert, ...] = ()
    final: bool = False

    @property
    def alert(self) -> ThrashingAlert | None:
        """The broadest alert: a host pair before a single VM."""
        return self.alerts[0] if self.alerts else None


@dataclass(frozen=True)
class _Refusal:
    reason: str
    retry_after_s: float | None = None
    alert: ThrashingAlert | None = None
    final: bool = False


def pair_key(a: str, b: str) -> str:
    """The undirected name of a host pair: disruptions on a link count in both directions."""
    first, second = sorted((a, b))
    return f"{first}<->{second}"


class Governor:
    """Admission against thrashing. ``random`` returns a float in [0, 1) (e.g. ``random.Random(seed).random``);
    it is only used to spread back-off hints."""

    def __init__(self, settings: GovernorSettings, random: Callable[[], float]) -> None:
        self.settings = settings
        self._random = random

    @property
    def progress_timeout_s(self) -> float:
        """How long a step may go without reporting progress before it is timed out."""
        return self.settings.progress_timeout_s

    def completion_timeout_s(self, size_bytes: int) -> float:
        """How long a transfer of ``size_bytes`` (memory + disk) may take in all: ``completion_timeout_s_per_gib``
        per GiB, at least one GiB's worth, and never less than twice what the bandwidth cap needs."""
        s = self.settings
        timeout = s.completion_timeout_s_per_gib * max(size_bytes / GiB, 1.0)
        if s.bandwidth_cap_bytes_per_s is not None:
            timeout = max(timeout, 2 * size_bytes / s.bandwidth_cap_bytes_per_s)
        return timeout

    def backoff_s(self, failures: int) -> float:
        """The wait after ``failures`` consecutive failed attempts, before jitter: base * 2^(n-1), capped."""
        if failures < 1:
            return 0.0
        s = self.settings
        exponent = min(failures - 1, 62)  # 2^62 * base is far past any cap; avoids float overflow
        return min(s.backoff_base_s * float(2**exponent), s.backoff_max_s)

    def decide(
        self,
        request: MigrationRequest,
        *,
        now: dt.datetime,
        active: Sequence[Active],
        history: Iterable[Attempt],
        attempt: int = 1,
    ) -> Decision:
        """Whether ``request`` may start at ``now``. ``attempt`` counts the attempts of this request, this one
        included; ``history`` holds finished attempts (any age: the governor looks only at the windows it needs)."""
        past = tuple(history)
        refusals = [
            r
            for r in (
                self._check_request(request, attempt),
                *self._check_capacity(request, active),
                self._check_cooldown(request, now, past),
                self._check_rate(request, now, active, past),
                self._check_backoff(request, now, past),
                self._check_breaker_pair(request, now, past),
                self._check_breaker_vm(request, now, past),
            )
            if r is not None
        ]
        if not refusals:
            return Decision(allowed=True)
        final = any(r.final for r in refusals)
        waits = [r.retry_after_s for r in refusals if r.retry_after_s is not None]
        return Decision(
            allowed=False,
            reasons=tuple(r.reason for r in refusals),
            retry_after_s=None if final or not waits else max(waits),
            alerts=tuple(r.alert for r in refusals if r.alert is not None),
            final=final,
        )

    # ----------------------------------------------------------------------------------------------------- checks

    def _check_request(self, request: MigrationRequest, attempt: int) -> _Refusal | None:
        if request.source == request.destination:
            return _Refusal(f"source and destination are the same host {request.source!r}", final=True)
        limit = self.settings.max_attempts_per_request
        if attempt > limit:
            return _Refusal(
                f"request for VM {request.vm_id} gave up: attempt {attempt} exceeds max_attempts_per_request={limit}",
                final=True,
            )
        return None

    def _check_capacity(self, request: MigrationRequest, active: Sequence[Active]) -> list[_Refusal]:
        s = self.settings
        found: list[_Refusal] = []
        if any(a.vm_id == request.vm_id for a in active):
            found.append(_Refusal(f"VM {request.vm_id} is already migrating (one migration per VM at a time)"))
        limit = s.max_parallel - (s.manual_reserved_slots if request.automatic else 0)
        if len(active) >= limit:
            kept = (
                f", {s.manual_reserved_slots} of max_parallel={s.max_parallel} kept for manual migrations"
                if request.automatic and s.manual_reserved_slots
                else ""
            )
            found.append(
                _Refusal(
                    f"cluster limit: {len(active)} migrations running, limit {limit} "
                    f"(max_parallel={s.max_parallel}{kept})"
                )
            )
        outbound = sum(1 for a in active if a.source == request.source)
        if outbound >= s.max_outbound_per_host:
            found.append(
                _Refusal(
                    f"outbound limit of host {request.source}: {outbound} migrations leaving it, "
                    f"max_outbound_per_host={s.max_outbound_per_host}"
                )
            )
        inbound = sum(1 for a in active if a.destination == request.destination)
        if inbound >= s.max_inbound_per_host:
            found.append(
                _Refusal(
                    f"inbound limit of host {request.destination}: {inbound} migrations arriving, "
                    f"max_inbound_per_host={s.max_inbound_per_host}"
                )
            )
        return found

    def _check_cooldown(self, request: MigrationRequest, now: dt.datetime, past: Sequence[Attempt]) -> _Refusal | None:
        cooldown = self.settings.vm_cooldown_s
        done = [a.ended_at for a in past if a.vm_id == request.vm_id and a.outcome == "done"]
        if not done or cooldown == 0:
            return None
        last = max(done)
        elapsed = (now - last).total_seconds()
        remaining = cooldown - elapsed
        if remaining <= 0:
            return None
        return _Refusal(
            f"VM {request.vm_id} cooldown: its last migration ended {max(elapsed, 0.0):.0f} s ago, "
            f"vm_cooldown_s={cooldown:g}; {remaining:.0f} s left",
            retry_after_s=remaining,
        )

    def _check_rate(
        self, request: MigrationRequest, now: dt.datetime, active: Sequence[Active], past: Sequence[Attempt]
    ) -> _Refusal | None:
        rate = self.settings.principal_rate
        since = now - dt.timedelta(seconds=RATE_WINDOW_S)
        times = sorted(
            [a.started_at for a in past if a.principal == request.principal and a.started_at > since]
            + [
                a.started_at
                for a in active
                if a.principal == request.principal and a.started_at is not None and a.started_at > since
            ]
        )
        if len(times) < rate:
            return None
        # The window must lose len - rate + 1 requests before one more fits: wait for the (len - rate)-th oldest.
        frees_at = times[len(times) - rate] + dt.timedelta(seconds=RATE_WINDOW_S)
        return _Refusal(
            f"principal {request.principal} rate limit: {len(times)} requests in the last {RATE_WINDOW_S:g} s, "
            f"principal_rate={rate}/min",
            retry_after_s=(frees_at - now).total_seconds(),
        )

    def _check_backoff(self, request: MigrationRequest, now: dt.datetime, past: Sequence[Attempt]) -> _Refusal | None:
        mine = sorted((a for a in past if a.vm_id == request.vm_id), key=lambda a: (a.ended_at, a.started_at))
        failures = 0
        last_failure: dt.datetime | None = None
        for a in reversed(mine):
            if a.outcome == "done":
                break
            if a.outcome in _FAILED:
                failures += 1
                last_failure = a.ended_at if last_failure is None else last_failure
        if last_failure is None:
            return None
        wait = self.backoff_s(failures)
        remaining = wait - (now - last_failure).total_seconds()
        if remaining <= 0:
            return None
        s = self.settings
        spread = wait * s.jitter * min(max(self._random(), 0.0), 1.0)
        return _Refusal(
            f"VM {request.vm_id} back-off: {failures} consecutive failed attempts, wait {wait:g} s "
            f"(backoff_base_s={s.backoff_base_s:g} * 2^{failures - 1}, backoff_max_s={s.backoff_max_s:g}); "
            f"{remaining:.0f} s left",
            retry_after_s=remaining + spread,
        )

    def _check_breaker_vm(
        self, request: MigrationRequest, now: dt.datetime, past: Sequence[Attempt]
    ) -> _Refusal | None:
        times = [a.ended_at for a in past if a.outcome == "disrupted" and a.vm_id == request.vm_id]
        return self._breaker("vm", request.vm_id, f"VM {request.vm_id}", times, now)

    def _check_breaker_pair(
        self, request: MigrationRequest, now: dt.datetime, past: Sequence[Attempt]
    ) -> _Refusal | None:
        key = pair_key(request.source, request.destination)
        times = [a.ended_at for a in past if a.outcome == "disrupted" and pair_key(a.source, a.destination) == key]
        return self._breaker("host_pair", key, f"hosts {key}", times, now)

    def _breaker(
        self, kind: Literal["vm", "host_pair"], subject: str, label: str, times: list[dt.datetime], now: dt.datetime
    ) -> _Refusal | None:
        s = self.settings
        window = dt.timedelta(seconds=s.breaker_window_s)
        recent = sorted(t for t in times if t > now - window)
        if len(recent) < s.breaker_threshold:
            return None
        # It closes when the window holds threshold - 1 disruptions: when the (len - threshold)-th oldest leaves it.
        until = recent[len(recent) - s.breaker_threshold] + window
        alert = ThrashingAlert(kind=kind, subject=subject, count=len(recent), window_s=s.breaker_window_s, until=until)
        return _Refusal(
            f"circuit breaker open for {label}: {len(recent)} disrupted attempts in the last {s.breaker_window_s:g} s, "
            f"breaker_threshold={s.breaker_threshold}; closes at {until.isoformat()}",
            retry_after_s=(until - now).total_seconds(),
            alert=alert,
        )
