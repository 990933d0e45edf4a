"""Hosts and VMs for tests that build a fleet in a real or fake CMDB: one shape, so the suites describe only what
differs (a site, a patch level, a tenant, a profile)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ferryman.core.models import VM, Host, HostState


def enrolled_host(name: str, site: str = "s1", patch_level: int = 1, **changes: Any) -> Host:
    """An enrolled compute host with 4 GiB, on loopback (tests never reach its agent)."""
    host = Host(
        name=name,
        address="127.0.0.1",
        agent_port=1,
        site=site,
        zone="z1",
        subnet="10.0.0.0/24",
        virt_type="kvm",
        hypervisor="qemu",
        hypervisor_version="7.2.0",
        patch_level=patch_level,
        state=HostState.ENROLLED,
        memory_mb=4096,
    )
    return dataclasses.replace(host, **changes)


def small_vm(name: str, tenant: str = "acme", environment: str | None = None, **changes: Any) -> VM:
    """A 128 MiB, one-vCPU VM with id ``id-<name>``; ``environment`` becomes its profile label."""
    vm = VM(
        id=f"id-{name}",
        name=name,
        tenant=tenant,
        memory_mb=128,
        vcpus=1,
        disk_bytes=1 << 26,
        image="i",
        canary="c",
        profile={"environment": environment} if environment else {},
    )
    return dataclasses.replace(vm, **changes)
