"""Pydantic shapes of the REST API (requests and responses). Conversion from domain models lives here too."""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

from ferryman.cmdb.key_store import DiskKeyRecord
from ferryman.cmdb.repository import Alarm, Neighbour
from ferryman.core.models import VM, Event, Host, Nic, Placement, Site
from ferryman.wire.network import NetworkReport


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SiteIn(_In):
    name: str
    security_level: int = Field(ge=0)
    description: str = ""


class SiteOut(BaseModel):
    name: str
    security_level: int
    description: str

    @classmethod
    def of(cls, site: Site) -> SiteOut:
        return cls(name=site.name, security_level=site.security_level, description=site.description)


class HostIn(_In):
    name: str
    address: str
    agent_port: int = Field(default=8444, ge=1, le=65535)
    site: str
    zone: str
    subnet: str
    virt_type: str = "kvm"
    hypervisor: str = "qemu"
    hypervisor_version: str
    patch_level: int = Field(ge=0)
    role: str = "compute"
    memory_mb: int = Field(default=2048, ge=64)
    underlay: str = Field(default="", description="the host's overlay (VXLAN) endpoint address; empty: no NICs")

    @field_validator("underlay")
    @classmethod
    def _underlay(cls, value: str) -> str:
        if value:
            ipaddress.IPv4Address(value)  # ValueError: a 422 naming the field
        return value


class HostOut(BaseModel):
    name: str
    address: str
    agent_port: int
    site: str
    security_level: int | None
    zone: str
    subnet: str
    virt_type: str
    hypervisor: str
    hypervisor_version: str
    patch_level: int
    role: str
    memory_mb: int
    state: str
    underlay: str = ""
    vm_count: int = 0
    memory_used_mb: int = 0
    reachable: bool = False
    last_report: dt.datetime | None = None

    @classmethod
    def of(cls, host: Host, security_level: int | None, **usage: Any) -> HostOut:
        return cls(
            name=host.name,
            address=host.address,
            agent_port=host.agent_port,
            site=host.site,
            security_level=security_level,
            zone=host.zone,
            subnet=host.subnet,
            virt_type=host.virt_type,
            hypervisor=host.hypervisor,
            hypervisor_version=host.hypervisor_version,
            patch_level=host.patch_level,
            role=host.role,
            memory_mb=host.memory_mb,
            state=host.state.value,
            underlay=host.underlay,
            **usage,
        )


class HostCreated(BaseModel):
    host: HostOut
    enrol_token: str


class EnrolIn(_In):
    host: str
    token: str
    csr_pem: str


class EnrolOut(BaseModel):
    certificate_pem: str
    ca_pem: str
    serial: str


class NicIn(_In):
    network: str
    ip: str | None = None  # IPv4 address inside the network (default: the next free one)


class NicOut(BaseModel):
    id: str
    network: str
    index: int
    mac: str
    ipv4: str
    ipv6: str | None
    tap: str
    isolated: bool
    revision: int
    rules_hash: str | None
    rules_host: str | None
    applied_at: dt.datetime | None

    @classmethod
    def of(cls, nic: Nic) -> NicOut:
        return cls(
            id=nic.id,
            network=nic.network,
            index=nic.index,
            mac=nic.mac,
            ipv4=nic.ipv4,
            ipv6=nic.ipv6,
            tap=f"fmt-{nic.id}",
            isolated=nic.isolated,
            revision=nic.revision,
            rules_hash=nic.rules_hash,
            rules_host=nic.host,
            applied_at=nic.applied_at,
        )


class VMIn(_In):
    name: str
    tenant: str
    memory: str | int = "256"
    vcpus: int = 1
    disk: str | int = "64M"
    profile: dict[str, str] = Field(default_factory=dict)
    host: str | None = None
    dirty_kib_per_s: int = Field(default=256, ge=0, le=1 << 20)
    record_interval_ms: int = Field(default=1000, ge=50, le=600_000)
    resident_mib: int = Field(default=0, ge=0, le=1 << 20)  # lab guest: RAM it fills with data at boot
    force: StrictBool = False  # break glass: against hard placement rules (two-person rule; audited)
    encrypted: bool = False  # LUKS-encrypted disks under per-copy keys the controller holds
    image: str | None = None  # the registry image to boot (None: the hosts' own boot image)
    full_copy: bool = False  # the first disk is a full copy of the image, not an overlay on it
    networks: list[NicIn] = Field(default_factory=list, max_length=4)  # one NIC each, in device order


class PlacementOut(BaseModel):
    vm_id: str
    host: str
    generation: int
    valid_from: dt.datetime
    valid_to: dt.datetime | None

    @classmethod
    def of(cls, p: Placement) -> PlacementOut:
        return cls(vm_id=p.vm_id, host=p.host, generation=p.generation, valid_from=p.valid_from, valid_to=p.valid_to)


class VMOut(BaseModel):
    id: str
    name: str
    tenant: str
    state: str
    generation: int
    memory_mb: int
    vcpus: int
    disk_bytes: int
    profile: dict[str, str]
    host: str | None
    since: dt.datetime | None
    created_at: dt.datetime | None
    encrypted: bool = False
    image: str | None = None
    full_copy: bool = False

    @classmethod
    def of(cls, vm: VM, placement: Placement | None) -> VMOut:
        return cls(
            id=vm.id,
            name=vm.name,
            tenant=vm.tenant,
            state=vm.state.value,
            generation=vm.generation,
            memory_mb=vm.memory_mb,
            vcpus=vm.vcpus,
            disk_bytes=vm.disk_bytes,
            profile=vm.profile,
            host=placement.host if placement else None,
            since=placement.valid_from if placement else None,
            created_at=vm.created_at,
            encrypted=vm.encrypted,
            image=vm.image,
            full_copy=vm.image_copy,
        )


class NeighbourOut(BaseModel):
    vm_id: str
    vm: str
    tenant: str
    host: str
    since: dt.datetime
    until: dt.datetime | None

    @classmethod
    def of(cls, n: Neighbour) -> NeighbourOut:
        return cls(vm_id=n.vm_id, vm=n.vm_name, tenant=n.tenant, host=n.host, since=n.since, until=n.until)


class DiskKeyOut(BaseModel):
    """A copy's disk key as operators see it: where and when, never the key."""

    id: str
    host: str
    generation: int
    live: bool
    created_at: dt.datetime
    destroyed_at: dt.datetime | None
    destroyed_reason: str | None

    @classmethod
    def of(cls, k: DiskKeyRecord) -> DiskKeyOut:
        return cls(
            id=k.id,
            host=k.host,
            generation=k.generation,
            live=k.live,
            created_at=k.created_at,
            destroyed_at=k.destroyed_at,
            destroyed_reason=k.destroyed_reason,
        )


class VMDetail(VMOut):
    canary: str
    neighbours: list[NeighbourOut]
    nics: list[NicOut] = []


class EventOut(BaseModel):
    id: int | None
    time: dt.datetime
    kind: str
    severity: str
    principal: str
    vm: str | None
    host: str | None
    message: str
    data: dict[str, Any]

    @classmethod
    def of(cls, e: Event) -> EventOut:
        return cls(
            id=e.id,
            time=e.time,
            kind=e.kind,
            severity=e.severity.value,
            principal=e.principal,
            vm=e.vm,
            host=e.host,
            message=e.message,
            data=e.data,
        )


class AlarmOut(BaseModel):
    id: int
    kind: str
    vm: str | None
    host: str | None
    message: str
    first_seen: dt.datetime
    last_seen: dt.datetime
    resolved_at: dt.datetime | None

    @classmethod
    def of(cls, a: Alarm) -> AlarmOut:
        return cls(
            id=a.id,
            kind=a.kind,
            vm=a.vm_id,
            host=a.host,
            message=a.message,
            first_seen=a.first_seen,
            last_seen=a.last_seen,
            resolved_at=a.resolved_at,
        )


class RuntimeIn(BaseModel):
    vm_id: str
    name: str = ""
    run_state: str
    pid: int | None = None
    generation: int | None = None
    managed: bool = True


class ReportIn(BaseModel):
    """An agent's inventory. Any host name in the body is ignored: the host is the one its certificate names."""

    vms: list[RuntimeIn]
    network: NetworkReport | None = None  # the host's NIC tables (hosts that plumb NICs)
    model_config = ConfigDict(extra="ignore")


class AgentEventIn(BaseModel):
    vm_id: str
    event: str
    data: dict[str, Any] = Field(default_factory=dict)
    timestamp: float = 0.0


class AgentEventsIn(BaseModel):
    events: list[AgentEventIn]
    model_config = ConfigDict(extra="ignore")


class ReportAck(BaseModel):
    host: str
    accepted: int
    # a host on the overlay: the underlay addresses of every other enrolled host it floods its segments to
    underlay_peers: list[str] | None = None


class MigrateIn(_In):
    to: str
    shared_storage: bool = False
    bandwidth_mib_s: int | None = Field(default=None, ge=1)
    force: StrictBool = False  # break glass: against hard placement rules (two-person rule; audited)


class MigrationProgressOut(BaseModel):
    status: str = ""
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    total_bytes: int = 0
    rate_bytes_per_s: float = 0.0
    dirty_pages_rate: int = 0
    mirror_offset: int = 0
    mirror_length: int = 0


class MigrationStepOut(BaseModel):
    seq: int
    phase: str
    at: dt.datetime
    data: dict[str, Any]


class ScrubReceiptOut(BaseModel):
    host: str
    path: str
    bytes: int
    mode: str
    duration_s: float
    sample_hash: str
    at: dt.datetime


class MigrationOut(BaseModel):
    id: str
    vm_id: str
    vm: str
    source: str
    destination: str
    shared_storage: bool
    phase: str
    principal: str
    generation: int
    requested_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None
    outcome: str | None
    error: str | None
    cancel_requested: bool
    bytes_transferred: int
    downtime_ms: int | None
    total_s: float | None
    data: dict[str, Any]
    progress: MigrationProgressOut | None = None


class MigrationDetail(MigrationOut):
    steps: list[MigrationStepOut]
    scrub_receipts: list[ScrubReceiptOut]


class RestoreIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tag: str | None = None
