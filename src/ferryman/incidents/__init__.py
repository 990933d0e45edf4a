"""Incident response as pure data: alerts in, limits on what they may set off, and what to do per severity.

Modules:

* :mod:`.alerts`: Suricata EVE JSON, Falco JSON and a small generic form turned into one :class:`Alert` shape, with a
  stable deduplication key and every refusal an :class:`~ferryman.core.errors.InvalidInput` naming the field;
* :mod:`.limits`: token buckets per key and global (:class:`AlertGate`) and a time-window :class:`Dedup`, all with
  bounded memory, so that an alert storm cannot become a thrashing vector;
* :mod:`.playbooks`: the YAML playbook (steps per severity), its validation with file and line, and the default.

Nothing here does I/O or reads the system clock: mapping an alert to a VM or a host in the CMDB, opening incidents and
running playbook steps belong to the controller. This package imports only the standard library, PyYAML and
:mod:`ferryman.core`.
"""

from __future__ import annotations

from ferryman.incidents.alerts import (
    MAX_EVENTS,
    SOURCES,
    Alert,
    AlertSource,
    IncidentSeverity,
    parse,
    parse_falco,
    parse_generic,
    parse_suricata,
)
from ferryman.incidents.limits import AlertGate, Dedup, RateLimiter, Verdict
from ferryman.incidents.playbooks import (
    DEFAULT_PLAYBOOK,
    CaptureOptions,
    Playbook,
    PlaybookErrors,
    PlaybookProblem,
    Step,
    StepKind,
    check_playbook,
    parse_playbook,
)

__all__ = [
    "DEFAULT_PLAYBOOK",
    "MAX_EVENTS",
    "SOURCES",
    "Alert",
    "AlertGate",
    "AlertSource",
    "CaptureOptions",
    "Dedup",
    "IncidentSeverity",
    "Playbook",
    "PlaybookErrors",
    "PlaybookProblem",
    "RateLimiter",
    "Step",
    "StepKind",
    "Verdict",
    "check_playbook",
    "parse",
    "parse_falco",
    "parse_generic",
    "parse_playbook",
    "parse_suricata",
]
