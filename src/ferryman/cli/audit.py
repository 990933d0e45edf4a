"""``ferryman audit …``: verify the audit log's hash chain, export it for a SIEM (JSONL or CEF), sign a checkpoint.

``verify`` exits 1 when the chain is broken (with ``--json`` too), so a cron job or a pipeline can act on it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import typer

from ferryman.cli.context import Json, api
from ferryman.cli.output import emit_json, short_time

audit_app = typer.Typer(
    no_args_is_help=True, help="The audit log: verify its hash chain, export it, sign a checkpoint."
)


def _hash(value: str) -> str:
    return f"sha256 {value[:16]}…"


@audit_app.command("verify")
def audit_verify(
    from_: Annotated[int | None, typer.Option("--from", help="start at this entry id (default: the first)")] = None,
    json_: Json = False,
) -> None:
    """Walk the hash chain and the signed checkpoints; report the first broken link (exit 1 if there is one)."""
    out = api().get("/api/v1/audit/verify", **{"from": from_})
    if json_:
        emit_json(out)
    else:
        _print_verification(out)
    if not out["ok"]:
        raise typer.Exit(1)


def _print_verification(out: dict[str, Any]) -> None:
    start = f"from entry {out['from']}" if out["from"] else "from the first entry"
    head = out["head"]
    if out["ok"]:
        last = f", up to entry {head['id']} ({_hash(head['hash'])})" if head else ""
        print(f"audit chain intact: {out['checked']} entries checked {start}{last}")
    else:
        broken = out["first_broken"]
        print(f"audit chain BROKEN at entry {broken['id']}: {broken['reason']}")
        print(f"{out['checked']} entries checked {start} before it")
    checkpoint = out["checkpoint"]
    if checkpoint is None:
        print("no signed checkpoint yet")
        return
    signature = "signature ok" if checkpoint["signature_ok"] else "signature INVALID"
    print(
        f"latest checkpoint {checkpoint['id']}: entry {checkpoint['event_id']} at {short_time(checkpoint['at'])}, "
        f"{signature}; {out['checkpoints']} checkpoint(s) checked"
    )


@audit_app.command("export")
def audit_export(
    since: Annotated[str, typer.Option(help="ISO time or relative like -1d")] = "-1d",
    format_: Annotated[str, typer.Option("--format", help="jsonl or cef")] = "jsonl",
    output: Annotated[Path | None, typer.Option("--output", help="write to this new file (0600) instead")] = None,
    everything: Annotated[bool, typer.Option("--all", help="the whole log (ignores --since)")] = False,
) -> None:
    """Export the audit log in chain order: JSONL (every field and both hashes, re-verifiable) or CEF for a SIEM."""
    params = {"format": format_} if everything else {"since": since, "format": format_}
    path = "/api/v1/audit/export?" + urlencode(params)
    client = api()
    if output is not None:
        size = client.download(path, output)
        print(f"exported {output} ({size} bytes)", file=sys.stderr)
        return
    sys.stdout.flush()
    client.stream_to(path, sys.stdout.buffer)  # as it arrives: a whole log need not fit in memory


@audit_app.command("checkpoint")
def audit_checkpoint(json_: Json = False) -> None:
    """Sign a checkpoint of the chain's last entry now (after verifying the entries since the previous one)."""
    out = api().post("/api/v1/audit/checkpoints")
    if json_:
        return emit_json(out)
    print(f"checkpoint {out['id']}: entry {out['event_id']} ({_hash(out['hash'])}) signed at {short_time(out['at'])}")
