"""Migration tickets and leases: signed by the controller, bound to hosts, single use, fenced by generation."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from cryptography import x509

from ferryman.core.errors import Forbidden, StorageError
from ferryman.pki.ca import CertificateAuthority
from ferryman.pki.tickets import (
    NonceStore,
    _b64,
    _unb64,
    issue_lease,
    issue_ticket,
    verify_lease,
    verify_ticket,
)
from ferryman.testing.clock import FakeClock
from ferryman.testing.pki import rogue_ca


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def ca(tmp_path, clock):
    return CertificateAuthority.load_or_create(tmp_path / "ca", clock)


def ticket(ca, **over):
    args = {
        "migration_id": "m-1",
        "vm_id": "vm-1",
        "source": "host-a",
        "destination": "host-b",
        "generation": 3,
        "shared_storage": False,
    }
    return issue_ticket(ca, **{**args, **over})


def test_both_ends_accept_a_valid_ticket(ca, clock, tmp_path):
    """The source and the destination named in a ticket both accept it, each once."""
    issued, token = ticket(ca)
    src = verify_ticket(token, ca.cert, me="host-a", role="source", clock=clock, nonces=NonceStore(tmp_path / "a"))
    dst = verify_ticket(token, ca.cert, me="host-b", role="destination", clock=clock, nonces=NonceStore(tmp_path / "b"))
    assert src == dst == issued


def test_replayed_ticket_is_refused_even_after_restart(ca, clock, tmp_path):
    """A ticket used once is refused the second time, also by a new NonceStore on the same file."""
    _, token = ticket(ca)
    verify_ticket(token, ca.cert, me="host-b", role="destination", clock=clock, nonces=NonceStore(tmp_path / "n"))
    with pytest.raises(Forbidden, match="already used"):
        verify_ticket(token, ca.cert, me="host-b", role="destination", clock=clock, nonces=NonceStore(tmp_path / "n"))


def test_ticket_for_another_pair_is_refused(ca, clock):
    """A host that is not the ticket's source (or destination) refuses it."""
    _, token = ticket(ca)
    with pytest.raises(Forbidden, match="names host-a as source, not host-c"):
        verify_ticket(token, ca.cert, me="host-c", role="source", clock=clock)
    with pytest.raises(Forbidden, match="not host-a"):
        verify_ticket(token, ca.cert, me="host-a", role="destination", clock=clock)


def test_expired_ticket_is_refused(ca, clock):
    """A ticket past its expiry is refused."""
    _, token = ticket(ca, ttl=dt.timedelta(minutes=1))
    clock.advance(61)
    with pytest.raises(Forbidden, match="expired"):
        verify_ticket(token, ca.cert, me="host-a", role="source", clock=clock)


def test_ending_steps_accept_an_expired_ticket_but_still_check_it(ca, clock, tmp_path):
    """Without the expiry check (roll-back and clean-up steps) a ticket still needs the CA's signature and this host."""
    _, token = ticket(ca, ttl=dt.timedelta(minutes=1))
    clock.advance(3600)
    accepted = verify_ticket(token, ca.cert, me="host-b", role="destination", clock=clock, check_expiry=False)
    assert accepted.migration_id == "m-1"
    with pytest.raises(Forbidden, match="not host-c"):
        verify_ticket(token, ca.cert, me="host-c", role="destination", clock=clock, check_expiry=False)
    _, forged = ticket(rogue_ca(tmp_path, clock))
    with pytest.raises(Forbidden, match="signature"):
        verify_ticket(forged, ca.cert, me="host-a", role="source", clock=clock, check_expiry=False)


def test_nonce_store_on_unwritable_storage_is_a_storage_error(ca, clock, tmp_path):
    """A nonce store that cannot be written refuses the ticket with StorageError, not an unhandled OSError."""
    _, token = ticket(ca)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = NonceStore(blocker / "nonces.json")
    with pytest.raises(StorageError, match="cannot record the ticket nonce"):
        verify_ticket(token, ca.cert, me="host-a", role="source", clock=clock, nonces=store)


def test_forged_and_altered_tickets_are_refused(ca, clock, tmp_path):
    """A ticket signed by a rogue CA, or altered after signing, is refused."""
    _, forged = ticket(rogue_ca(tmp_path, clock))
    with pytest.raises(Forbidden, match="signature"):
        verify_ticket(forged, ca.cert, me="host-a", role="source", clock=clock)
    _, token = ticket(ca)
    payload, sig = token.split(".")
    fields = json.loads(_unb64(payload))
    fields["destination"] = "host-evil"
    altered = f"{_b64(json.dumps(fields, sort_keys=True).encode())}.{sig}"
    with pytest.raises(Forbidden, match="signature"):
        verify_ticket(altered, ca.cert, me="host-a", role="source", clock=clock)
    with pytest.raises(Forbidden, match="malformed"):
        verify_ticket("not-a-ticket", ca.cert, me="host-a", role="source", clock=clock)


def test_lease_is_not_a_ticket(ca, clock):
    """A lease cannot be presented as a migration ticket (and the reverse)."""
    _, lease = issue_lease(ca, vm_id="vm-1", host="host-a", generation=3)
    with pytest.raises(Forbidden, match="not a migration-ticket"):
        verify_ticket(lease, ca.cert, me="host-a", role="source", clock=clock)
    _, tk = ticket(ca)
    with pytest.raises(Forbidden, match="not a lease"):
        verify_lease(tk, ca.cert, me="host-a", vm_id="vm-1", generation=3, clock=clock)


def test_lease_fences_stale_generations(ca, clock):
    """A lease for generation 4 does not let a host resume its generation-3 copy, nor another host run it."""
    _, token = issue_lease(ca, vm_id="vm-1", host="host-b", generation=4)
    assert verify_lease(token, ca.cert, me="host-b", vm_id="vm-1", generation=4, clock=clock).generation == 4
    with pytest.raises(Forbidden, match="generation 4; this copy is generation 3"):
        verify_lease(token, ca.cert, me="host-b", vm_id="vm-1", generation=3, clock=clock)
    with pytest.raises(Forbidden, match="on host-b, not vm-1 on host-a"):
        verify_lease(token, ca.cert, me="host-a", vm_id="vm-1", generation=4, clock=clock)


def test_crl_lists_revoked_serials(ca, clock):
    """The CA issues a CRL naming revoked serials, signed by the CA key."""
    crl = x509.load_pem_x509_crl(ca.issue_crl([(1234, clock.now()), (5678, clock.now())]))
    assert crl.is_signature_valid(ca.cert.public_key())
    assert {r.serial_number for r in crl} == {1234, 5678}
