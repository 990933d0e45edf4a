"""The audit log's hash chain as pure functions: the canonical bytes of an entry, the link hash, the verification walk,
and the two export formats (JSONL, CEF).

Each entry of the event log carries ``prev_hash`` (the previous entry's ``hash``; :data:`GENESIS` for the first) and
``hash`` = SHA-256 over :data:`DOMAIN`, the previous hash and the entry's canonical JSON (:func:`link_hash`), so an
edited, deleted, inserted or reordered entry breaks the chain at or right after it. Signed checkpoints (an entry's id
and hash, signed by the controller's CA key) pin the chain: a tail truncated or rewritten with recomputed hashes no
longer passes through a checkpointed hash.

The canonical entry is the JSON object of every field, keys sorted, no spaces, ASCII only (non-ASCII escaped, so a
lone surrogate cannot make encoding fail)::

    {"data":{...},"host":null,"id":42,"kind":"vm.created","message":"...","principal":"token:admin",
     "severity":"info","time":"2026-11-23T10:00:00.000000Z","vm":"id-web"}

``time`` is UTC with microseconds (what both backends store). ``data`` goes through :func:`plain`: a float with an
integral value is written as the integer its shortest decimal spells, because PostgreSQL's JSONB hands ``1.0`` and
``1e16`` back as ``1`` and ``10000000000000000`` while SQLite's JSON keeps them floats; the hash must not depend on the
backend that stored the entry (nor on a dump restored into the other one).

Nothing here reads the database or a key: rows come in, a :class:`Verification` comes out. Whether a checkpoint's
signature holds is decided by the caller (it has the key) and handed in on the :class:`Anchor`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any, NamedTuple, Protocol

GENESIS = "0" * 64
"""The previous hash of the first entry."""

DOMAIN = b"ferryman-audit-v1\n"
"""Prefixed to every hashed text, so a link hash cannot be confused with a hash of anything else Ferryman signs."""

CHECKPOINT_FORMAT = "ferryman-audit-checkpoint/1"

_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
_EXPORT = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class ChainRow(Protocol):
    """An entry as read from the events table (a SQLAlchemy row has these attributes), or :class:`Entry`."""

    @property
    def id(self) -> int: ...
    @property
    def time(self) -> dt.datetime: ...
    @property
    def kind(self) -> str: ...
    @property
    def severity(self) -> str: ...
    @property
    def principal(self) -> str: ...
    @property
    def vm(self) -> str | None: ...
    @property
    def host(self) -> str | None: ...
    @property
    def message(self) -> str: ...
    @property
    def data(self) -> Any: ...
    @property
    def prev_hash(self) -> str: ...
    @property
    def hash(self) -> str: ...


class Entry(NamedTuple):
    """One chained entry, every column of the events table (the order of :data:`COLUMNS`)."""

    id: int
    time: dt.datetime
    kind: str
    severity: str
    principal: str
    vm: str | None
    host: str | None
    message: str
    data: Any
    prev_hash: str
    hash: str


COLUMNS = Entry._fields


# -- the canonical entry and its link hash ----------------------------------------------------------------------------


def utc_text(value: dt.datetime) -> str:
    """``value`` as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` in UTC (naive values are taken as UTC, as the CMDB stores them)."""
    if value.tzinfo is not dt.UTC:  # the CMDB hands back dt.UTC itself: the fast path of a walk
        value = value.astimezone(dt.UTC) if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
    return value.isoformat(timespec="microseconds")[:-6] + "Z"


def plain(value: Any) -> Any:
    """A JSON value in the one form both backends give back: integral floats become the integer they spell.

    ``value`` itself when nothing changes (no copy: a walk calls this for every entry)."""
    kind = type(value)
    if kind is float:
        # 1e300 is stored as the text "1e+300", which PostgreSQL reads as exactly 10**300, not int(1e300)
        return int(Decimal(repr(value))) if value.is_integer() else value
    if kind is dict:
        changed: dict[Any, Any] | None = None
        for key, item in value.items():
            if type(item) in _CONTAINERS_AND_FLOAT and (new := plain(item)) is not item:
                changed = changed if changed is not None else dict(value)
                changed[key] = new
        return value if changed is None else changed
    if kind is list or kind is tuple:
        items = [plain(item) for item in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    return value


_CONTAINERS_AND_FLOAT = frozenset({float, dict, list, tuple})
_string = json.encoder.encode_basestring_ascii  # what the canonical encoder writes every string with


def canonical(entry: ChainRow) -> bytes:
    """The canonical bytes of ``entry``: its id and every field, not its hashes.

    Exactly ``json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``, with the outer object
    spelled out here in sorted key order (twice as fast, and a walk does this for every entry)."""
    vm, host = entry.vm, entry.host
    return (
        '{"data":'
        + _CANONICAL.encode(plain(entry.data))
        + ',"host":'
        + ("null" if host is None else _string(host))
        + ',"id":'
        + int.__repr__(entry.id)
        + ',"kind":'
        + _string(entry.kind)
        + ',"message":'
        + _string(entry.message)
        + ',"principal":'
        + _string(entry.principal)
        + ',"severity":'
        + _string(entry.severity)
        + ',"time":"'
        + utc_text(entry.time)
        + '","vm":'
        + ("null" if vm is None else _string(vm))
        + "}"
    ).encode("ascii")


def link_hash(prev_hash: str, entry: ChainRow) -> str:
    """The hash of ``entry`` chained after ``prev_hash``: hex SHA-256 of domain, previous hash, newline, entry."""
    return hashlib.sha256(DOMAIN + prev_hash.encode("ascii") + b"\n" + canonical(entry)).hexdigest()


def checkpoint_text(event_id: int, hash_: str, at: dt.datetime) -> bytes:
    """The exact bytes a checkpoint's signature covers."""
    body = {"format": CHECKPOINT_FORMAT, "event_id": event_id, "hash": hash_, "at": utc_text(at)}
    return _CANONICAL.encode(body).encode("ascii")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A signed statement "the chain passed through ``hash`` at entry ``event_id``" (signature: base64)."""

    id: int
    event_id: int
    hash: str
    at: dt.datetime
    signature: str

    def text(self) -> bytes:
        return checkpoint_text(self.event_id, self.hash, self.at)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "event_id": self.event_id, "hash": self.hash, "at": utc_text(self.at)}


# -- verification -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Anchor:
    """A hash the chain must pass through: a signed checkpoint, or the chain head the writers recorded."""

    what: str  # how a reason names it: "checkpoint 3", "the recorded chain head"
    event_id: int
    hash: str
    signature_ok: bool = True  # checked by the caller, who has the key (the head carries no signature)


@dataclasses.dataclass(frozen=True)
class Broken:
    id: int
    reason: str


@dataclasses.dataclass(frozen=True)
class Verification:
    ok: bool
    checked: int
    first_broken: Broken | None
    head: tuple[int, str] | None  # the last entry that passed, if any

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "first_broken": dataclasses.asdict(self.first_broken) if self.first_broken else None,
            "head": {"id": self.head[0], "hash": self.head[1]} if self.head else None,
        }


class ChainWalker:
    """Walks entries in id order, fed in batches (so memory stays bounded), and stops at the first broken link.

    ``prev`` is the (id, hash) of the entry before the first one fed, or ``None`` from the start of the chain
    (previous hash :data:`GENESIS`). Each anchor is checked where the walk reaches its entry; an anchor beyond the
    last entry means the tail is missing.
    """

    def __init__(self, prev: tuple[int, str] | None = None, anchors: Iterable[Anchor] = ()) -> None:
        self._prev_id: int | None = prev[0] if prev is not None else None
        self._prev_hash = prev[1] if prev is not None else GENESIS
        self._anchors = sorted(anchors, key=lambda a: a.event_id)
        self._next = 0  # the first anchor not reached yet
        self._checked = 0
        self._broken: Broken | None = None

    @property
    def broken(self) -> Broken | None:
        return self._broken

    def feed(self, rows: Iterable[ChainRow]) -> bool:
        """Check ``rows`` (ascending ids, after any fed before); False once a link is broken: feed no more."""
        if self._broken is not None:
            return False
        due = self._anchors[self._next].event_id if self._next < len(self._anchors) else None
        for row in rows:
            if row.prev_hash != self._prev_hash:
                self._broken = Broken(row.id, self._link_reason())
            elif link_hash(self._prev_hash, row) != row.hash:
                self._broken = Broken(row.id, "edited: the entry no longer matches its hash")
            elif due is not None and due <= row.id:
                self._broken = self._reach(row)
                due = self._anchors[self._next].event_id if self._next < len(self._anchors) else None
            if self._broken is not None:
                return False
            self._prev_id, self._prev_hash = row.id, row.hash
            self._checked += 1
        return True

    def _reach(self, row: ChainRow) -> Broken | None:
        """Every anchor up to ``row``: it must name this very entry, with this hash, and its signature must hold."""
        while self._next < len(self._anchors) and self._anchors[self._next].event_id <= row.id:
            anchor = self._anchors[self._next]
            self._next += 1
            if not anchor.signature_ok:
                return Broken(anchor.event_id, f"{anchor.what}: its signature does not verify (forged or altered)")
            if anchor.event_id < row.id:
                return Broken(anchor.event_id, f"deleted: {anchor.what} covers entry {anchor.event_id}")
            if anchor.hash != row.hash:
                return Broken(row.id, f"rewritten: its hash differs from the one in {anchor.what}")
        return None

    def _link_reason(self) -> str:
        if self._prev_id is None:
            return "does not follow the start of the chain: entries before it were deleted, or it was moved"
        return (
            f"does not follow entry {self._prev_id}: entry {self._prev_id} was rewritten, or entries between them "
            "were deleted or reordered"
        )

    def finish(self) -> Verification:
        """The outcome, once every entry has been fed; an anchor not reached means a truncated tail."""
        if self._broken is None and self._next < len(self._anchors):
            anchor = self._anchors[self._next]
            end = f"entry {self._prev_id}" if self._prev_id is not None else "its start"
            if anchor.signature_ok:
                reason = f"missing: the chain ends at {end}, but {anchor.what} covers entry {anchor.event_id}"
            else:
                reason = f"{anchor.what}: its signature does not verify (forged or altered)"
            self._broken = Broken(anchor.event_id, reason)
        head = (self._prev_id, self._prev_hash) if self._checked and self._prev_id is not None else None
        return Verification(self._broken is None, self._checked, self._broken, head)


def verify_entries(
    rows: Iterable[ChainRow], prev: tuple[int, str] | None = None, anchors: Sequence[Anchor] = ()
) -> Verification:
    """Walk ``rows`` (all of them, in id order) in one go: for an exported file, or a test."""
    walker = ChainWalker(prev, anchors)
    walker.feed(rows)
    return walker.finish()


# -- export formats ---------------------------------------------------------------------------------------------------


def record(row: ChainRow) -> dict[str, Any]:
    """An entry as a JSON object: every field and both hashes, enough to re-verify the chain from an export alone."""
    return {
        "id": row.id,
        "time": utc_text(row.time),
        "kind": row.kind,
        "severity": row.severity,
        "principal": row.principal,
        "vm": row.vm,
        "host": row.host,
        "message": row.message,
        "data": row.data,
        "prev_hash": row.prev_hash,
        "hash": row.hash,
    }


def jsonl_line(row: ChainRow) -> str:
    """One line of a JSONL export (UTF-8, keys sorted, newline-terminated)."""
    return _EXPORT.encode(record(row)) + "\n"


def entry_from_jsonl(line: str) -> Entry:
    """The entry one JSONL export line holds (ValueError if it is not one)."""
    fields = json.loads(line)
    if not isinstance(fields, dict) or set(fields) != set(COLUMNS):
        raise ValueError("not an audit entry: expected the fields " + ", ".join(COLUMNS))
    if not isinstance(fields["time"], str) or not fields["time"].endswith("Z"):
        raise ValueError(f"not an audit entry: time {fields['time']!r} is not UTC (…Z)")
    time = dt.datetime.fromisoformat(fields["time"].removesuffix("Z") + "+00:00")
    return Entry(**{**fields, "time": time})


CEF_VENDOR = "Ferryman"
CEF_PRODUCT = "controller"
CEF_SEVERITY = {"info": 3, "warning": 6, "alarm": 9}


def cef_header(value: str) -> str:
    """A CEF header field: backslash and pipe escaped; a header cannot hold a line break, so CR and LF become spaces."""
    text = value.replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


def cef_value(value: str) -> str:
    """A CEF extension value: backslash and equals escaped, line breaks written as ``\\n`` / ``\\r``."""
    return value.replace("\\", "\\\\").replace("=", "\\=").replace("\r", "\\r").replace("\n", "\\n")


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def cef_line(row: ChainRow, *, version: str) -> str:
    """One CEF:0 event per entry, newline-terminated: the kind as signature id, the message as name, the entry's fields
    and both hashes in the extension (``rt`` in milliseconds since the epoch, ``externalId`` the entry's id)."""
    header = [
        "CEF:0",
        cef_header(CEF_VENDOR),
        cef_header(CEF_PRODUCT),
        cef_header(version),
        cef_header(row.kind),
        cef_header(row.message[:512]),
        str(CEF_SEVERITY.get(row.severity, 5)),
    ]
    extension = [
        ("rt", str((row.time - _EPOCH) // dt.timedelta(milliseconds=1))),
        ("externalId", str(row.id)),
        ("suser", row.principal),
        ("dhost", row.host),
        ("cs1Label", "vm" if row.vm is not None else None),
        ("cs1", row.vm),
        ("msg", row.message),
        ("cs2Label", "data"),
        ("cs2", _EXPORT.encode(row.data)),
        ("cs3Label", "prevHash"),
        ("cs3", row.prev_hash),
        ("cs4Label", "hash"),
        ("cs4", row.hash),
    ]
    pairs = " ".join(f"{key}={cef_value(value)}" for key, value in extension if value is not None)
    return "|".join(header) + "|" + pairs + "\n"
