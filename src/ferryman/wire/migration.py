"""The steps of a live migration on the wire: one request and one response per step the runner asks of an agent.

Every request carries the controller-signed migration ticket (:class:`Ticketed`); the path names the migration. The
responses are the facts the runner records: ports, bytes, downtime, scrub receipts, validation.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ferryman.core.models import VMSpec
from ferryman.wire.base import AgentCall, Empty, Keyed, Reply, Ticketed
from ferryman.wire.network import NicState
from ferryman.wire.vms import Receipt

Side = Literal["source", "destination"]
ScrubModeName = Literal["zero", "random", "crypto"]
HookPointName = Literal[
    "pre-migrate-source", "pre-migrate-destination", "post-migrate-source", "post-migrate-destination", "rollback"
]
JSONValue = str | int | float | bool | None


class Snapshotted(Reply):
    snapshots: str  # comma-separated snapshot file names
    pruned: int
    disk_paths: str  # comma-separated
    dirty_kib_per_s: int
    record_interval_ms: int
    resident_mib: int


class TakeSnapshot(Ticketed, Keyed, AgentCall[Snapshotted]):
    """Source, first call: open the migration (ticket and nonce) and snapshot every disk."""

    path: ClassVar[str] = "/v1/migrations/{target}/snapshot"


class Prepared(Reply):
    address: str
    migration_port: int
    nbd_port: int
    nics: list[NicState] = []  # the destination's NIC rules, installed and read back before QEMU could run


class Prepare(Ticketed, Keyed, AgentCall[Prepared]):
    """Destination, first call: a paused QEMU waiting for the assigned source only, and its disk targets."""

    path: ClassVar[str] = "/v1/migrations/{target}/prepare"
    spec: VMSpec
    source_dn: str
    crl_pem: str | None = None
    shared_disks: list[str] = []


class HookOutcome(Reply):
    hook: str
    point: str
    exit_code: int | None
    duration_s: float
    stdout: str
    stderr: str


class HooksRun(Reply):
    vetoed: bool
    summary: str
    results: list[HookOutcome]


class RunHooks(Ticketed, AgentCall[HooksRun]):
    path: ClassVar[str] = "/v1/migrations/{target}/hooks"
    point: HookPointName
    context: dict[str, JSONValue] = {}


class Mirrored(Reply):
    mirrored_bytes: int


class StartMirror(Ticketed, AgentCall[Mirrored]):
    """Source: mirror every disk to the destination's NBD export (TLS) until in sync, within ``within`` seconds."""

    path: ClassVar[str] = "/v1/migrations/{target}/mirror"
    dst_address: str
    nbd_port: int
    crl_pem: str | None = None
    within: float = 600.0


class TransferStarted(Reply):
    status: str


class StartTransfer(Ticketed, AgentCall[TransferStarted]):
    """Source: start the RAM stream (TLS, capped bandwidth)."""

    path: ClassVar[str] = "/v1/migrations/{target}/transfer"
    dst_address: str
    migration_port: int
    crl_pem: str | None = None
    bandwidth_bytes_per_s: int | None = None


class Progress(Reply):
    status: str
    transferred_bytes: int
    remaining_bytes: int
    total_bytes: int
    rate_bytes_per_s: float
    dirty_pages_rate: int
    mirror_offset: int
    mirror_length: int


class ReadProgress(Ticketed, AgentCall[Progress]):
    """Source: the RAM stream's progress, waiting up to ``wait_s`` for it to settle."""

    path: ClassVar[str] = "/v1/migrations/{target}/progress"
    wait_s: float = 0.0


class SwitchedOver(Reply):
    transferred_bytes: int
    downtime_ms: int | None
    total_ms: int | None


class SwitchOver(Ticketed, AgentCall[SwitchedOver]):
    path: ClassVar[str] = "/v1/migrations/{target}/switchover"
    within: float = 600.0


class DestinationCheck(Reply):
    ok: bool
    detail: str


class CheckDestination(Ticketed, AgentCall[DestinationCheck]):
    """Destination, just before the commit: alive, unactivated, incoming migration completed, guest paused."""

    path: ClassVar[str] = "/v1/migrations/{target}/check-destination"


class Activated(Reply):
    generation: int
    already: bool = False
    pid: int | None = None
    restarted: bool = False
    last_seq: int | None = None  # the guest's newest disk record at activation, when the records probe reads one


class Activate(Ticketed, Keyed, AgentCall[Activated]):
    """Destination, after the commit: run under a lease for the new generation."""

    path: ClassVar[str] = "/v1/migrations/{target}/activate"
    lease: str = Field(default="", repr=False)  # missing: refused by the lease check (Forbidden)


class Retire(Ticketed, AgentCall[Empty]):
    path: ClassVar[str] = "/v1/migrations/{target}/retire"


class Validation(Reply):
    ok: bool
    running: bool
    detail: str
    last_seq: int | None = None


class Validate(Ticketed, Keyed, AgentCall[Validation]):
    path: ClassVar[str] = "/v1/migrations/{target}/validate"


class KillDestination(Ticketed, AgentCall[Empty]):
    path: ClassVar[str] = "/v1/migrations/{target}/kill-destination"


class SourceResumed(Reply):
    run_state: str
    restarted: bool = False


class ResumeSource(Ticketed, Keyed, AgentCall[SourceResumed]):
    """Rollback: the source runs again under a lease for its unchanged generation."""

    path: ClassVar[str] = "/v1/migrations/{target}/resume-source"
    lease: str = Field(default="", repr=False)  # missing: refused by the lease check (Forbidden)


class Scrubbed(Reply):
    receipts: list[Receipt]
    at: str


class Scrub(Ticketed, AgentCall[Scrubbed]):
    path: ClassVar[str] = "/v1/migrations/{target}/scrub"
    side: Side
    mode: ScrubModeName = "zero"


class Closed(Reply):
    closed: bool
    receipts: list[Receipt] = []


class Close(Ticketed, AgentCall[Closed]):
    """The migration ended: scrub this host's TLS material for it and forget it."""

    path: ClassVar[str] = "/v1/migrations/{target}/close"
    role: Side
