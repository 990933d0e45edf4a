"""REST routes of the audit log: verification of the hash chain (``GET /api/v1/audit/verify``), export for a SIEM
(``GET /api/v1/audit/export``, streamed as JSONL or CEF) and a signed checkpoint on demand
(``POST /api/v1/audit/checkpoints``).

Who may read the log or sign a checkpoint is in :data:`ferryman.controller.access.RULES`. The routes are plain
functions (FastAPI runs them in its thread pool, and iterates a streamed export there too): a walk over the chain
is CMDB reads only.
"""

from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import StreamingResponse

from ferryman.controller.audit import FORMATS, MEDIA_TYPES, AuditService
from ferryman.core import errors
from ferryman.core.clock import parse_time


def audit_routes(app: FastAPI, audit: AuditService, Person: Any) -> None:
    @app.get("/api/v1/audit/verify")
    def verify(who: Person, from_id: int | None = Query(None, alias="from")) -> dict[str, Any]:
        return audit.verify(from_id)

    @app.get("/api/v1/audit/export")
    def export(who: Person, since: str | None = None, fmt: str = Query("jsonl", alias="format")) -> StreamingResponse:
        if fmt not in FORMATS:
            raise errors.InvalidInput(f"unknown export format {fmt!r}: use {' or '.join(FORMATS)}")
        start = parse_time(since, audit.clock) if since else None
        lines = audit.export(start, fmt, who.name)
        disposition = f'attachment; filename="ferryman-audit.{fmt}"'
        return StreamingResponse(lines, media_type=MEDIA_TYPES[fmt], headers={"content-disposition": disposition})

    @app.post("/api/v1/audit/checkpoints", status_code=201)
    def checkpoint(who: Person) -> dict[str, Any]:
        signed = audit.checkpoint()
        if signed is None:
            raise errors.Conflict("nothing to checkpoint: the audit log is empty")
        return signed
