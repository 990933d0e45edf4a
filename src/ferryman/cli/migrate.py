"""``ferryman vm migrate``, ``ferryman migration list|show|cancel`` and ``ferryman host drain``.

A migration runs in the controller; the CLI starts it and then follows it, showing the phase, the bytes sent, the rate
and the guest's dirty-page rate, and ends with a one-line summary (exit 1 unless the migration is done).
"""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ferryman.cli.context import api as _api
from ferryman.cli.context import segment, vm_path
from ferryman.cli.output import console, emit_json, fields, short_time, table
from ferryman.client import Api, CliError

migration_app = typer.Typer(no_args_is_help=True, help="Live migrations.")

Json = Annotated[bool, typer.Option("--json", help="print JSON")]
MiB = 1 << 20


def summary(m: dict[str, Any]) -> str:
    """One line: outcome, route, time, downtime, bytes."""
    parts = [f"migration {m['id'][:8]} of {m['vm']} {m['source']} → {m['destination']}: {m['outcome'] or m['phase']}"]
    if m.get("total_s") is not None:
        parts.append(f"{m['total_s']:.1f}s")
    if m.get("downtime_ms") is not None:
        parts.append(f"downtime {m['downtime_ms']} ms")
    if m.get("bytes_transferred"):
        parts.append(f"{m['bytes_transferred'] / MiB:.1f} MiB sent")
    if m.get("error"):
        parts.append(f"({m['error']})")
    return ", ".join(parts)


def _describe(m: dict[str, Any]) -> str:
    p = m.get("progress") or {}
    text = f"{m['phase']:<16}"
    if p.get("mirror_length"):
        text += f" disk {p['mirror_offset'] / MiB:.0f}/{p['mirror_length'] / MiB:.0f} MiB"
    if p.get("transferred_bytes"):
        text += f" RAM {p['transferred_bytes'] / MiB:.1f} MiB at {p.get('rate_bytes_per_s', 0) / MiB:.1f} MiB/s"
        text += f", dirty {p.get('dirty_pages_rate', 0)} pages/s"
    return text


def follow(api: Api, migration_id: str, timeout_s: float, quiet: bool = False) -> dict[str, Any]:
    """Poll a migration until it has an outcome (bounded by ``timeout_s``), showing progress on stderr."""
    deadline = time.monotonic() + timeout_s
    show = not quiet and sys.stderr.isatty()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not show,
        transient=True,
    ) as bar:
        task = bar.add_task("requested", total=None)
        last_phase = ""
        while True:
            m: dict[str, Any] = api.get(f"/api/v1/migrations/{segment(migration_id)}")
            bar.update(task, description=_describe(m))
            if not show and not quiet and m["phase"] != last_phase:
                print(f"  {m['phase']}", file=sys.stderr, flush=True)
                last_phase = m["phase"]
            if m["outcome"] is not None:
                return m
            if time.monotonic() > deadline:
                raise CliError(
                    f"migration {migration_id} still {m['phase']} after {timeout_s:.0f}s; "
                    f"follow it with: ferryman migration show {migration_id}"
                )
            time.sleep(0.5)


def migrate_vm(
    name: str,
    to: str,
    shared_storage: bool,
    bandwidth: int | None,
    wait: bool,
    timeout: float,
    json_: bool,
    force: bool = False,
) -> None:
    api = _api()
    body = {"to": to, "shared_storage": shared_storage, "bandwidth_mib_s": bandwidth, "force": force}
    m = api.post(vm_path(name, "/migrate"), body)
    if wait:
        m = follow(api, m["id"], timeout, quiet=json_)
    if json_:
        emit_json(m)
    else:
        print(summary(m))
    if wait and m["outcome"] != "done":
        raise SystemExit(1)


@migration_app.command("list")
def migration_list(
    vm: Annotated[str | None, typer.Option(help="only this VM")] = None,
    active: Annotated[bool, typer.Option("--active", help="only migrations still running")] = False,
    json_: Json = False,
) -> None:
    """Migrations, newest first."""
    items = _api().get("/api/v1/migrations", vm=vm, active=active or None)
    if json_:
        return emit_json(items)
    table(
        None,
        ["ID", "VM", "FROM", "TO", "PHASE", "OUTCOME", "REQUESTED", "TIME s", "DOWNTIME ms", "BY"],
        [
            [
                m["id"][:8],
                m["vm"],
                m["source"],
                m["destination"],
                m["phase"],
                m["outcome"] or "-",
                short_time(m["requested_at"]),
                f"{m['total_s']:.1f}" if m["total_s"] is not None else "-",
                m["downtime_ms"],
                m["principal"],
            ]
            for m in items
        ],
    )


@migration_app.command("show")
def migration_show(migration_id: str, json_: Json = False) -> None:
    """One migration: phases with timestamps, bytes, downtime, outcome, scrub receipts."""
    m = _api().get(f"/api/v1/migrations/{segment(migration_id)}")
    if json_:
        return emit_json(m)
    fields(
        [
            ("id", m["id"]),
            ("vm", m["vm"]),
            ("route", f"{m['source']} → {m['destination']}"),
            ("storage", "shared" if m["shared_storage"] else "local (mirrored)"),
            ("phase", m["phase"]),
            ("outcome", m["outcome"]),
            ("error", m["error"]),
            ("requested by", m["principal"]),
            ("requested", short_time(m["requested_at"])),
            ("total", f"{m['total_s']:.1f}s" if m["total_s"] else None),
            ("downtime", f"{m['downtime_ms']} ms" if m["downtime_ms"] is not None else None),
            ("sent", f"{m['bytes_transferred'] / MiB:.1f} MiB"),
        ]
    )
    table(
        "phases",
        ["#", "PHASE", "AT", "DETAIL"],
        [
            [s["seq"], s["phase"], short_time(s["at"]), ", ".join(f"{k}={v}" for k, v in s["data"].items())[:100]]
            for s in m["steps"]
        ],
    )
    if m["scrub_receipts"]:
        table(
            "scrub receipts",
            ["HOST", "PATH", "BYTES", "MODE", "SECONDS", "SAMPLE SHA-256"],
            [
                [r["host"], r["path"], r["bytes"], r["mode"], f"{r['duration_s']:.2f}", r["sample_hash"][:16]]
                for r in m["scrub_receipts"]
            ],
        )


@migration_app.command("cancel")
def migration_cancel(
    migration_id: str,
    wait: Annotated[bool, typer.Option("--wait/--no-wait")] = True,
    timeout: float = 600,
) -> None:
    """Cancel a migration: before its commit it rolls back; after, it completes. Either way one copy runs."""
    api = _api()
    m = api.post(f"/api/v1/migrations/{segment(migration_id)}/cancel")
    if wait:
        m = follow(api, m["id"], timeout)
    print(summary(m))
