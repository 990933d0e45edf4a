"""``ferryman events`` and ``ferryman alarms``: the controller's event log and its open discrepancies."""

from __future__ import annotations

from typing import Annotated

import typer

from ferryman.cli.context import Json, api
from ferryman.cli.output import emit_json, short_time, table


def events(
    since: Annotated[str | None, typer.Option(help="ISO time or relative like -1h")] = None,
    kind: Annotated[str | None, typer.Option(help="kind prefix, e.g. alarm. or vm.")] = None,
    vm: Annotated[str | None, typer.Option()] = None,
    host: Annotated[str | None, typer.Option()] = None,
    severity: Annotated[str | None, typer.Option(help="minimum severity: info, warning, alarm")] = None,
    limit: int = 50,
    json_: Json = False,
) -> None:
    """The event log, newest first (audit entries and alarms)."""
    items = api().get("/api/v1/events", since=since, kind=kind, vm=vm, host=host, severity=severity, limit=limit)
    if json_:
        return emit_json(items)
    table(
        None,
        ["TIME", "SEVERITY", "KIND", "BY", "HOST", "MESSAGE"],
        [[short_time(e["time"]), e["severity"], e["kind"], e["principal"], e["host"], e["message"]] for e in items],
    )


def alarms(
    all_: Annotated[bool, typer.Option("--all", help="include resolved alarms")] = False, json_: Json = False
) -> None:
    """Open alarms (discrepancies between the CMDB and what hosts run)."""
    items = api().get("/api/v1/alarms", all=all_)
    if json_:
        return emit_json(items)
    table(
        None,
        ["ID", "KIND", "HOST", "FIRST SEEN", "LAST SEEN", "RESOLVED", "MESSAGE"],
        [
            [
                a["id"],
                a["kind"],
                a["host"],
                short_time(a["first_seen"]),
                short_time(a["last_seen"]),
                short_time(a["resolved_at"]),
                a["message"],
            ]
            for a in items
        ],
    )
