"""``ferryman site|host|vm …``: the fleet inventory (sites, hosts, VMs) and the actions on one host or VM.

Listings render a table, or the API's JSON with ``--json``. A migration or a drain is started here and followed by
:mod:`ferryman.cli.migrate`.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from ferryman.cli.context import Json, api, parse_profile, segment, vm_path
from ferryman.cli.migrate import follow, migrate_vm, summary
from ferryman.cli.networks import NIC_COLUMNS, nic_rows
from ferryman.cli.output import emit_json, fields, short_time, table
from ferryman.client import CliError

site_app = typer.Typer(no_args_is_help=True, help="Sites (physical locations).")
host_app = typer.Typer(no_args_is_help=True, help="Hypervisor hosts.")
vm_app = typer.Typer(no_args_is_help=True, help="Virtual machines.")


# ---- sites ---------------------------------------------------------------------------------------------------------


@site_app.command("list")
def site_list(json_: Json = False) -> None:
    """List sites with their physical security level."""
    sites = api().get("/api/v1/sites")
    if json_:
        return emit_json(sites)
    table(
        None,
        ["SITE", "SECURITY LEVEL", "DESCRIPTION"],
        [[s["name"], s["security_level"], s["description"]] for s in sites],
    )


@site_app.command("add")
def site_add(
    name: str,
    security_level: Annotated[
        int, typer.Option("--security-level", help="physical security level, higher is stronger")
    ],
    description: str = "",
    json_: Json = False,
) -> None:
    """Add a site."""
    site = api().post("/api/v1/sites", {"name": name, "security_level": security_level, "description": description})
    emit_json(site) if json_ else print(f"site {site['name']} added (security level {site['security_level']})")


# ---- hosts ---------------------------------------------------------------------------------------------------------


def _host_rows(hosts: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            h["name"],
            h["address"],
            h["site"],
            h["security_level"],
            h["zone"],
            h["subnet"],
            h["virt_type"],
            f"{h['hypervisor']} {h['hypervisor_version']}",
            h["patch_level"],
            h["role"],
            h["state"] if h["state"] != "enrolled" else ("up" if h["reachable"] else "unreachable"),
            h["vm_count"],
            f"{h['memory_used_mb']}/{h['memory_mb']}",
        ]
        for h in hosts
    ]


HOST_COLUMNS = [
    "HOST",
    "ADDRESS",
    "SITE",
    "SEC",
    "ZONE",
    "SUBNET",
    "VIRT",
    "HYPERVISOR",
    "PATCH",
    "ROLE",
    "STATUS",
    "VMS",
    "MEM MiB",
]


@host_app.command("list")
def host_list(json_: Json = False) -> None:
    """List hosts with site, security level, zone, subnet, virtualisation type, hypervisor, patch level, VM count."""
    hosts = api().get("/api/v1/hosts")
    if json_:
        return emit_json(hosts)
    table(None, HOST_COLUMNS, _host_rows(hosts))


@host_app.command("show")
def host_show(name: str, json_: Json = False) -> None:
    """Show one host."""
    host = api().get(f"/api/v1/hosts/{segment(name)}")
    if json_:
        return emit_json(host)
    fields([(k, host[k]) for k in host])


@host_app.command("add")
def host_add(
    name: str,
    address: Annotated[str, typer.Option(help="address the agent listens on")],
    site: Annotated[str, typer.Option()],
    zone: Annotated[str, typer.Option()],
    subnet: Annotated[str, typer.Option()],
    hypervisor_version: Annotated[str, typer.Option("--hypervisor-version")],
    patch_level: Annotated[int, typer.Option("--patch-level")],
    agent_port: Annotated[int, typer.Option("--agent-port")] = 8444,
    virt_type: Annotated[str, typer.Option("--virt-type")] = "kvm",
    role: str = "compute",
    memory: Annotated[int, typer.Option(help="MiB of guest memory the host offers")] = 2048,
    underlay: Annotated[str, typer.Option(help="the host's overlay (VXLAN) endpoint address; none: no NICs")] = "",
    json_: Json = False,
) -> None:
    """Register a host; prints its one-time enrolment token."""
    body = {
        "name": name,
        "address": address,
        "agent_port": agent_port,
        "site": site,
        "zone": zone,
        "subnet": subnet,
        "virt_type": virt_type,
        "hypervisor_version": hypervisor_version,
        "patch_level": patch_level,
        "role": role,
        "memory_mb": memory,
        "underlay": underlay,
    }
    created = api().post("/api/v1/hosts", body)
    if json_:
        return emit_json(created)
    print(f"host {name} registered; one-time enrolment token (shown once):\n{created['enrol_token']}")


@host_app.command("revoke")
def host_revoke(name: str, json_: Json = False) -> None:
    """Revoke every certificate of a host: the controller refuses it from now on."""
    result = api().post(f"/api/v1/hosts/{segment(name)}/revoke")
    emit_json(result) if json_ else print(f"revoked {len(result['revoked'])} certificate(s) of {name}")


def _neighbour_rows(items: list[dict[str, Any]]) -> list[list[Any]]:
    return [[n["vm"], n["tenant"], n["host"], short_time(n["since"]), short_time(n["until"])] for n in items]


@host_app.command("neighbours")
def host_neighbours(
    name: str,
    at: Annotated[str, typer.Option(help="ISO time, 'now', or relative like -10m")] = "now",
    json_: Json = False,
) -> None:
    """VMs placed on a host at a given time."""
    items = api().get(f"/api/v1/hosts/{segment(name)}/neighbours", at=at)
    if json_:
        return emit_json(items)
    table(f"VMs on {name} at {at}", ["VM", "TENANT", "HOST", "SINCE", "UNTIL"], _neighbour_rows(items))


@host_app.command("history")
def host_history(name: str, json_: Json = False) -> None:
    """Every VM that ever ran on a host."""
    items = api().get(f"/api/v1/hosts/{segment(name)}/history")
    vms = {v["id"]: v["name"] for v in api().get("/api/v1/vms")}
    if json_:
        return emit_json(items)
    table(
        None,
        ["VM", "GEN", "FROM", "TO"],
        [
            [
                vms.get(p.get("vm_id", ""), p.get("vm_id")),
                p["generation"],
                short_time(p["valid_from"]),
                short_time(p["valid_to"]),
            ]
            for p in items
        ],
    )


@host_app.command("drain")
def host_drain(
    name: str,
    wait: Annotated[bool, typer.Option("--wait/--no-wait")] = True,
    timeout: float = 3600,
    json_: Json = False,
) -> None:
    """Migrate every VM away from a host, within the throttles."""
    result = api().post(f"/api/v1/hosts/{segment(name)}/drain")
    for warning in result.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    if wait:
        result["migrations"] = [follow(api(), m["id"], timeout, quiet=json_) for m in result["migrations"]]
    if json_:
        return emit_json(result)
    for m in result["migrations"]:
        print(summary(m))
    for refusal in result.get("refused", []):
        print(f"not moved: {refusal}")


# ---- VMs -----------------------------------------------------------------------------------------------------------


@vm_app.command("create")
def vm_create(
    name: str,
    tenant: Annotated[str, typer.Option(help="owning tenant")],
    profile: Annotated[list[str] | None, typer.Option(help="profile label key=value (repeatable)")] = None,
    memory: Annotated[str, typer.Option(help="memory, MiB or with unit (256, 256M, 1G)")] = "256",
    disk: Annotated[str, typer.Option(help="disk size (64M, 1G)")] = "64M",
    vcpus: int = 1,
    host: Annotated[str | None, typer.Option(help="pin to this host")] = None,
    dirty_rate: Annotated[int, typer.Option("--dirty-kib", help="guest memory dirtying rate, KiB/s")] = 256,
    record_interval: Annotated[int, typer.Option("--record-ms", help="guest disk record interval, ms")] = 1000,
    resident: Annotated[
        int, typer.Option("--resident-mib", help="guest RAM filled with data at boot (what migrations carry), MiB")
    ] = 0,
    force: Annotated[bool, typer.Option("--force", help="break glass: ignore hard placement rules (audited)")] = False,
    encrypted: Annotated[
        bool, typer.Option("--encrypted", help="LUKS-encrypted disks under per-copy keys (crypto-erase on discard)")
    ] = False,
    image: Annotated[str | None, typer.Option("--image", help="boot from this registry image (verified)")] = None,
    full_copy: Annotated[
        bool, typer.Option("--full-copy", help="copy the whole image to the VM's disk instead of an overlay on it")
    ] = False,
    network: Annotated[
        list[str] | None, typer.Option("--network", help="give the VM a NIC on this network (repeatable)")
    ] = None,
    ip: Annotated[
        list[str] | None, typer.Option("--ip", help="IPv4 address of the NIC of the same position (default: next free)")
    ] = None,
    json_: Json = False,
) -> None:
    """Create and boot a VM (on the best host its placement policies allow, unless --host)."""
    networks, ips = network or [], ip or []
    if len(ips) > len(networks):
        raise CliError(f"{len(ips)} --ip for {len(networks)} --network: give one --network per --ip, in order")
    body = {
        "name": name,
        "tenant": tenant,
        "profile": parse_profile(profile or []),
        "memory": memory,
        "disk": disk,
        "vcpus": vcpus,
        "host": host,
        "dirty_kib_per_s": dirty_rate,
        "record_interval_ms": record_interval,
        "resident_mib": resident,
        "force": force,
        "encrypted": encrypted,
        "image": image,
        "full_copy": full_copy,
        "networks": [{"network": n, "ip": ips[i] if i < len(ips) else None} for i, n in enumerate(networks)],
    }
    print(f"creating {name} ...", file=sys.stderr)
    vm = api().post("/api/v1/vms", body)
    emit_json(vm) if json_ else print(f"{vm['name']} is {vm['state']} on {vm['host']} (generation {vm['generation']})")


VM_COLUMNS = ["VM", "TENANT", "STATE", "HOST", "SINCE", "GEN", "MEM MiB", "PROFILE"]


def _vm_row(v: dict[str, Any]) -> list[Any]:
    profile = ",".join(f"{k}={val}" for k, val in sorted(v["profile"].items()))
    return [
        v["name"],
        v["tenant"],
        v["state"],
        v["host"],
        short_time(v["since"]),
        v["generation"],
        v["memory_mb"],
        profile,
    ]


@vm_app.command("list")
def vm_list(
    tenant: Annotated[str | None, typer.Option()] = None,
    host: Annotated[str | None, typer.Option()] = None,
    json_: Json = False,
) -> None:
    """List VMs: where each runs, since when, its generation."""
    vms = api().get("/api/v1/vms", tenant=tenant, host=host)
    if json_:
        return emit_json(vms)
    table(None, VM_COLUMNS, [_vm_row(v) for v in vms])


@vm_app.command("show")
def vm_show(name: str, json_: Json = False) -> None:
    """Show a VM: host, since when, generation, its neighbours now."""
    vm = api().get(vm_path(name))
    if json_:
        return emit_json(vm)
    fields(
        [
            ("name", vm["name"]),
            ("id", vm["id"]),
            ("tenant", vm["tenant"]),
            ("state", vm["state"]),
            ("host", vm["host"]),
            ("since", short_time(vm["since"])),
            ("generation", vm["generation"]),
            ("memory", f"{vm['memory_mb']} MiB"),
            ("vcpus", vm["vcpus"]),
            ("disk", f"{vm['disk_bytes'] >> 20} MiB"),
            ("profile", ", ".join(f"{k}={v}" for k, v in sorted(vm["profile"].items())) or "-"),
            ("encrypted", "yes (per-copy disk keys)" if vm.get("encrypted") else "no"),
            ("image", (vm.get("image") or "-") + (" (full copy)" if vm.get("full_copy") else "")),
        ]
    )
    if vm.get("nics"):
        table("NICs", NIC_COLUMNS, nic_rows(vm["nics"]))
    if vm["neighbours"]:
        table("neighbours now", ["VM", "TENANT", "HOST", "SINCE", "UNTIL"], _neighbour_rows(vm["neighbours"]))
    else:
        print("neighbours now: none")


def _action(name: str, action: str) -> None:
    vm = api().post(vm_path(name, f"/{action}"))
    print(f"{vm['name']} is {vm['state']} on {vm['host']}")


@vm_app.command("start")
def vm_start(name: str) -> None:
    """Boot a stopped VM."""
    _action(name, "start")


@vm_app.command("stop")
def vm_stop(name: str) -> None:
    """Power a VM off (its disk stays)."""
    _action(name, "stop")


@vm_app.command("pause")
def vm_pause(name: str) -> None:
    """Pause a running VM."""
    _action(name, "pause")


@vm_app.command("resume")
def vm_resume(name: str) -> None:
    """Resume a paused VM."""
    _action(name, "resume")


@vm_app.command("delete")
def vm_delete(name: str) -> None:
    """Destroy a VM and remove its files from its host."""
    vm = api().delete(vm_path(name))
    print(f"{vm['name']} deleted")


@vm_app.command("history")
def vm_history(name: str, json_: Json = False) -> None:
    """Every host a VM ever ran on, with times."""
    items = api().get(vm_path(name, "/history"))
    if json_:
        return emit_json(items)
    table(
        f"host chain of {name}",
        ["HOST", "GEN", "FROM", "TO"],
        [[p["host"], p["generation"], short_time(p["valid_from"]), short_time(p["valid_to"])] for p in items],
    )


@vm_app.command("keys")
def vm_keys(name: str, json_: Json = False) -> None:
    """The disk keys of an encrypted VM's copies: host, generation, and when each was made and destroyed."""
    items = api().get(vm_path(name, "/keys"))
    if json_:
        return emit_json(items)
    table(
        f"disk keys of {name}",
        ["HOST", "GEN", "LIVE", "CREATED", "DESTROYED", "WHY"],
        [
            [
                k["host"],
                k["generation"],
                "yes" if k["live"] else "no",
                short_time(k["created_at"]),
                short_time(k["destroyed_at"]),
                k["destroyed_reason"] or "",
            ]
            for k in items
        ],
    )


@vm_app.command("migrate")
def vm_migrate(
    name: str,
    to: Annotated[str, typer.Option("--to", help="destination host")],
    shared_storage: Annotated[
        bool, typer.Option("--shared-storage", help="RAM only: both hosts see the image")
    ] = False,
    bandwidth: Annotated[int | None, typer.Option("--bandwidth", help="cap in MiB/s")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="follow the migration to its end")] = True,
    timeout: Annotated[float, typer.Option(help="seconds to follow before giving up")] = 1800,
    force: Annotated[bool, typer.Option("--force", help="break glass: ignore hard placement rules (audited)")] = False,
    json_: Json = False,
) -> None:
    """Live-migrate a VM to another host (mutual TLS, exactly one running copy, source scrubbed)."""
    migrate_vm(name, to, shared_storage, bandwidth, wait, timeout, json_, force)


@vm_app.command("snapshots")
def vm_snapshots(name: str, json_: Json = False) -> None:
    """The VM's pre-migration disk snapshots on its host (kept after a rollback; scrubbed after a migration)."""
    items = api().get(vm_path(name, "/snapshots"))
    if json_:
        return emit_json(items)
    table(
        f"snapshots of {name}",
        ["TAG", "DISK", "TAKEN", "SIZE", "HOST"],
        [[s["tag"], s["disk"], short_time(s["taken_at"]), s["size_bytes"], s["host"]] for s in items],
    )


@vm_app.command("restore")
def vm_restore(
    name: str,
    tag: Annotated[str | None, typer.Option("--tag", help="snapshot tag (default: the newest)")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    json_: Json = False,
) -> None:
    """Put a VM's disks back to a snapshot and boot it again (the replaced disks are scrubbed)."""
    if not yes:
        if not sys.stdin.isatty():
            raise CliError("restore discards the VM's current disks: pass --yes to confirm")
        typer.confirm(f"Restore {name} from {tag or 'its newest snapshot'}, discarding its current disks?", abort=True)
    result = api().post(vm_path(name, "/restore"), {"tag": tag})
    if json_:
        return emit_json(result)
    print(f"{result['vm']} restored on {result['host']} from {result['tag']} (taken {short_time(result['taken_at'])})")
