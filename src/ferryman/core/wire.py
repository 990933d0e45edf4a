"""JSON shapes exchanged between controller and agents, and their conversion to domain models (pure)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypedDict

from ferryman.core.errors import InvalidInput
from ferryman.core.models import DiskSpec, RunState, VMRuntime, VMSpec


class RuntimeDict(TypedDict):
    vm_id: str
    name: str
    run_state: str
    pid: int | None
    generation: int | None
    managed: bool


def spec_to_dict(spec: VMSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def spec_from_dict(raw: dict[str, Any]) -> VMSpec:
    try:
        disks = tuple(DiskSpec(size_bytes=int(d["size_bytes"])) for d in raw["disks"])
        return VMSpec(
            vm_id=str(raw["vm_id"]),
            name=str(raw["name"]),
            vcpus=int(raw["vcpus"]),
            memory_mb=int(raw["memory_mb"]),
            disks=disks,
            canary=str(raw["canary"]),
            generation=int(raw.get("generation", 1)),
            dirty_kib_per_s=int(raw.get("dirty_kib_per_s", 256)),
            record_interval_ms=int(raw.get("record_interval_ms", 1000)),
            encrypted=bool(raw.get("encrypted", False)),
            resident_mib=int(raw.get("resident_mib", 0)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise InvalidInput(f"malformed VM spec: {err}") from err


def runtime_to_dict(rt: VMRuntime) -> RuntimeDict:
    return RuntimeDict(
        vm_id=rt.vm_id,
        name=rt.name,
        run_state=rt.run_state.value,
        pid=rt.pid,
        generation=rt.generation,
        managed=rt.managed,
    )


def runtime_from_dict(raw: dict[str, Any]) -> VMRuntime:
    try:
        state = RunState(raw["run_state"]) if raw["run_state"] in RunState._value2member_map_ else RunState.OTHER
        return VMRuntime(
            vm_id=str(raw["vm_id"]),
            name=str(raw.get("name", "")),
            run_state=state,
            pid=raw.get("pid"),
            generation=raw.get("generation"),
            managed=bool(raw.get("managed", True)),
        )
    except (KeyError, TypeError) as err:
        raise InvalidInput(f"malformed VM runtime: {err}") from err
