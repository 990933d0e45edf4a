"""Controller-signed documents that agents verify before acting: migration tickets and VM leases.

A **migration ticket** names one migration: its id, the VM, the source and destination hosts, the VM's generation, a
nonce and an expiry. Each agent verifies the signature (the controller's CA key, which every agent has pinned), that it
is the host the ticket names for its role, that the ticket has not expired, and that the nonce was never used before on
this host for this role (a replayed ticket is refused). A **lease** allows one host to start or resume one VM at one
generation (DESIGN.md invariant 3, fencing): an agent holding a copy of an older generation cannot get a lease for it.

Documents are ``base64url(json payload) "." base64url(signature)``; the payload carries its ``kind`` so that a lease can
never be presented as a ticket. This module signs and verifies; it keeps no state except :class:`NonceStore`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ferryman.core.clock import Clock
from ferryman.core.errors import Forbidden, PKIError, StorageError
from ferryman.pki.ca import CertificateAuthority
from ferryman.pki.csr import write_atomic

Kind = Literal["migration-ticket", "lease"]
Role = Literal["source", "destination"]

TICKET_TTL = dt.timedelta(minutes=30)
LEASE_TTL = dt.timedelta(minutes=10)


@dataclass(frozen=True)
class MigrationTicket:
    migration_id: str
    vm_id: str
    source: str
    destination: str
    generation: int
    shared_storage: bool
    nonce: str
    issued_at: dt.datetime
    expires_at: dt.datetime


@dataclass(frozen=True)
class Lease:
    vm_id: str
    host: str
    generation: int
    nonce: str
    issued_at: dt.datetime
    expires_at: dt.datetime


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _encode(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime) else value


def sign_document(ca: CertificateAuthority, kind: Kind, fields: dict[str, Any]) -> str:
    payload = json.dumps({"kind": kind, **{k: _encode(v) for k, v in fields.items()}}, sort_keys=True).encode()
    return f"{_b64(payload)}.{_b64(ca.sign(payload))}"


def verify_document(token: str, ca_cert: x509.Certificate, kind: Kind) -> dict[str, Any]:
    """The payload of a document signed by the CA of ``ca_cert``; Forbidden if forged, altered or of another kind."""
    try:
        payload_b64, sig_b64 = token.split(".")
        payload, signature = _unb64(payload_b64), _unb64(sig_b64)
    except (ValueError, AttributeError) as err:
        raise Forbidden(f"malformed {kind}") from err
    public_key = ca_cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise PKIError("the CA key is not an EC key")
    try:
        public_key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise Forbidden(f"{kind} signature is not the controller's") from None
    fields: dict[str, Any] = json.loads(payload)
    if fields.pop("kind", None) != kind:
        raise Forbidden(f"document is not a {kind}")
    return fields


def _times(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: dt.datetime.fromisoformat(v) if k in {"issued_at", "expires_at"} else v for k, v in fields.items()}


def issue_ticket(
    ca: CertificateAuthority,
    *,
    migration_id: str,
    vm_id: str,
    source: str,
    destination: str,
    generation: int,
    shared_storage: bool,
    ttl: dt.timedelta = TICKET_TTL,
) -> tuple[MigrationTicket, str]:
    now = ca.clock.now()
    ticket = MigrationTicket(
        migration_id=migration_id,
        vm_id=vm_id,
        source=source,
        destination=destination,
        generation=generation,
        shared_storage=shared_storage,
        nonce=secrets.token_hex(16),
        issued_at=now,
        expires_at=now + ttl,
    )
    return ticket, sign_document(ca, "migration-ticket", dataclasses.asdict(ticket))


def issue_lease(
    ca: CertificateAuthority, *, vm_id: str, host: str, generation: int, ttl: dt.timedelta = LEASE_TTL
) -> tuple[Lease, str]:
    now = ca.clock.now()
    lease = Lease(vm_id, host, generation, secrets.token_hex(16), now, now + ttl)
    return lease, sign_document(ca, "lease", dataclasses.asdict(lease))


def _check_time(kind: str, issued_at: dt.datetime, expires_at: dt.datetime, clock: Clock) -> None:
    now = clock.now()
    if now >= expires_at:
        raise Forbidden(f"{kind} expired at {expires_at.isoformat()}")
    if issued_at - now > dt.timedelta(minutes=5):
        raise Forbidden(f"{kind} is issued in the future ({issued_at.isoformat()})")


def verify_ticket(
    token: str,
    ca_cert: x509.Certificate,
    *,
    me: str,
    role: Role,
    clock: Clock,
    nonces: NonceStore | None = None,
    migration_id: str | None = None,
    check_expiry: bool = True,
) -> MigrationTicket:
    """Check a migration ticket as the ``role`` host ``me``; record its nonce so that it cannot be used again.

    ``check_expiry=False`` is for the steps that only lead back to a safe state (kill an unactivated destination,
    scrub the losing side, roll-back hooks): they must still work after a long controller outage.
    """
    try:
        ticket = MigrationTicket(**_times(verify_document(token, ca_cert, "migration-ticket")))
    except TypeError as err:
        raise Forbidden("malformed migration ticket") from err
    assigned = ticket.source if role == "source" else ticket.destination
    if assigned != me:
        raise Forbidden(f"ticket {ticket.migration_id} names {assigned} as {role}, not {me}")
    if migration_id is not None and ticket.migration_id != migration_id:
        raise Forbidden(f"ticket is for migration {ticket.migration_id}, not {migration_id}")
    if check_expiry:
        _check_time("ticket", ticket.issued_at, ticket.expires_at, clock)
    if nonces is not None:
        nonces.use(f"{role}:{ticket.nonce}", ticket.expires_at, clock.now())
    return ticket


def verify_lease(token: str, ca_cert: x509.Certificate, *, me: str, vm_id: str, generation: int, clock: Clock) -> Lease:
    """Check that a lease lets host ``me`` run ``vm_id`` at ``generation`` now."""
    try:
        lease = Lease(**_times(verify_document(token, ca_cert, "lease")))
    except TypeError as err:
        raise Forbidden("malformed lease") from err
    if (lease.host, lease.vm_id) != (me, vm_id):
        raise Forbidden(f"lease is for VM {lease.vm_id} on {lease.host}, not {vm_id} on {me}")
    if lease.generation != generation:
        raise Forbidden(f"lease is for generation {lease.generation}; this copy is generation {generation}")
    _check_time("lease", lease.issued_at, lease.expires_at, clock)
    return lease


def verify_successor(
    token: str, ca_cert: x509.Certificate, *, me: str, vm_id: str, generation: int, clock: Clock
) -> Lease:
    """Check that a lease proves this host's copy of ``vm_id`` (at ``generation``) is stale: it lets another host run
    the VM at a later generation. Only such proof lets an agent discard a copy it holds."""
    try:
        lease = Lease(**_times(verify_document(token, ca_cert, "lease")))
    except TypeError as err:
        raise Forbidden("malformed lease") from err
    if lease.vm_id != vm_id:
        raise Forbidden(f"lease is for VM {lease.vm_id}, not {vm_id}")
    if lease.host == me or lease.generation <= generation:
        raise Forbidden(
            f"lease (generation {lease.generation} on {lease.host}) does not supersede the copy here "
            f"(generation {generation})"
        )
    _check_time("lease", lease.issued_at, lease.expires_at, clock)
    return lease


class NonceStore:
    """Nonces already used on this host, kept in a file until they expire (so a restart does not forget them)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, str]]:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                used: dict[str, str] = json.loads(self._path.read_text()) if self._path.exists() else {}
            except ValueError:
                raise PKIError(f"nonce store {self._path} is corrupt; refusing every ticket") from None
            yield used
            try:
                write_atomic(self._path, json.dumps(used).encode(), mode=0o600)
            except PKIError as err:  # write_atomic's wrapping of an OSError (a full disk)
                raise StorageError(f"cannot record the ticket nonce: {err}") from err

    def use(self, nonce: str, expires_at: dt.datetime, now: dt.datetime) -> None:
        """Record ``nonce``; Forbidden if it was recorded before, StorageError if the store cannot be written."""
        try:
            with self._locked() as used:
                for key in [k for k, exp in used.items() if dt.datetime.fromisoformat(exp) <= now]:
                    del used[key]
                if nonce in used:
                    raise Forbidden("ticket already used (replay refused)")
                used[nonce] = expires_at.isoformat()
        except OSError as err:
            raise StorageError(f"cannot record the ticket nonce in {self._path}: {err.strerror or err}") from err
