"""``ferryman policy …``, ``ferryman place``, ``ferryman compliance …`` and ``ferryman host set``.

Policy files are read here (a directory of ``*.yaml``/``*.yml`` files, or single files) and sent to the controller,
which validates them against the fleet and keeps every applied version. ``policy validate`` also checks the syntax
locally first, so a typo is reported even without a controller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ferryman.cli.context import api as _api
from ferryman.cli.context import parse_profile, segment
from ferryman.cli.output import emit_json, fields, short_time, table
from ferryman.client import CliError

policy_app = typer.Typer(no_args_is_help=True, help="Placement policies (YAML, versioned).")
compliance_app = typer.Typer(no_args_is_help=True, help="Compliance of the fleet with the placement policies.")

Json = Annotated[bool, typer.Option("--json", help="print JSON")]
Paths = Annotated[list[Path], typer.Argument(help="policy files or directories of *.yaml files")]


def read_policy_files(paths: list[Path]) -> dict[str, str]:
    """File name (as given) -> text, for every YAML file named or found directly in a named directory."""
    documents: dict[str, str] = {}
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in {".yaml", ".yml"} and p.is_file())
            if not found:
                raise CliError(f"{path}: no *.yaml files")
        elif path.is_file():
            found = [path]
        else:
            raise CliError(f"{path}: no such file or directory")
        for file in found:
            try:
                documents[str(file)] = file.read_text()
            except (OSError, UnicodeDecodeError) as err:
                raise CliError(f"{file}: cannot read: {err}") from None
    return documents


def _print_errors(errors: list[dict[str, Any]]) -> None:
    for e in errors:
        print(e["message"])


@policy_app.command("validate")
def policy_validate(paths: Paths, json_: Json = False) -> None:
    """Check policy files: syntax, fields, types, contradictions, and rules no host of the fleet can satisfy."""
    # the pure parser alone (no I/O), so a mistake in a file is reported even when no controller is reachable
    from ferryman.policy.schema import check_policies

    documents = read_policy_files(paths)
    local = check_policies(documents)
    if local:
        result: dict[str, Any] = {
            "ok": False,
            "errors": [e.as_dict() for e in local],
            "policies": [],
        }
    else:
        result = _api().post("/api/v1/policies/validate", {"documents": documents})
    if json_:
        emit_json(result)
    elif result["ok"]:
        print(f"ok: {len(result['policies'])} policies in {len(documents)} file(s): {', '.join(result['policies'])}")
    else:
        _print_errors(result["errors"])
    if not result["ok"]:
        raise typer.Exit(1)


def _finding_rows(items: list[dict[str, Any]]) -> list[list[Any]]:
    return [[f.get("vm") or f["vm_id"], f["host"], f["policy"], f["rule"], f["message"]] for f in items]


@policy_app.command("apply")
def policy_apply(
    paths: Paths,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only show what the new version would violate")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="apply without asking")] = False,
    json_: Json = False,
) -> None:
    """Apply policy files as a new version; first shows the violations the new version would open and resolve."""
    import sys

    documents = read_policy_files(paths)
    preview = _api().post("/api/v1/policies/preview", {"documents": documents})
    if preview["errors"]:
        if json_:
            emit_json(preview)
        else:
            _print_errors(preview["errors"])
        raise typer.Exit(1)
    if not json_:
        print(f"{len(preview['policies'])} policies: {', '.join(preview['policies'])}")
        table("would violate", ["VM", "HOST", "POLICY", "RULE", "WHY"], _finding_rows(preview["would_violate"]))
        if preview["would_resolve"]:
            table("would resolve", ["VM", "HOST", "POLICY", "RULE", "WHY"], _finding_rows(preview["would_resolve"]))
    if dry_run:
        if json_:
            emit_json(preview)
        return
    if not yes:
        if not sys.stdin.isatty():
            raise CliError("applying changes what the fleet must comply with: pass --yes (or --dry-run to preview)")
        typer.confirm("Apply this policy version?", abort=True)
    result = _api().post("/api/v1/policies/apply", {"documents": documents})
    if json_:
        return emit_json(result)
    print(f"policy version {result['version']} in force")


@policy_app.command("clear")
def policy_clear(yes: Annotated[bool, typer.Option("--yes", help="clear without asking")] = False) -> None:
    """Apply an empty version: no placement policy is enforced any more."""
    import sys

    if not yes:
        if not sys.stdin.isatty():
            raise CliError("clearing lifts every placement rule: pass --yes")
        typer.confirm("Lift every placement policy?", abort=True)
    print(f"policy version {_api().post('/api/v1/policies/clear')['version']}: no policy in force")


@policy_app.command("list")
def policy_list(json_: Json = False) -> None:
    """The policies in force."""
    items = _api().get("/api/v1/policies")
    if json_:
        return emit_json(items)
    table(
        None,
        ["NAME", "FILE", "VERSION", "APPLIED", "BY", "DESCRIPTION"],
        [
            [p["name"], p["file"], p["version"], short_time(p["applied_at"]), p["applied_by"], p["description"]]
            for p in items
        ],
    )


@policy_app.command("versions")
def policy_versions(json_: Json = False) -> None:
    """Every applied version, newest first."""
    items = _api().get("/api/v1/policies/versions")
    if json_:
        return emit_json(items)
    table(
        None,
        ["VERSION", "APPLIED", "BY", "FILES"],
        [[v["version"], short_time(v["applied_at"]), v["applied_by"], ", ".join(v["files"])] for v in items],
    )


@policy_app.command("show")
def policy_show(name: str, json_: Json = False) -> None:
    """One policy in force, as the controller understood it."""
    import yaml

    item = _api().get(f"/api/v1/policies/{segment(name)}")
    if json_:
        return emit_json(item)
    print(f"# {item['name']} (version {item['version']}, from {item['file']})")
    print(yaml.safe_dump(item["document"], sort_keys=False).rstrip())


def place(
    tenant: Annotated[str, typer.Option("--tenant")],
    profile: Annotated[list[str] | None, typer.Option("--profile", help="label key=value (repeatable)")] = None,
    memory: Annotated[str, typer.Option("--memory")] = "256M",
    name: Annotated[str, typer.Option("--name", help="the new VM's name (policies may select by name)")] = "(new)",
    json_: Json = False,
) -> None:
    """The best allowed host for a new VM, and why every other host is rejected."""
    result = _api().post(
        "/api/v1/place", {"tenant": tenant, "profile": parse_profile(profile or []), "memory": memory, "name": name}
    )
    if json_:
        return emit_json(result)
    print(f"best host: {result['host'] or 'none allowed'}" + (f" (score {result['score']})" if result["host"] else ""))
    rows = [
        [h, r["policy"], r["rule"], r["message"]]
        for h, reasons in sorted(result["rejections"].items())
        for r in reasons
    ]
    if rows:
        table("rejected", ["HOST", "POLICY", "RULE", "WHY"], rows)


def host_set(
    name: str,
    patch_level: Annotated[int | None, typer.Option("--patch-level")] = None,
    hypervisor_version: Annotated[str | None, typer.Option("--hypervisor-version")] = None,
    zone: Annotated[str | None, typer.Option("--zone")] = None,
    subnet: Annotated[str | None, typer.Option("--subnet")] = None,
    virt_type: Annotated[str | None, typer.Option("--virt-type")] = None,
    role: Annotated[str | None, typer.Option("--role", help="compute or quarantine")] = None,
    json_: Json = False,
) -> None:
    """Change a host's attributes (its VMs are re-checked against the policies at once)."""
    body = {
        k: v
        for k, v in {
            "patch_level": patch_level,
            "hypervisor_version": hypervisor_version,
            "zone": zone,
            "subnet": subnet,
            "virt_type": virt_type,
            "role": role,
        }.items()
        if v is not None
    }
    if not body:
        raise CliError("nothing to change: give at least one option")
    host = _api().request("PATCH", f"/api/v1/hosts/{segment(name)}", json=body)
    if json_:
        return emit_json(host)
    fields([(k, host[k]) for k in ("name", "zone", "subnet", "virt_type", "hypervisor_version", "patch_level", "role")])


@compliance_app.command("check")
def compliance_check(
    all_: Annotated[bool, typer.Option("--all", help="include resolved violations")] = False, json_: Json = False
) -> None:
    """Audit every VM now; list the violations with the time each was first seen and the rule it breaks."""
    api = _api()
    api.post("/api/v1/compliance/check")
    items = api.get("/api/v1/compliance/violations", all=all_)
    if json_:
        return emit_json(items)
    table(
        None,
        ["VM", "HOST", "POLICY", "RULE", "FIRST SEEN", "RESOLVED", "WHY"],
        [
            [
                v["vm"],
                v["host"],
                v["policy"],
                v["rule"],
                short_time(v["first_seen"]),
                short_time(v["resolved_at"]),
                v["message"],
            ]
            for v in items
        ],
    )
    if not items:
        print("no violation")


@compliance_app.command("plan")
def compliance_plan(
    execute: Annotated[bool, typer.Option("--execute", help="run the plan through the secure migration path")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="execute without asking")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the whole plan")] = 3600,
    json_: Json = False,
) -> None:
    """Migrations that remove the violations within the throttles and cooldowns, fewest moves first."""
    import sys

    api = _api()
    plan = api.get("/api/v1/compliance/plan")
    if not json_ or not execute:
        if json_:
            return emit_json(plan)
        table(
            "plan",
            ["VM", "FROM", "TO", "FIXES"],
            [
                [m["vm"], m["source"], m["target"], "; ".join("/".join(k[1:]) for k in m["fixes"])]
                for m in plan["moves"]
            ],
        )
        if plan["unresolved"]:
            table(
                "not resolved by this plan",
                ["VM", "POLICY", "RULE", "WHY"],
                [[u["vm"], u["policy"], u["rule"], u["why"]] for u in plan["unresolved"]],
            )
    if not execute:
        return
    if not plan["moves"]:
        print("nothing to execute")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise CliError("executing migrates VMs: pass --yes")
        typer.confirm(f"Execute {len(plan['moves'])} migration(s)?", abort=True)
    result = api.request("POST", "/api/v1/compliance/plan/execute", timeout=timeout)
    if json_:
        return emit_json(result)
    for m in result["executed"]:
        print(f"{m['vm']}: {m['source']} → {m['target']}: " + (m["error"] or f"migration {m['migration'][:8]}"))
    print(f"{result['remaining']} violation(s) remain")


@compliance_app.command("report")
def compliance_report(
    tenant: Annotated[str, typer.Option("--tenant")],
    since: Annotated[str, typer.Option(help="ISO time or relative like -7d")] = "-30d",
    until: Annotated[str, typer.Option(help="ISO time or now")] = "now",
    html: Annotated[Path | None, typer.Option("--html", help="write the report as an HTML page to this file")] = None,
    json_: Json = False,
) -> None:
    """A tenant's co-location report: neighbours over time (pseudonymous), changes, incidents, sites and hosts."""
    api = _api()
    if html is not None:
        page = api.request(
            "GET",
            "/api/v1/compliance/report",
            params={"tenant": tenant, "since": since, "until": until, "format": "html"},
            raw=True,
        )
        html.write_text(page)
        print(f"report for {tenant} written to {html}")
        return
    report = api.get("/api/v1/compliance/report", tenant=tenant, since=since, until=until)
    if json_:
        return emit_json(report)
    summary = report["summary"]
    fields(
        [
            ("tenant", report["tenant"]),
            ("period", f"{short_time(report['start'])} to {short_time(report['end'])}"),
            ("distinct neighbours", summary["distinct_neighbours"]),
            ("max simultaneous", summary["max_simultaneous_neighbours"]),
            ("lowest neighbour level", summary["lowest_neighbour_security_level"]),
            ("sites used", ", ".join(summary["sites_used"])),
        ]
    )
    table(
        "co-location changes",
        ["TIME", "VM", "HOST", "CHANGE", "NEIGHBOUR", "LEVEL"],
        [
            [short_time(c["time"]), c["own_vm"], c["host"], c["change"], c["neighbour"], c["security_level"]]
            for c in report["changes"]
        ],
    )
