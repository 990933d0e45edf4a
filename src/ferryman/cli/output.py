"""Rendering for the CLI: a table for people, the API's JSON for tools (``--json``)."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

# a pipe gets wide lines rather than truncated columns
console = Console() if sys.stdout.isatty() else Console(width=240)


def emit_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def short_time(value: str | None) -> str:
    if not value:
        return "-"
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return value
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    t = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        t.add_column(column)
    for row in rows:
        t.add_row(*["-" if v is None else str(v) for v in row])
    console.print(t)


def fields(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        console.print(f"[bold]{key.ljust(width)}[/bold]  {'-' if value is None else value}", highlight=False)
