"""``ferryman incident …`` and ``ferryman host compromise``: incidents, forensic capture, evidence (verified,
exported with a chain of custody) and impact over present and past neighbours.

Listings render a table, or the API's JSON with ``--json``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ferryman.cli.context import Json, api, segment
from ferryman.cli.output import emit_json, fields, short_time, table
from ferryman.client import CliError

incident_app = typer.Typer(no_args_is_help=True, help="Security incidents: alerts, forensic capture, evidence, impact.")


def _row(i: dict[str, Any]) -> list[Any]:
    subject = i["vm"] or (f"host {i['host']}" if i["host"] else i["vm_id"])
    return [
        i["id"],
        i["severity"],
        i["state"],
        subject,
        i["source"],
        i["alerts"],
        short_time(i["opened_at"]),
        i["summary"][:60],
    ]


COLUMNS = ["ID", "SEVERITY", "STATE", "SUBJECT", "SOURCE", "ALERTS", "OPENED", "SUMMARY"]


@incident_app.command("open")
def incident_open(
    summary: Annotated[str, typer.Option(help="what happened")],
    vm: Annotated[str | None, typer.Option(help="the VM it is about")] = None,
    host: Annotated[str | None, typer.Option(help="the host it is about")] = None,
    severity: Annotated[str, typer.Option(help="low, medium, high or critical")] = "medium",
    playbook: Annotated[bool, typer.Option("--playbook/--no-playbook", help="run its severity's playbook")] = True,
    json_: Json = False,
) -> None:
    """Open an incident about a VM or a host (its severity's playbook runs, unless --no-playbook)."""
    body = {"vm": vm, "host": host, "severity": severity, "summary": summary, "playbook": playbook}
    out = api().post("/api/v1/incidents", body)
    if json_:
        return emit_json(out)
    print(f"incident {out['id']} opened ({out['severity']}) about {out['vm'] or 'host ' + str(out['host'])}")


@incident_app.command("list")
def incident_list(
    open_: Annotated[bool, typer.Option("--open", help="only open incidents")] = False, json_: Json = False
) -> None:
    """List incidents, newest first."""
    items = api().get("/api/v1/incidents", open=open_ or None)
    if json_:
        return emit_json(items)
    table(None, COLUMNS, [_row(i) for i in items])


@incident_app.command("show")
def incident_show(incident_id: int, json_: Json = False) -> None:
    """An incident with its timeline (every action, when and by whom) and its evidence."""
    out = api().get(f"/api/v1/incidents/{incident_id}")
    if json_:
        return emit_json(out)
    fields(
        [
            ("id", out["id"]),
            ("severity", out["severity"]),
            ("state", out["state"]),
            ("subject", out["vm"] or f"host {out['host']}"),
            ("tenant", out["tenant"] or "-"),
            ("source", out["source"]),
            ("alerts", out["alerts"]),
            ("opened", f"{short_time(out['opened_at'])} by {out['opened_by']}"),
            ("summary", out["summary"]),
            (
                "closed",
                f"{short_time(out['closed_at'])} by {out['closed_by']}: {out['resolution']}"
                if out["closed_at"]
                else "-",
            ),
        ]
    )
    table(
        "timeline",
        ["AT", "WHO", "KIND", "WHAT"],
        [[short_time(a["at"]), a["principal"], a["kind"], a["message"]] for a in out["timeline"]],
    )
    if out["evidence"]:
        table(
            "evidence", ["CAPTURE", "ARTEFACT", "HOST", "MiB", "SHA-256 (PLAINTEXT)"], _evidence_rows(out["evidence"])
        )


def _evidence_rows(items: list[dict[str, Any]]) -> list[list[Any]]:
    return [[e["capture"], e["artefact"], e["host"], e["plaintext_bytes"] >> 20, e["plaintext_sha256"]] for e in items]


@incident_app.command("capture")
def incident_capture(
    incident_id: int,
    memory: Annotated[bool, typer.Option("--memory/--no-memory")] = True,
    disks: Annotated[bool, typer.Option("--disks/--no-disks")] = True,
    json_: Json = False,
) -> None:
    """Capture the incident VM's memory and disks now, sealed from the first byte, into the evidence store."""
    print(f"capturing for incident {incident_id} ...", file=sys.stderr)
    out = api().post(f"/api/v1/incidents/{incident_id}/capture", {"memory": memory, "disks": disks})
    if json_:
        return emit_json(out)
    for a in out["manifest"]["artefacts"]:
        print(f"{a['artefact']}: {a['plaintext_bytes'] >> 20} MiB {a['plaintext_sha256']}")
    print(f"capture {out['capture']}: manifest signed; the host's copy scrubbed ({len(out['receipts'])} receipts)")


@incident_app.command("evidence")
def incident_evidence(
    incident_id: int,
    verify: Annotated[bool, typer.Option("--verify", help="re-hash, unseal and check every signature")] = False,
    export: Annotated[
        Path | None, typer.Option("--export", help="write the plaintext artefacts and manifests here")
    ] = None,
    json_: Json = False,
) -> None:
    """The incident's evidence: manifest, hashes, signature; verified or exported (each a custody event)."""
    client = api()
    out = client.get(f"/api/v1/incidents/{incident_id}/evidence", verify=verify or None)
    if export is not None:
        _export(client, incident_id, out, export)
    if json_:
        return emit_json(out)
    table(None, ["CAPTURE", "ARTEFACT", "HOST", "MiB", "SHA-256 (PLAINTEXT)"], _evidence_rows(out["evidence"]))
    verification = out.get("verification")
    if verification is not None and not verification["artefacts"]:
        print("no evidence to verify")
    elif verification is not None:
        for r in verification["artefacts"]:
            print(f"{r['capture']}/{r['artefact']}: {'ok' if r['ok'] else 'FAILED'} {r['detail']}")
        print("evidence intact" if verification["ok"] else "evidence FAILED verification")
        if not verification["ok"]:
            raise typer.Exit(1)


def _export(client: Any, incident_id: int, out: dict[str, Any], directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"cannot create {directory}: {err.strerror or err}") from err
    for manifest in out["manifests"]:
        # the exact bytes the signature covers (UTF-8, whatever the locale)
        (directory / f"{manifest['capture']}.manifest.json").write_bytes(manifest["body"].encode())
        (directory / f"{manifest['capture']}.manifest.sig").write_text(manifest["signature"] + "\n")
    if out["manifests"]:  # the certificate that checks the signatures, for a verifier without Ferryman (README)
        (directory / "signer.pem").write_text(out["signer"]["certificate_pem"])
    for e in out["evidence"]:
        dest = directory / f"{e['capture']}.{e['artefact']}"
        size = client.download(f"/api/v1/incidents/{incident_id}/evidence/{e['capture']}/{e['artefact']}", dest)
        print(f"exported {dest} ({size >> 20} MiB)", file=sys.stderr)


@incident_app.command("impact")
def incident_impact(
    incident_id: int,
    since: Annotated[
        str | None, typer.Option(help="ISO time or relative like -7d (default: a week before it opened)")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="one tenant's own view (names no other tenant)")] = None,
    json_: Json = False,
) -> None:
    """Present and past neighbours since T, other tenants touched, the host chain, VMs of the same image."""
    out = api().get(f"/api/v1/incidents/{incident_id}/impact", since=since, tenant=tenant)
    if json_ or tenant is not None:  # a tenant's view is a document to hand over as it is
        return emit_json(out)
    _print_impact(out)


def _until(value: str | None) -> str:
    return short_time(value) if value else "now"


def _print_impact(out: dict[str, Any]) -> None:
    window = out["window"]
    subject = f"VM {out['vm']['name']} ({out['vm']['tenant']})" if out["vm"] else f"host {out['host']}"
    print(f"impact of an incident at {subject}, from {short_time(window['since'])} to {_until(window['until'])}")
    print(f"tenants touched: {', '.join(out['tenants_touched']) or 'none'}")
    stays = out["host_chain"]
    if stays:
        table(
            "host chain",
            ["HOST", "FROM", "TO"],
            [[r["host"], short_time(r["resident_from"]), _until(r["resident_to"])] for r in stays],
        )
    residents = out["co_residents"] or out["host_residents"]
    begin, end = ("overlap_from", "overlap_to") if out["co_residents"] else ("resident_from", "resident_to")
    table(
        "neighbours" if out["co_residents"] else "VMs on the host",
        ["VM", "TENANT", "HOST", "FROM", "TO"],
        [
            [
                r["vm_name"] + (" (deleted)" if r["deleted"] else ""),
                r["tenant"],
                r["host"],
                short_time(r[begin]),
                _until(r[end]),
            ]
            for r in residents
        ],
    )
    for title, key in (("same image", "same_image"), ("same baseline (OS and version)", "same_baseline")):
        if out[key]:
            table(title, ["VM", "TENANT", "IMAGE"], [[m["vm_name"], m["tenant"], m["image"]] for m in out[key]])


@incident_app.command("close")
def incident_close(
    incident_id: int, resolution: Annotated[str, typer.Option(help="how it was resolved")], json_: Json = False
) -> None:
    """Close an incident with its resolution."""
    out = api().post(f"/api/v1/incidents/{incident_id}/close", {"resolution": resolution})
    if json_:
        return emit_json(out)
    print(f"incident {incident_id} closed")


playbook_app = typer.Typer(no_args_is_help=True, help="The incident playbook: what each severity triggers.")


@playbook_app.command("show")
def playbook_show(json_: Json = False) -> None:
    """The playbook in force (the built-in default until one is applied)."""
    out = api().get("/api/v1/playbook")
    if json_:
        return emit_json(out)
    version = "built-in default" if out["default"] else f"v{out['version']}"
    print(f"playbook {out['name']} ({version}, {out['digest'][:19]})")
    document = out["document"]
    print(f"quarantine hosts: role {document['quarantine_role']}; reserve {document['reserve']} quarantine(s)")
    for severity, steps in document["severities"].items():
        print(f"  {severity:<8} → " + ", ".join(s if isinstance(s, str) else next(iter(s)) for s in steps))


@playbook_app.command("apply")
def playbook_apply(path: Path, json_: Json = False) -> None:
    """Check a playbook YAML file and put it in force as a new version (running playbooks keep their steps)."""
    try:
        text = path.read_text()
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror or err}") from err
    out = api().request("PUT", "/api/v1/playbook", json={"text": text, "filename": path.name})
    if json_:
        return emit_json(out)
    print(f"playbook {out['name']} v{out['version']} in force ({out['digest'][:19]})")


@playbook_app.command("run")
def playbook_run(incident_id: int, json_: Json = False) -> None:
    """Where an incident's playbook stands: its steps, the next one, its state."""
    out = api().get(f"/api/v1/incidents/{incident_id}/playbook")
    if json_:
        return emit_json(out)
    if out["state"] is None:
        print(f"incident {incident_id} has no playbook run")
        return
    steps = [s["kind"] for s in out["steps"]]
    done = ", ".join(steps[: out["next_step"]]) or "-"
    print(f"incident {incident_id}: {out['state']}; done: {done}; next: {', '.join(steps[out['next_step'] :]) or '-'}")
    if out["error"]:
        print(f"error: {out['error']}")


@incident_app.command("capacity")
def incident_capacity(json_: Json = False) -> None:
    """Room on the quarantine hosts against the reserve of simultaneous quarantines the playbook keeps."""
    out = api().get("/api/v1/capacity/quarantine")
    if json_:
        return emit_json(out)
    rows = [
        [h["name"], h["memory_mb"], h["used_mb"], h["free_mb"], "yes" if h["reachable"] else "no"] for h in out["hosts"]
    ]
    table(f"hosts with role {out['role']}", ["HOST", "MiB", "USED", "FREE", "REACHABLE"], rows)
    state = "ok" if out["headroom_mb"] >= 0 else "BROKEN"
    print(
        f"reserve {out['reserve']} x {out['largest_vm_mb']} MiB (the largest VM) = {out['needed_mb']} MiB;"
        f" headroom {out['headroom_mb']} MiB ({state})"
    )


def host_compromise(
    name: str,
    since: Annotated[str, typer.Option(help="since when the host is suspect: ISO time or relative like -2d")],
    json_: Json = False,
) -> None:
    """A compromised host: an incident, every VM that ran there since T, evacuation, then its certificates revoked."""
    out = api().post(f"/api/v1/hosts/{segment(name)}/compromise", {"since": since})
    if json_:
        return emit_json(out)
    ran = ", ".join(out["vms_since"]) or "none"
    print(f"incident {out['incident']}: {len(out['vms_since'])} VM(s) ran on {name} since {since}: {ran}")
    for m in out["migrations"]:
        print(f"evacuating {m['vm']} to {m['to']} (migration {m['id'][:8]})")
    for reason in out["not_started"]:
        print(f"not evacuated: {reason}")
    print(f"{name} takes no placements; its certificates are revoked once the evacuation ends")
    print(f"follow it with: ferryman incident show {out['incident']}")
