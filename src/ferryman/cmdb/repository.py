"""The CMDB as the controller sees it: narrow protocols over sites, hosts, VMs, temporal placements and the event log.

Nothing here knows SQL. :class:`ferryman.cmdb.sql.SqlRepository` implements every protocol on SQLite or PostgreSQL;
``ferryman.testing`` may ship an in-memory fake for unit tests of logic.

Rules the implementations keep:
- a placement row is never updated in place except to set ``valid_to`` once, when the fact ends;
- every method that changes state runs in one transaction; ``place_vm`` / ``move_vm`` close the old placement and open
  the new one in the same transaction;
- times are timezone-aware UTC datetimes; intervals are half-open ``[valid_from, valid_to)``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ferryman.cmdb.access import AccessRepository
from ferryman.cmdb.images import ImageRepository
from ferryman.cmdb.incidents import IncidentRepository
from ferryman.cmdb.journal import JournalRepository
from ferryman.cmdb.key_store import KeyRepository
from ferryman.cmdb.networks import NetworkRepository
from ferryman.cmdb.policy_store import PolicyRepository
from ferryman.core.models import VM, Event, Host, HostState, Placement, Severity, Site, Tenant, VMState


@dataclass(frozen=True)
class Neighbour:
    """A VM that shared a host with the subject during [since, until) (until None: still does)."""

    vm_id: str
    vm_name: str
    tenant: str
    host: str
    since: dt.datetime
    until: dt.datetime | None


@dataclass(frozen=True)
class ApiToken:
    id: str
    name: str
    role: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None = None


@dataclass(frozen=True)
class HostCertificate:
    serial: int
    host: str
    not_after: dt.datetime
    issued_at: dt.datetime
    revoked_at: dt.datetime | None = None


@dataclass(frozen=True)
class Alarm:
    """An open or resolved discrepancy between the CMDB and what agents report."""

    id: int
    kind: str
    vm_id: str | None
    host: str | None
    message: str
    first_seen: dt.datetime
    last_seen: dt.datetime
    resolved_at: dt.datetime | None = None


class InventoryRepository(Protocol):
    """Sites, hosts and tenants."""

    def add_site(self, site: Site) -> Site: ...
    def list_sites(self) -> list[Site]: ...
    def add_host(self, host: Host) -> Host: ...
    def get_host(self, name: str) -> Host: ...  # NotFound
    def list_hosts(self) -> list[Host]: ...
    def set_host_state(self, name: str, state: HostState) -> Host: ...
    def update_host(self, name: str, **changes: Any) -> Host: ...
    def ensure_tenant(self, name: str) -> Tenant: ...
    def list_tenants(self) -> list[Tenant]: ...


class VMRepository(Protocol):
    """VMs and their temporal placements."""

    def add_vm(self, vm: VM, host: str, at: dt.datetime) -> VM: ...  # VM row + first placement, one transaction
    def get_vm(self, name_or_id: str, *, tenant: str | None = None) -> VM: ...  # NotFound; deleted VMs too
    def list_vms(self, *, include_deleted: bool = False) -> list[VM]: ...
    def set_vm_state(self, vm_id: str, state: VMState) -> VM: ...
    def delete_vm(self, vm_id: str, at: dt.datetime) -> VM: ...  # state=deleted + close placement, one transaction
    def current_placement(self, vm_id: str) -> Placement | None: ...
    def open_placements(self) -> dict[str, Placement]: ...  # every VM's current placement, by VM id
    def placements_on(self, host: str, at: dt.datetime | None = None) -> list[Placement]: ...  # None = now/open
    def host_chain(self, vm_id: str) -> list[Placement]: ...  # every placement, oldest first
    def move_vm(self, vm_id: str, to_host: str, at: dt.datetime) -> tuple[VM, Placement]: ...  # generation+1


class TemporalQueries(Protocol):
    """Questions over time (DESIGN.md: "who were this VM's neighbours between t1 and t2")."""

    def neighbours_of_vm(self, vm_id: str, start: dt.datetime, end: dt.datetime | None = None) -> list[Neighbour]: ...
    def neighbours_on_host(self, host: str, start: dt.datetime, end: dt.datetime | None = None) -> list[Neighbour]: ...
    def vms_ever_on_host(self, host: str) -> list[Placement]: ...


class EventRepository(Protocol):
    """The event log and reconciliation alarms."""

    def record_event(self, event: Event) -> Event: ...
    def list_events(
        self,
        *,
        since: dt.datetime | None = None,
        kind_prefix: str | None = None,
        vm_id: str | None = None,
        host: str | None = None,
        min_severity: Severity | None = None,
        limit: int = 200,
        until: dt.datetime | None = None,
        vm_ids: Collection[str] | None = None,
    ) -> list[Event]: ...
    def open_alarm(self, kind: str, vm_id: str | None, host: str | None, message: str, at: dt.datetime) -> Alarm | None:
        """Open an alarm; if the same (kind, vm_id, host) is already open, bump last_seen and return None."""
        ...

    def resolve_alarms(self, keep: Sequence[tuple[str, str | None, str | None]], at: dt.datetime) -> list[Alarm]:
        """Resolve every open alarm whose key is not in ``keep``; return those resolved."""
        ...

    def list_alarms(self, *, open_only: bool = True) -> list[Alarm]: ...


class CredentialRepository(Protocol):
    """API tokens, one-time enrolment tokens and issued host certificates (revocation lives here)."""

    def add_api_token(self, token_id: str, name: str, role: str, secret_hash: str, at: dt.datetime) -> ApiToken: ...
    def find_api_token(self, token_id: str) -> tuple[ApiToken, str] | None: ...  # (token, secret_hash)
    def list_api_tokens(self) -> list[ApiToken]: ...
    def add_enrol_token(self, host: str, secret_hash: str, expires_at: dt.datetime) -> None: ...
    def consume_enrol_token(self, host: str, secret_hash: str, at: dt.datetime) -> bool:
        """Atomically mark the host's unexpired, unused token with this hash as used; False if none matched."""
        ...

    def add_certificate(self, cert: HostCertificate) -> None: ...
    def get_certificate(self, serial: int) -> HostCertificate | None: ...
    def list_certificates(self, host: str | None = None) -> list[HostCertificate]: ...
    def hosts_with_live_certificates(self) -> set[str]:
        """The hosts that hold at least one certificate not revoked (read on every agent report)."""
        ...

    def revoke_certificate(self, serial: int, at: dt.datetime) -> HostCertificate: ...
    def get_setting(self, key: str) -> Any | None: ...
    def put_setting(self, key: str, value: Any) -> None: ...


class Repository(
    InventoryRepository,
    VMRepository,
    TemporalQueries,
    EventRepository,
    CredentialRepository,
    JournalRepository,
    PolicyRepository,
    KeyRepository,
    ImageRepository,
    NetworkRepository,
    IncidentRepository,
    AccessRepository,
    Protocol,
):
    """Everything the controller needs from the CMDB."""
