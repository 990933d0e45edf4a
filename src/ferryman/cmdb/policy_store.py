"""What the CMDB keeps of placement policies: every applied version of the policy files, and the compliance
violations found against the version in force, with first-seen, last-seen and resolved times.

The store does not parse or evaluate policies (``ferryman.policy`` does); a version is the set of files as applied.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class PolicyVersion:
    version: int
    applied_at: dt.datetime
    principal: str
    documents: dict[str, str] = field(default_factory=dict)  # file name -> YAML text


@dataclass(frozen=True)
class ViolationRecord:
    vm_id: str
    policy: str
    rule: str
    host: str | None
    message: str
    first_seen: dt.datetime
    last_seen: dt.datetime
    resolved_at: dt.datetime | None = None
    id: int | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.vm_id, self.policy, self.rule)


@dataclass(frozen=True)
class Finding:
    """A violation as the engine reports it now (no times)."""

    vm_id: str
    policy: str
    rule: str
    host: str | None
    message: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.vm_id, self.policy, self.rule)


class PolicyRepository(Protocol):
    def add_policy_version(self, documents: dict[str, str], principal: str, at: dt.datetime) -> PolicyVersion:
        """Store ``documents`` as the next version (1, 2, ...); it is in force from now on. One transaction."""
        ...

    def current_policy_version(self) -> PolicyVersion | None: ...

    def list_policy_versions(self) -> list[PolicyVersion]:
        """Newest first, documents included."""
        ...

    def sync_violations(
        self, findings: list[Finding], at: dt.datetime, *, scope: set[str] | None = None
    ) -> tuple[list[ViolationRecord], list[ViolationRecord]]:
        """Make the open violations of the VMs in ``scope`` (None: every VM) equal ``findings``, one transaction:
        new keys open (first_seen = at), known keys are refreshed (last_seen, host, message), open keys of those VMs
        not found are resolved. Returns (opened, resolved)."""
        ...

    def list_violations(self, *, open_only: bool = True, vm_id: str | None = None) -> list[ViolationRecord]:
        """Oldest first."""
        ...
