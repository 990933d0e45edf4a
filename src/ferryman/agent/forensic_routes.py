"""The agent's forensic capture endpoints: capture a VM's memory and disks sealed under keys the controller sends
(held for the request only), stream the sealed files to the controller, and scrub this host's copy once it has them.

Sealed files live in ``<state-dir>/forensics/<capture>/<artefact>.sealed`` (owner-only) until the controller asks
for their scrub; nothing in them is readable without the controller's keys.
"""

import asyncio
import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from ferryman.agent.forensics import capture_disk, capture_memory
from ferryman.agent.hypervisor.qmp import QemuDriver
from ferryman.agent.storage.scrub import ScrubMode, scrub_tree
from ferryman.core.errors import InvalidInput, NotFound
from ferryman.wire.forensics import Capture, Captured, CapturedArtefact, CaptureDiscarded
from ferryman.wire.vms import Receipt

_DISK_RE = re.compile(r"^disk(\d)$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
CHUNK = 1 << 20


def forensic_routes(app: FastAPI, driver: QemuDriver, state_dir: Path, Controller: Any) -> None:
    root = state_dir / "forensics"

    def capture_dir(capture: str) -> Path:
        if not _NAME_RE.match(capture):
            raise InvalidInput(f"bad capture id {capture!r}")
        return root / capture

    @app.post("/v1/vms/{vm_id}/forensics")
    async def capture(vm_id: str, body: Capture, _: Controller) -> Captured:
        spec = driver.load_spec(vm_id)
        missing = [a for a in body.artefacts if a not in body.keys]
        if missing:
            raise InvalidInput(f"no sealing key for {', '.join(missing)}")
        directory = capture_dir(body.capture)
        await asyncio.to_thread(root.mkdir, mode=0o700, exist_ok=True)
        await asyncio.to_thread(directory.mkdir, mode=0o700, exist_ok=True)
        done = []
        for artefact in body.artefacts:
            started = dt.datetime.now(dt.UTC)
            out = directory / f"{artefact}.sealed"
            if artefact == "memory":
                info = await capture_memory(driver, vm_id, out, body.keys[artefact])
            elif (match := _DISK_RE.match(artefact)) is not None:
                info = await capture_disk(driver, vm_id, int(match.group(1)), out, body.keys[artefact])
            else:
                raise InvalidInput(f"unknown artefact {artefact!r}: memory or disk<N>")
            done.append(
                CapturedArtefact(
                    artefact=artefact,
                    plaintext_sha256="sha256:" + info.plaintext_sha256,
                    plaintext_bytes=info.plaintext_bytes,
                    sealed_sha256="sha256:" + info.sealed_sha256,
                    sealed_bytes=info.sealed_bytes,
                    started_at=started.isoformat(),
                    finished_at=dt.datetime.now(dt.UTC).isoformat(),
                )
            )
        return Captured(capture=body.capture, generation=spec.generation, artefacts=done)

    @app.get("/v1/forensics/{capture_id}/{artefact}")
    def fetch(capture_id: str, artefact: str, _: Controller) -> StreamingResponse:
        if not _NAME_RE.match(artefact):
            raise InvalidInput(f"bad artefact {artefact!r}")
        path = capture_dir(capture_id) / f"{artefact}.sealed"
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise NotFound(f"no sealed {artefact} of capture {capture_id} on this host") from None

        def chunks() -> Iterator[bytes]:
            with handle:
                while chunk := handle.read(CHUNK):
                    yield chunk

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    @app.post("/v1/forensics/{capture_id}/discard")
    async def discard(capture_id: str, _: Controller) -> CaptureDiscarded:
        receipts = await asyncio.to_thread(scrub_tree, [capture_dir(capture_id)], ScrubMode.ZERO)
        return CaptureDiscarded(receipts=[Receipt.model_validate(r.to_audit()) for r in receipts])
