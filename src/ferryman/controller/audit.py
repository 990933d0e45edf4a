"""The audit log as a controller service: verify the hash chain, export it for a SIEM, and sign checkpoints of it.

The chain itself (encoding, link hash, the walk) is :mod:`ferryman.cmdb.audit_chain`; every event insert extends it
(:func:`ferryman.cmdb.event_sql.insert_event`). A checkpoint is the controller CA's ECDSA-SHA256 signature over the
id and hash of the chain's last entry at a time; verification checks every checkpoint's signature with the CA
certificate's public key and that the chain still passes through each checkpointed hash, which catches a truncated or
rewritten tail even when whoever rewrote it recomputed the hashes (they cannot sign). A checkpoint is signed only
after the entries since the previous one verify, so a tampered chain never gets a fresh signature.

A broken chain is written to the log itself as one ``audit.chain_broken`` alarm-severity event per distinct break
(appending to a broken chain is harmless, and the break stays visible to whoever reads the events). Reads are batched
(:class:`~ferryman.cmdb.event_sql.SqlAuditLog`): a walk over a million entries holds one batch in memory. Every
method blocks on the CMDB: the API runs them in its thread pool, the reconcile loop in a worker thread.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

import structlog
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

import ferryman
from ferryman.cmdb.audit_chain import (
    Anchor,
    Broken,
    ChainRow,
    ChainWalker,
    Checkpoint,
    Verification,
    cef_line,
    checkpoint_text,
    jsonl_line,
)
from ferryman.cmdb.event_sql import SqlAuditLog
from ferryman.core.clock import Clock
from ferryman.core.errors import Conflict, InvalidInput
from ferryman.core.models import Event, Severity
from ferryman.pki.ca import CertificateAuthority

log = structlog.get_logger(__name__)

FORMATS = ("jsonl", "cef")
MEDIA_TYPES = {"jsonl": "application/x-ndjson", "cef": "text/plain; charset=utf-8"}
DEFAULT_CHECKPOINT_EVERY = dt.timedelta(minutes=5)

Record = Callable[..., Event]  # Fleet.audit: (kind, message, principal, *, severity, **data)


class AuditService:
    """Verification, export and checkpoints of the audit chain in ``chain``, signed by ``ca``."""

    def __init__(
        self,
        chain: SqlAuditLog,
        ca: CertificateAuthority,
        clock: Clock,
        *,
        record: Record | None = None,
        checkpoint_every: dt.timedelta = DEFAULT_CHECKPOINT_EVERY,
        batch: int = 5000,
    ) -> None:
        self._chain = chain
        self._ca = ca
        self._clock = clock
        self._record = record
        self._every = checkpoint_every
        self._batch = batch
        self._reported: Broken | None = None  # the break last written to the log, so it is written once

    @property
    def clock(self) -> Clock:
        return self._clock

    # -- verification ----------------------------------------------------------------------------------------------

    def verify(self, from_id: int | None = None) -> dict[str, Any]:
        """Walk the chain from entry ``from_id`` (default: the first) to its end, checking every link, every
        checkpoint from there on and the recorded head: ``{ok, checked, first_broken: {id, reason} | None,
        head: {id, hash} | None (the last entry that passed), checkpoint: the latest | None, checkpoints, from}``."""
        result, checkpoints = self._walk(from_id)
        latest = self._chain.latest_checkpoint()
        return result.as_dict() | {
            "from": from_id,
            "checkpoints": len(checkpoints),
            "checkpoint": latest.as_dict() | {"signature_ok": self.signature_ok(latest)} if latest else None,
        }

    def _walk(self, from_id: int | None) -> tuple[Verification, list[Checkpoint]]:
        if from_id is not None and from_id < 1:
            raise InvalidInput(f"from must be an entry id (1 or more), got {from_id}")
        start = from_id or 1
        checkpoints = self._chain.checkpoints(from_event=start)
        anchors = [Anchor(f"checkpoint {c.id}", c.event_id, c.hash, self.signature_ok(c)) for c in checkpoints]
        head = self._chain.head()
        if head is not None and head[0] >= start:
            anchors.append(Anchor("the recorded chain head", *head))
        walker = ChainWalker(self._chain.entry_before(start) if start > 1 else None, anchors)
        for rows in self._chain.batches(start - 1, size=self._batch):
            if not walker.feed(rows):
                break
        result = walker.finish()
        if result.first_broken is not None:
            self._report(result.first_broken)
        return result, checkpoints

    def signature_ok(self, checkpoint: Checkpoint) -> bool:
        """Whether ``checkpoint`` carries the CA's signature over its own entry id, hash and time."""
        public = self._ca.cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            return False
        try:
            public.verify(base64.b64decode(checkpoint.signature), checkpoint.text(), ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True

    def _report(self, broken: Broken) -> None:
        log.error("audit chain broken", entry=broken.id, reason=broken.reason)
        if self._record is None or broken == self._reported:
            return
        self._reported = broken
        self._record(
            "audit.chain_broken",
            f"the audit chain is broken at entry {broken.id}: {broken.reason}",
            "system",
            severity=Severity.ALARM,
            entry=broken.id,
            reason=broken.reason,
        )

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any] | None:
        """Sign the chain's last entry, once the entries since the previous checkpoint verify; the new checkpoint,
        the previous one if the chain has not moved, or None while the log is empty. Conflict, signing nothing, if
        the chain is broken."""
        latest = self._chain.latest_checkpoint()
        head = self._chain.head()
        if head is None:
            return None
        if latest is not None and (latest.event_id, latest.hash) == head:
            return latest.as_dict()
        result, _ = self._walk(latest.event_id if latest is not None else None)
        if result.first_broken is not None:
            broken = result.first_broken
            raise Conflict(f"the audit chain is broken at entry {broken.id} ({broken.reason}): no checkpoint signed")
        assert result.head is not None  # the head entry was walked: it is an anchor
        event_id, hash_ = result.head
        at = self._clock.now()
        signature = base64.b64encode(self._ca.sign(checkpoint_text(event_id, hash_, at))).decode()
        signed = self._chain.add_checkpoint(event_id, hash_, at, signature)
        log.info("audit checkpoint signed", checkpoint=signed.id, entry=event_id, checked=result.checked)
        return signed.as_dict()

    def maybe_checkpoint(self) -> dict[str, Any] | None:
        """:meth:`checkpoint` if the latest is older than the interval (the reconcile loop's call); a broken chain
        is logged and reported, not raised, so the loop goes on. None if nothing was signed."""
        latest = self._chain.latest_checkpoint()
        if latest is not None and self._clock.now() - latest.at < self._every:
            return None
        try:
            signed = self.checkpoint()
        except Conflict as err:
            log.error("audit checkpoint refused", error=str(err))
            return None
        return signed if signed is not None and (latest is None or signed["id"] != latest.id) else None

    # -- export ----------------------------------------------------------------------------------------------------

    def export(self, since: dt.datetime | None, fmt: str, principal: str) -> Iterator[str]:
        """The entries at or after ``since`` in chain order, as JSONL or CEF lines, one batch of lines per item.
        The export itself is an audited event, written before the first line."""
        if fmt not in FORMATS:
            raise InvalidInput(f"unknown export format {fmt!r}: use {' or '.join(FORMATS)}")
        if self._record is not None:
            window = f"since {since.isoformat()}" if since is not None else "whole log"
            self._record("audit.exported", f"audit log exported as {fmt} ({window})", principal, format=fmt)
        return self._lines(since, _jsonl if fmt == "jsonl" else _cef)

    def _lines(self, since: dt.datetime | None, line: Callable[[ChainRow], str]) -> Iterator[str]:
        for rows in self._chain.batches(since=since, size=self._batch):
            yield "".join(line(row) for row in rows)


def _jsonl(row: ChainRow) -> str:
    return jsonl_line(row)


def _cef(row: ChainRow) -> str:
    return cef_line(row, version=ferryman.__version__)
