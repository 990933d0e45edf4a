"""VM lifecycle and inventory on the wire: create, act on, list and destroy a host's VMs; snapshots; stale copies.

The spec and the runtime travel as the domain's own frozen dataclasses (:class:`VMSpec`, :class:`VMRuntime`),
validated field by field at the boundary.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, TypeAdapter, ValidationError

from ferryman.core.errors import InvalidInput
from ferryman.core.models import RunState, VMRuntime, VMSpec
from ferryman.wire.base import AgentCall, Empty, Keyed, Reply

VMAction = Literal["start", "stop", "pause", "resume"]

_SPEC = TypeAdapter(VMSpec)
_RUNTIME = TypeAdapter(VMRuntime)


def spec_to_dict(spec: VMSpec) -> dict[str, Any]:
    return dict(_SPEC.dump_python(spec, mode="json"))


def spec_from_dict(raw: Any) -> VMSpec:
    try:
        return _SPEC.validate_python(raw)
    except ValidationError as err:
        raise InvalidInput(f"malformed VM spec: {_first(err)}") from err


def runtime_to_dict(rt: VMRuntime) -> dict[str, Any]:
    return dict(_RUNTIME.dump_python(rt, mode="json"))


def runtime_from_dict(raw: Any) -> VMRuntime:
    """A runtime as an agent reports it; a run state this version does not know reads as ``other``."""
    if isinstance(raw, dict) and raw.get("run_state") not in RunState._value2member_map_:
        raw = {**raw, "run_state": RunState.OTHER.value}
    try:
        return _RUNTIME.validate_python(raw)
    except ValidationError as err:
        raise InvalidInput(f"malformed VM runtime: {_first(err)}") from err


def _first(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))


class Health(Reply):
    host: str
    vms: int


class Runtime(Reply):
    """One QEMU process as the agent sees it."""

    vm_id: str
    name: str
    run_state: RunState
    pid: int | None
    generation: int | None = None
    managed: bool = True

    @classmethod
    def of(cls, rt: VMRuntime) -> Runtime:
        return cls(**runtime_to_dict(rt))

    def to_domain(self) -> VMRuntime:
        return VMRuntime(self.vm_id, self.name, self.run_state, self.pid, self.generation, self.managed)


class VMList(Reply):
    vms: list[Runtime]


class ListVMs(AgentCall[VMList]):
    """Every QEMU process the agent sees, managed by it or not."""

    method: ClassVar[str] = "GET"
    path: ClassVar[str] = "/v1/vms"


class CreateVM(Keyed, AgentCall[Runtime]):
    """Boot a new VM under a lease for its generation."""

    path: ClassVar[str] = "/v1/vms"
    spec: VMSpec
    lease: str = Field(default="", repr=False)  # missing: refused by the lease check (Forbidden)


class ActionDone(Reply):
    runtime: Runtime | None  # None after a stop


class VMActionRequest(Keyed, AgentCall[ActionDone]):
    """start and resume need a lease for the copy's generation (fencing); stop and pause do not."""

    path: ClassVar[str] = "/v1/vms/{target}/action"
    action: VMAction
    lease: str | None = Field(default=None, repr=False)


class SnapshotInfo(Reply):
    disk: str
    tag: str
    taken_at: str
    size_bytes: int


class SnapshotList(Reply):
    snapshots: list[SnapshotInfo]


class ListSnapshots(AgentCall[SnapshotList]):
    method: ClassVar[str] = "GET"
    path: ClassVar[str] = "/v1/vms/{target}/snapshots"


class Receipt(Reply):
    """Proof that one artefact was overwritten, verified and unlinked (see ``agent.storage.scrub.ScrubReceipt``)."""

    path: str
    bytes: int
    mode: str
    duration_s: float
    verified_samples: int
    sample_hash: str
    started_at: str
    finished_at: str


class Restored(Reply):
    tag: str
    taken_at: str
    run_state: str
    receipts: list[Receipt]


class Restore(Keyed, AgentCall[Restored]):
    """Swap the VM's disks for a snapshot (the newest, or ``tag``) and boot it; only the host of record may."""

    path: ClassVar[str] = "/v1/vms/{target}/restore"
    lease: str = Field(default="", repr=False)  # missing: refused by the lease check (Forbidden)
    tag: str | None = None


class StaleCopyRemoved(Reply):
    removed: bool
    kept: list[str] = []
    receipts: list[Receipt] = []


class RemoveStaleCopy(AgentCall[StaleCopyRemoved]):
    """Kill and scrub a stale copy; ``successor`` is the lease of the copy of record (the proof it moved on)."""

    path: ClassVar[str] = "/v1/stale-copies/{target}/remove"
    successor: str = Field(default="", repr=False)
    keep_disks: bool = False


class DestroyVM(AgentCall[Empty]):
    method: ClassVar[str] = "DELETE"
    path: ClassVar[str] = "/v1/vms/{target}"
