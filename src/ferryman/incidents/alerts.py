"""Alerts in: Suricata EVE JSON, Falco JSON and a small generic form, normalised into one :class:`Alert`.

Why it exists: each detection tool speaks its own format, and the incident layer needs one shape: which rule fired,
how bad it is (:class:`IncidentSeverity`), when (aware UTC), what the event names that may identify a VM (IP and MAC
addresses, a VM name or id) or a hypervisor host, and a :attr:`Alert.dedup_key` under which repeats of the same
attack collapse.

What it must not do: I/O, read the clock, or decide which VM an address belongs to: the controller maps ``ips``,
``macs``, ``vm`` and ``host`` to CMDB objects. The input is untrusted (anyone able to reach a sensor shapes it), so
every refusal is an :class:`~ferryman.core.errors.InvalidInput` with a one-line message naming the source, the event's
index in a batch and the field; values are quoted truncated, never echoed whole; free text is cut to a bound and its
control characters replaced (it ends up in logs and terminals); :attr:`Alert.raw` keeps the event only up to
:data:`MAX_RAW_BYTES`.

Formats (fields read; everything else is kept in ``raw`` only):

* **Suricata** EVE JSON, ``event_type: "alert"`` records only (a flow, dns, http... record is refused as "not an
  alert": filter the EVE output to alerts at the shipper). Required: ``timestamp``, ``src_ip``, ``dest_ip``,
  ``alert.signature_id``, ``alert.signature``, ``alert.severity``; optional: ``src_port``, ``dest_port``, ``proto``,
  ``alert.gid``, ``alert.rev``, ``alert.category``, ``alert.action``, ``alert.metadata``, ``ether.src_mac``,
  ``ether.dest_mac``. ``ips`` is (src_ip, dest_ip), ``macs`` (src_mac, dest_mac) when present; ``vm`` and ``host`` are
  None (EVE's own ``host`` is the sensor's name, not the subject of the alert).
* **Falco** JSON output. Required: ``rule``, ``priority``, ``time``; optional: ``output`` (the summary; the rule name
  if absent), ``hostname`` (taken as the host name), ``output_fields`` (``fd.cip`` and ``fd.sip``, client then server,
  become ``ips``; ``vm.id`` or else ``vm.name``, extra fields an operator adds with Falco's ``append_output``, become
  ``vm``), ``source``, ``tags``. Falco running inside a guest reports the guest's own hostname, which the tenant
  chooses: the controller must honour ``host`` only from sensors it knows run on hypervisor hosts.
* **generic**: ``{"severity": "high", "rule": "...", "summary": "...", "vm": "web-1", "ip": "10.50.1.10",
  "mac": "52:54:00:12:34:56", "host": "host-b", "time": "2026-12-06T10:00:00Z"}``; ``severity`` and ``rule`` are
  required, ``summary`` defaults to the rule, at least one of ``vm``, ``ip``, ``mac``, ``host`` is required, ``time``
  defaults to the receive time the caller passes. Unknown fields are refused (a misspelt ``vm_name`` must not
  silently lose the VM).

Severity: Suricata's ``alert.severity`` is a priority, 1 the highest: 1 → high, 2 → medium, 3 and above → low; a
severity-1 alert whose rule declares ``metadata.signature_severity: [Critical]`` (the Emerging Threats convention) →
critical. Both come from the ruleset, never from the traffic; critical pauses VMs in the default playbook, so it takes
both. Falco: Emergency, Alert, Critical → critical; Error → high; Warning → medium; Notice, Informational, Debug → low.

Normalisation: times parse as ISO 8601 (Suricata's ``+0000`` offsets and Falco's nanoseconds included, digits past
the microsecond dropped); a time without offset is taken as UTC, like :func:`ferryman.core.clock.parse_time`. IP
addresses in their canonical text (IPv6 compressed, as the CMDB stores NICs), MACs lowercase with colons, host names
lowercase. A VM reference is a Ferryman name or a UUID (canonical form).

Dedup key: ``<source>:<sha256>`` over the rule, the severity, the sorted IP and MAC addresses, the VM and the host.
Ports, flow ids, process ids and times are left out, so the same attack repeated (a new source port per connection)
maps to one key, and a reply in the other direction to the same key as the request; the severity is in, so an
escalation is never deduplicated away.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import ipaddress
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ferryman.core.errors import InvalidInput
from ferryman.core.models import NAME_RE

__all__ = [
    "MAX_EVENTS",
    "MAX_RAW_BYTES",
    "SOURCES",
    "Alert",
    "AlertSource",
    "IncidentSeverity",
    "parse",
    "parse_falco",
    "parse_generic",
    "parse_suricata",
]

AlertSource = Literal["suricata", "falco", "generic"]
SOURCES: tuple[AlertSource, ...] = get_args(AlertSource)

MAX_EVENTS = 1000
"""Events in one call of :func:`parse`; a larger batch is refused whole."""
MAX_RAW_BYTES = 16 * 1024
"""An event larger than this (as compact JSON) is kept in ``raw`` as its top-level scalars only, marked truncated."""
MAX_SUMMARY = 1000
"""Characters of a summary; longer ones are cut (Falco outputs can be long)."""
MAX_RULE = 512
"""Characters of a rule name; longer ones are refused (a rule name identifies, so it is never cut)."""
_MAX_SHOWN = 40  # characters of a refused value quoted in an error message
_MAX_TIME = 64  # characters of a time string
_RAW_KEPT_KEYS = 32
_RAW_KEPT_TEXT = 256


# ---------------------------------------------------------------------------------------------------------- severity


class IncidentSeverity(enum.StrEnum):
    """How bad an incident is. Ordered by rank (``LOW < CRITICAL``), not alphabetically: comparing with anything but
    another IncidentSeverity raises TypeError, so ``"critical" < "high"`` string ordering can never creep in."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """0 for low up to 3 for critical."""
        return _RANK[self]

    def __lt__(self, other: object) -> bool:
        return self.rank < _rank_of(other)

    def __le__(self, other: object) -> bool:
        return self.rank <= _rank_of(other)

    def __gt__(self, other: object) -> bool:
        return self.rank > _rank_of(other)

    def __ge__(self, other: object) -> bool:
        return self.rank >= _rank_of(other)

    @classmethod
    def parse(cls, value: object) -> IncidentSeverity:
        """The severity spelt ``value`` (case-insensitive); InvalidInput naming the allowed values otherwise."""
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        raise InvalidInput(f"bad severity {_show(value)}; allowed: {', '.join(s.value for s in cls)}")

    @staticmethod
    def highest(*severities: IncidentSeverity) -> IncidentSeverity:
        """The most severe of ``severities`` (at least one)."""
        if not severities:
            raise InvalidInput("highest() needs at least one severity")
        return max(severities, key=lambda s: s.rank)


_RANK: dict[IncidentSeverity, int] = {s: i for i, s in enumerate(IncidentSeverity)}


def _rank_of(other: object) -> int:
    if isinstance(other, IncidentSeverity):
        return other.rank
    raise TypeError(f"cannot order IncidentSeverity against {type(other).__name__}")


_SURICATA_CRITICAL = "critical"  # metadata.signature_severity value that, with severity 1, means critical

_FALCO_PRIORITIES: dict[str, IncidentSeverity] = {
    "emergency": IncidentSeverity.CRITICAL,
    "alert": IncidentSeverity.CRITICAL,
    "critical": IncidentSeverity.CRITICAL,
    "error": IncidentSeverity.HIGH,
    "warning": IncidentSeverity.MEDIUM,
    "notice": IncidentSeverity.LOW,
    "informational": IncidentSeverity.LOW,
    "info": IncidentSeverity.LOW,  # how falco.yaml spells it
    "debug": IncidentSeverity.LOW,
}


def suricata_severity(priority: int, signature_severity: tuple[str, ...] = ()) -> IncidentSeverity:
    """The severity of a Suricata alert of ``alert.severity`` ``priority`` (1 highest) whose rule metadata declares
    ``signature_severity`` (see the module docstring)."""
    if priority <= 1:
        critical = any(s.strip().lower() == _SURICATA_CRITICAL for s in signature_severity)
        return IncidentSeverity.CRITICAL if critical else IncidentSeverity.HIGH
    return IncidentSeverity.MEDIUM if priority == 2 else IncidentSeverity.LOW


# ------------------------------------------------------------------------------------------------------------- alert


@dataclass(frozen=True)
class Alert:
    """One normalised alert. ``dedup_key`` is computed from the other fields (see the module docstring), never
    given; ``raw`` (the original event, bounded) takes no part in equality or hashing."""

    source: AlertSource
    rule: str
    severity: IncidentSeverity
    summary: str
    time: dt.datetime
    ips: tuple[str, ...] = ()
    macs: tuple[str, ...] = ()
    vm: str | None = None
    host: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    dedup_key: str = field(init=False)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise InvalidInput(f"bad alert source {_show(self.source)}; allowed: {', '.join(SOURCES)}")
        if not isinstance(self.severity, IncidentSeverity):
            object.__setattr__(self, "severity", IncidentSeverity.parse(self.severity))
        object.__setattr__(self, "ips", tuple(self.ips))
        object.__setattr__(self, "macs", tuple(self.macs))
        if self.time.tzinfo is None or self.time.utcoffset() is None:
            raise InvalidInput("alert time must be timezone-aware")
        object.__setattr__(self, "time", self.time.astimezone(dt.UTC))
        object.__setattr__(self, "dedup_key", _dedup_key(self))

    @property
    def identifies(self) -> bool:
        """Whether the alert names anything the controller could map to a VM or a host."""
        return bool(self.ips or self.macs or self.vm or self.host)


def _dedup_key(alert: Alert) -> str:
    identity = [
        alert.rule,
        alert.severity.value,
        sorted(alert.ips),
        sorted(alert.macs),
        alert.vm,
        alert.host,
    ]
    text = json.dumps(identity, ensure_ascii=True, separators=(",", ":"))
    return f"{alert.source}:{hashlib.sha256(text.encode()).hexdigest()}"


# ----------------------------------------------------------------------------------------------------------- reading

_MISSING = object()
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_MAC = re.compile(r"[0-9a-f]{2}([:-])[0-9a-f]{2}(?:\1[0-9a-f]{2}){4}")
_HOST_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_NOT_AVAILABLE = frozenset({"", "<NA>", "N/A"})  # how Falco fills a field it could not resolve


def _show(value: object) -> str:
    """``value`` quoted for an error message (a string) or its type's name (anything else), cut short."""
    return _cut(repr(value) if isinstance(value, str) else type(value).__name__)


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 1] + "…"


def _clean(text: str, limit: int) -> str:
    """``text`` with control characters replaced by spaces, stripped and cut to ``limit`` characters."""
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Event:
    """Typed access to one untrusted event; each failure is an InvalidInput naming source, index and field."""

    def __init__(self, source: AlertSource, event: object, index: int | None) -> None:
        self.source = source
        self.where = f"{source} event" + (f" [{index}]" if index is not None else "")
        if not isinstance(event, dict):
            raise InvalidInput(f"{self.where}: expected a JSON object, got {type(event).__name__}")
        self.data: dict[str, Any] = event
        # Falco fills a field it could not resolve with "<NA>"; elsewhere such a value is a mistake, not an absence.
        self.unset = _NOT_AVAILABLE if source == "falco" else frozenset()

    def fail(self, path: tuple[str, ...], problem: str) -> InvalidInput:
        label = ".".join(path)
        return InvalidInput(f"{self.where}: {label}: {problem}" if label else f"{self.where}: {problem}")

    def get(self, path: tuple[str, ...]) -> object:
        node: object = self.data
        for depth, key in enumerate(path):
            if not isinstance(node, dict):
                raise self.fail(path[:depth], f"expected a JSON object, got {type(node).__name__}")
            node = node.get(key, _MISSING)
            if node is _MISSING:
                return _MISSING
        return node

    def text(self, path: tuple[str, ...], *, required: bool = True) -> str | None:
        value = self.get(path)
        if value is _MISSING or value is None:
            if required:
                raise self.fail(path, "missing")
            return None
        if not isinstance(value, str):
            raise self.fail(path, f"expected a string, got {type(value).__name__}")
        return value

    def integer(
        self, path: tuple[str, ...], *, required: bool = True, low: int = 0, high: int | None = None
    ) -> int | None:
        value = self.get(path)
        if value is _MISSING or value is None:
            if required:
                raise self.fail(path, "missing")
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"expected an integer, got {type(value).__name__}")
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            shown = str(value) if abs(value) < 10**18 else "the number"  # never print a 5000-digit integer
            raise self.fail(path, f"{shown} is out of range ({bound})")
        return value

    def strings(self, path: tuple[str, ...]) -> tuple[str, ...]:
        """An optional list of strings (empty when absent)."""
        value = self.get(path)
        if value is _MISSING or value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(path, f"expected a list of strings, got {type(value).__name__}")
        return tuple(value)

    def rule(self, path: tuple[str, ...]) -> str:
        name = self.text(path)
        assert name is not None
        if len(name) > MAX_RULE:
            raise self.fail(path, f"{len(name)} characters, at most {MAX_RULE}")
        cleaned = _clean(name, MAX_RULE)
        if not cleaned:
            raise self.fail(path, "empty")
        return cleaned

    def time(self, path: tuple[str, ...], default: dt.datetime | None = None) -> dt.datetime:
        text = self.text(path, required=default is None)
        if text is None:
            assert default is not None
            return default.astimezone(dt.UTC)
        if len(text) > _MAX_TIME:
            raise self.fail(path, f"{len(text)} characters, not an ISO-8601 time")
        try:
            value = dt.datetime.fromisoformat(text.strip())
            if value.tzinfo is None:
                value = value.replace(tzinfo=dt.UTC)
            return value.astimezone(dt.UTC)
        except (ValueError, OverflowError):
            raise self.fail(path, f"{_show(text)} is not an ISO-8601 time") from None

    def ip(self, path: tuple[str, ...], *, required: bool = True) -> str | None:
        text = self.text(path, required=required)
        if text is None or (not required and text in self.unset):
            return None
        try:
            return str(ipaddress.ip_address(text.strip()))
        except ValueError:
            raise self.fail(path, f"{_show(text)} is not an IP address") from None

    def mac(self, path: tuple[str, ...]) -> str | None:
        text = self.text(path, required=False)
        if text is None:
            return None
        lowered = text.strip().lower()
        if not _MAC.fullmatch(lowered):
            raise self.fail(path, f"{_show(text)} is not a MAC address (six hex pairs separated by ':' or '-')")
        return lowered.replace("-", ":")

    def vm(self, path: tuple[str, ...]) -> str | None:
        text = self.text(path, required=False)
        if text is None or text in self.unset:
            return None
        if NAME_RE.fullmatch(text):
            return text
        try:
            return str(uuid.UUID(text))
        except ValueError:
            pass
        raise self.fail(path, f"{_show(text)} is neither a VM name (lowercase letters, digits, '-') nor a VM id (UUID)")

    def host(self, path: tuple[str, ...]) -> str | None:
        text = self.text(path, required=False)
        if text is None or text in self.unset:
            return None
        name = text.strip().lower().removesuffix(".")
        labels = name.split(".")
        if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
            raise self.fail(path, f"{_show(text)} is not a host name")
        return name

    def raw(self) -> dict[str, Any]:
        """A deep copy of the event as plain JSON, or its top-level scalars if it is larger than MAX_RAW_BYTES."""
        try:
            text = json.dumps(self.data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            size = len(text.encode())
            if size <= MAX_RAW_BYTES:
                copy: dict[str, Any] = json.loads(text)
                return copy
        except (TypeError, ValueError):
            raise self.fail((), "not plain JSON (NaN, Infinity or a non-JSON value)") from None
        except RecursionError:
            raise self.fail((), "nested too deeply") from None
        kept: dict[str, Any] = {"_truncated": True, "_bytes": size}
        for key, value in list(self.data.items())[:_RAW_KEPT_KEYS]:
            if isinstance(value, str):
                kept[str(key)[:_RAW_KEPT_TEXT]] = value[:_RAW_KEPT_TEXT]
            elif value is None or isinstance(value, bool | int | float):
                kept[str(key)[:_RAW_KEPT_TEXT]] = value
        return kept


def _unique(values: list[str | None]) -> tuple[str, ...]:
    """The given values without None and repeats, in order."""
    return tuple(dict.fromkeys(v for v in values if v is not None))


# ----------------------------------------------------------------------------------------------------------- parsers


def parse_suricata(event: Mapping[str, Any]) -> Alert:
    """An :class:`Alert` from one Suricata EVE JSON ``alert`` record; InvalidInput for anything else."""
    return _suricata(_Event("suricata", event, None))


def parse_falco(event: Mapping[str, Any]) -> Alert:
    """An :class:`Alert` from one Falco JSON output record."""
    return _falco(_Event("falco", event, None))


def parse_generic(event: Mapping[str, Any], *, received: dt.datetime | None = None) -> Alert:
    """An :class:`Alert` from the generic form; ``received`` (aware) is its time if it gives none."""
    return _generic(_Event("generic", event, None), received)


def parse(source: str, body: Any, *, received: dt.datetime | None = None) -> list[Alert]:
    """The alerts in ``body``: one event object of ``source`` or a list of at most :data:`MAX_EVENTS` of them.

    All or nothing: one bad event refuses the batch, naming its index. ``received`` (aware) is the time given to a
    generic event without one; the other sources carry their own time.
    """
    if source not in SOURCES:
        raise InvalidInput(f"unknown alert source {_show(source)}; allowed: {', '.join(SOURCES)}")
    if isinstance(body, dict):
        return [_parse_one(source, body, None, received)]
    if not isinstance(body, list):
        raise InvalidInput(f"{source} alerts: expected a JSON object or a list of them, got {type(body).__name__}")
    if len(body) > MAX_EVENTS:
        raise InvalidInput(f"{source} alerts: {len(body)} events in one request, at most {MAX_EVENTS}")
    return [_parse_one(source, event, index, received) for index, event in enumerate(body)]


def _parse_one(source: AlertSource, event: object, index: int | None, received: dt.datetime | None) -> Alert:
    reader = _Event(source, event, index)
    if source == "generic":
        return _generic(reader, received)
    return _PARSERS[source](reader)


def _suricata(ev: _Event) -> Alert:
    kind = ev.text(("event_type",))
    if kind != "alert":
        raise ev.fail(("event_type",), f'{_show(kind)} is not an alert (only event_type "alert" records are taken)')
    time = ev.time(("timestamp",))
    src, dest = ev.ip(("src_ip",)), ev.ip(("dest_ip",))
    src_port = ev.integer(("src_port",), required=False, high=65535)
    dest_port = ev.integer(("dest_port",), required=False, high=65535)
    proto = ev.text(("proto",), required=False)
    sid = ev.integer(("alert", "signature_id"))
    gid = ev.integer(("alert", "gid"), required=False)
    rev = ev.integer(("alert", "rev"), required=False)
    signature = ev.rule(("alert", "signature"))
    priority = ev.integer(("alert", "severity"), low=1)
    assert priority is not None
    category = ev.text(("alert", "category"), required=False)
    action = ev.text(("alert", "action"), required=False)
    declared = ev.strings(("alert", "metadata", "signature_severity"))
    macs = _unique([ev.mac(("ether", "src_mac")), ev.mac(("ether", "dest_mac"))])
    ids = ":".join(str(n) for n in (gid if gid is not None else 1, sid, rev) if n is not None)
    src_end = f"{src}:{src_port}" if src_port is not None else str(src)
    dest_end = f"{dest}:{dest_port}" if dest_port is not None else str(dest)
    summary = " ".join(
        part
        for part in (
            f"[{ids}] {signature}",
            f"[{category}]" if category else "",
            proto or "",
            f"{src_end} -> {dest_end}",
            f"({action})" if action else "",
        )
        if part
    )
    return Alert(
        source="suricata",
        rule=signature,
        severity=suricata_severity(priority, declared),
        summary=_clean(summary, MAX_SUMMARY),
        time=time,
        ips=_unique([src, dest]),
        macs=macs,
        raw=ev.raw(),
    )


def _falco(ev: _Event) -> Alert:
    rule = ev.rule(("rule",))
    priority = ev.text(("priority",))
    assert priority is not None
    severity = _FALCO_PRIORITIES.get(priority.strip().lower())
    if severity is None:
        allowed = "Emergency, Alert, Critical, Error, Warning, Notice, Informational, Debug"
        raise ev.fail(("priority",), f"{_show(priority)} is not a Falco priority; allowed: {allowed}")
    time = ev.time(("time",))
    output = ev.text(("output",), required=False)
    host = ev.host(("hostname",))
    ev.text(("source",), required=False)
    ev.strings(("tags",))
    fields = ev.get(("output_fields",))
    if fields is not _MISSING and fields is not None and not isinstance(fields, dict):
        raise ev.fail(("output_fields",), f"expected a JSON object, got {type(fields).__name__}")
    ips = _unique(
        [ev.ip(("output_fields", "fd.cip"), required=False), ev.ip(("output_fields", "fd.sip"), required=False)]
    )
    vm = ev.vm(("output_fields", "vm.id")) or ev.vm(("output_fields", "vm.name"))
    if not (ips or vm or host):
        raise ev.fail((), "names no VM, address or host (hostname, output_fields vm.id, vm.name, fd.cip, fd.sip)")
    return Alert(
        source="falco",
        rule=rule,
        severity=severity,
        summary=_clean(output or rule, MAX_SUMMARY) or rule,
        time=time,
        ips=ips,
        vm=vm,
        host=host,
        raw=ev.raw(),
    )


_GENERIC_FIELDS = ("severity", "rule", "summary", "vm", "ip", "mac", "host", "time")


def _generic(ev: _Event, received: dt.datetime | None) -> Alert:
    unknown = sorted(str(k) for k in ev.data if k not in _GENERIC_FIELDS)
    if unknown:
        raise ev.fail((), f"unknown field {_show(unknown[0])}; allowed: {', '.join(_GENERIC_FIELDS)}")
    if received is not None and (received.tzinfo is None or received.utcoffset() is None):
        raise InvalidInput("the receive time of a generic alert must be timezone-aware")
    level = ev.text(("severity",))
    try:
        severity = IncidentSeverity.parse(level)
    except InvalidInput:
        allowed = ", ".join(s.value for s in IncidentSeverity)
        raise ev.fail(("severity",), f"{_show(level)} is not a severity; allowed: {allowed}") from None
    rule = ev.rule(("rule",))
    summary = ev.text(("summary",), required=False)
    if received is None and ev.get(("time",)) in (_MISSING, None):
        raise ev.fail(("time",), "missing (and no receive time to default to)")
    time = ev.time(("time",), default=received)
    vm, ip, mac, host = ev.vm(("vm",)), ev.ip(("ip",), required=False), ev.mac(("mac",)), ev.host(("host",))
    if not (vm or ip or mac or host):
        raise ev.fail((), "names no VM, address or host: give at least one of vm, ip, mac, host")
    return Alert(
        source="generic",
        rule=rule,
        severity=severity,
        summary=_clean(summary or "", MAX_SUMMARY) or rule,
        time=time,
        ips=_unique([ip]),
        macs=_unique([mac]),
        vm=vm,
        host=host,
        raw=ev.raw(),
    )


_PARSERS: dict[str, Callable[[_Event], Alert]] = {"suricata": _suricata, "falco": _falco}
