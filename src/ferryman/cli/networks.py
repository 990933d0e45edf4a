"""``ferryman network …`` and a VM's NICs (``vm nics``, ``vm isolate``, ``vm unisolate``): tenant networks, their
members and the anti-spoofing rules each NIC's host read back.

Listings render a table, or the API's JSON with ``--json``.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ferryman.cli.context import Json, api, segment, vm_path
from ferryman.cli.output import emit_json, fields, short_time, table

network_app = typer.Typer(no_args_is_help=True, help="Tenant networks (overlay segments, addresses, NIC rules).")

NIC_COLUMNS = ["NIC", "NETWORK", "MAC", "IPV4", "IPV6", "TAP", "ISOLATED", "REV", "RULES", "WHERE", "APPLIED"]


def nic_rows(nics: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            n["id"],
            n["network"],
            n["mac"],
            n["ipv4"],
            n.get("ipv6") or "-",
            n["tap"],
            "yes" if n["isolated"] else "no",
            n["revision"],
            (n.get("rules_hash") or "-")[:19],
            n.get("rules_host") or "-",
            short_time(n.get("applied_at")),
        ]
        for n in nics
    ]


@network_app.command("create")
def network_create(
    name: str,
    tenant: Annotated[str, typer.Option(help="owning tenant")],
    cidr: Annotated[str, typer.Option(help="IPv4 prefix, e.g. 10.50.1.0/24 (the first address is the gateway's)")],
    cidr6: Annotated[str | None, typer.Option("--cidr6", help="IPv6 prefix (/48 to /64)")] = None,
    vlan: Annotated[int | None, typer.Option(help="segment id to use (1-4094; carried as the VXLAN VNI)")] = None,
    forensic_port: Annotated[int, typer.Option("--forensic-port", help="the TCP port an isolated VM keeps open")] = 22,
    json_: Json = False,
) -> None:
    """Create a tenant network: one overlay segment, isolated from every other tenant's."""
    body = {"name": name, "tenant": tenant, "cidr": cidr, "cidr6": cidr6, "vlan": vlan, "forensic_port": forensic_port}
    created = api().post("/api/v1/networks", body)
    if json_:
        return emit_json(created)
    segment = f" on segment {created['vni']}" if "vni" in created else ""  # a tenant's principal is not told
    print(f"network {created['name']} for {created['tenant']}: {created['cidr']}{segment}")


@network_app.command("list")
def network_list(tenant: Annotated[str | None, typer.Option()] = None, json_: Json = False) -> None:
    """List networks with their segment and member count."""
    nets = api().get("/api/v1/networks", tenant=tenant)
    if json_:
        return emit_json(nets)
    rows = [[n["name"], n["tenant"], n["cidr"], n.get("cidr6") or "-", n.get("vni", "-"), n["members"]] for n in nets]
    table(None, ["NETWORK", "TENANT", "CIDR", "CIDR6", "SEGMENT", "NICS"], rows)


@network_app.command("show")
def network_show(
    name: str,
    tenant: Annotated[str | None, typer.Option(help="whose network (a name may be used in several tenants)")] = None,
    json_: Json = False,
) -> None:
    """Show a network: members (VM, NIC, addresses, host), the hosts it spans, its rules' versions."""
    net = api().get(f"/api/v1/networks/{segment(name)}", tenant=tenant)
    if json_:
        return emit_json(net)
    fields(
        [
            ("name", net["name"]),
            ("tenant", net["tenant"]),
            ("cidr", net["cidr"]),
            ("cidr6", net.get("cidr6") or "-"),
            (
                "segment",
                f"VNI {net['vni']}" + (f" (VLAN {net['vlan']} asked)" if net.get("vlan") else "")
                if "vni" in net
                else "-",
            ),
            ("forensic port", net["forensic_port"]),
            ("rule format", f"v{net['rules_format']} (each NIC has its own revision)"),
            ("hosts", ", ".join(net["hosts"]) or "-"),
        ]
    )
    rows = [[n["vm"], n.get("host") or "-", *row] for n, row in zip(net["nics"], nic_rows(net["nics"]), strict=True)]
    if rows:
        table("members", ["VM", "HOST", *NIC_COLUMNS], rows)
    else:
        print("members: none")


def vm_nics(
    name: str,
    live: Annotated[bool, typer.Option(help="read the rules back from the host now")] = False,
    json_: Json = False,
) -> None:
    """A VM's NICs: network, MAC, addresses, tap, rules hash and where it was verified (--live: as read now)."""
    nics = api().get(vm_path(name, "/nics"), live=live or None)
    if json_:
        return emit_json(nics)
    table(None, NIC_COLUMNS, nic_rows(nics))
    for n in nics if live else []:
        state = n.get("live")
        if state is None:
            print(f"{n['id']}: no rules on its host now")
            continue
        verdict = "matches" if state["hash"] == n.get("rules_hash") else "DIFFERS FROM"
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(state["counters"].items()) if v) or "nothing"
        print(f"{n['id']} on {state['host']}: {state['hash'][:19]} {verdict} the CMDB; dropped: {dropped}")


def vm_isolate(name: str, json_: Json = False) -> None:
    """Cut every NIC of the VM off but its network's forensic port (audited; the rules move with the VM)."""
    _isolation(name, "isolate", json_)


def vm_unisolate(name: str, json_: Json = False) -> None:
    """Give an isolated VM its network back (audited)."""
    _isolation(name, "unisolate", json_)


def _isolation(name: str, verb: str, json_: bool) -> None:
    out = api().post(vm_path(name, f"/{verb}"))
    if json_:
        return emit_json(out)
    state = "isolated" if out["isolated"] else "no longer isolated"
    print(
        f"{out['vm']} on {out['host']} is {state}; rules: "
        + ", ".join(f"{n['id']} rev {n['revision']} {(n.get('rules_hash') or 'pending')[:19]}" for n in out["nics"])
    )
