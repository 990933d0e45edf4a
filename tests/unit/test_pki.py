"""The CA, CSRs and peer identity checks."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ferryman.core.errors import Forbidden, InvalidInput, PKIError
from ferryman.pki.ca import CertificateAuthority, IssuedCertificate
from ferryman.pki.csr import generate_key, key_to_pem, load_private_key, make_csr, write_private_key
from ferryman.pki.identity import (
    PeerIdentity,
    check_peer,
    identity_from_der,
    subject_dn_for_qemu,
    verify_issued_by,
)
from ferryman.testing.pki import (
    expired_host_cert,
    forged_ca,
    not_yet_valid_host_cert,
    rogue_ca,
    write_host_credentials,
)

T0 = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)


class FixedClock:
    """A clock that says what the test sets."""

    def __init__(self, now: dt.datetime) -> None:
        self.current = now

    def now(self) -> dt.datetime:
        return self.current


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(T0)


@pytest.fixture
def ca(tmp_path: Path, clock: FixedClock) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca", clock)


def _cert(issued: IssuedCertificate) -> x509.Certificate:
    return x509.load_pem_x509_certificate(issued.pem)


def _der(issued: IssuedCertificate) -> bytes:
    return _cert(issued).public_bytes(serialization.Encoding.DER)


def _host_cert(ca: CertificateAuthority, host: str = "hv1", address: str = "127.0.0.2") -> IssuedCertificate:
    return ca.sign_host_csr(make_csr(generate_key(), host), host, address)


def _never_revoked(serial: int) -> bool:
    return False


# --- CA on disk -------------------------------------------------------------------------------------------------


def test_load_or_create_writes_a_private_key_and_a_private_directory(tmp_path: Path, clock: FixedClock) -> None:
    """First start creates ca.key (0600) and ca.pem in a 0700 directory."""
    directory = tmp_path / "state" / "ca"
    CertificateAuthority.load_or_create(directory, clock)
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert (directory / "ca.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_load_or_create_is_idempotent(tmp_path: Path, clock: FixedClock) -> None:
    """A second start loads the same CA instead of making a new one."""
    first = CertificateAuthority.load_or_create(tmp_path / "ca", clock)
    key_before = (tmp_path / "ca" / "ca.key").read_bytes()
    second = CertificateAuthority.load_or_create(tmp_path / "ca", clock)
    assert second.cert_pem == first.cert_pem
    assert (tmp_path / "ca" / "ca.key").read_bytes() == key_before
    verify_issued_by(_cert(_host_cert(second)), first.cert)


def test_ca_certificate_is_a_ca_with_the_given_name(ca: CertificateAuthority) -> None:
    """The CA certificate is self-signed, CA=true and named after the configured name."""
    assert ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Ferryman CA"
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    verify_issued_by(ca.cert, ca.cert)


def test_load_refuses_a_key_readable_by_others(tmp_path: Path, clock: FixedClock) -> None:
    """A CA key that other users can read is refused rather than used."""
    CertificateAuthority.load_or_create(tmp_path / "ca", clock)
    (tmp_path / "ca" / "ca.key").chmod(0o644)
    with pytest.raises(PKIError, match="chmod 600"):
        CertificateAuthority.load_or_create(tmp_path / "ca", clock)


def test_load_refuses_a_half_written_ca(tmp_path: Path, clock: FixedClock) -> None:
    """A key without its certificate is an error, not a reason to mint a new CA."""
    CertificateAuthority.load_or_create(tmp_path / "ca", clock)
    (tmp_path / "ca" / "ca.pem").unlink()
    with pytest.raises(PKIError, match="incomplete CA"):
        CertificateAuthority.load_or_create(tmp_path / "ca", clock)


def test_write_private_key_is_owner_only(tmp_path: Path) -> None:
    """Private keys are written 0600 and read back as the same EC P-256 key."""
    key = generate_key()
    path = tmp_path / "host.key"
    write_private_key(path, key_to_pem(key))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_private_key(path.read_bytes()).private_numbers() == key.private_numbers()


# --- signing CSRs -----------------------------------------------------------------------------------------------


def test_host_certificate_has_our_subject_sans_and_usages(ca: CertificateAuthority, clock: FixedClock) -> None:
    """A host certificate says CN=<host>, OU=host, O=Ferryman with DNS and IP SANs, serverAuth and clientAuth."""
    issued = _host_cert(ca, "hv1", "127.0.0.2")
    cert = _cert(issued)
    assert issued.subject == "CN=hv1,OU=host,O=Ferryman"
    assert cert.subject.rfc4514_string() == issued.subject
    assert cert.serial_number == issued.serial
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hv1"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.2"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert issued.not_before <= T0 < issued.not_after
    assert issued.not_after - T0 == dt.timedelta(days=365)
    verify_issued_by(cert, ca.cert)


def test_csr_with_wrong_common_name_is_refused(ca: CertificateAuthority) -> None:
    """A host cannot enrol under another host's name."""
    csr = make_csr(generate_key(), "hv2")
    with pytest.raises(PKIError, match="hv2"):
        ca.sign_host_csr(csr, "hv1", "127.0.0.2")


def test_csr_with_broken_signature_is_refused(ca: CertificateAuthority) -> None:
    """A CSR whose signature does not verify (no proof of key possession) is refused."""
    csr = x509.load_pem_x509_csr(make_csr(generate_key(), "hv1"))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the ECDSA signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(PKIError, match="invalid signature"):
        ca.sign_host_csr(tampered, "hv1", "127.0.0.2")


def test_malformed_csr_is_refused(ca: CertificateAuthority) -> None:
    """Bytes that are not a CSR are a PKIError, not a crash."""
    with pytest.raises(PKIError, match="malformed CSR"):
        ca.sign_host_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "hv1", "x")


def test_csr_requests_beyond_the_name_are_ignored(ca: CertificateAuthority) -> None:
    """A CSR asking for CA=true, another role, other SANs and usages still gets only our host certificate."""
    key = generate_key()
    greedy = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil Corp"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "controller"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "hv1"),
                ]
            )
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("controller"), x509.DNSName("*.example.com")]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    cert = _cert(ca.sign_host_csr(greedy, "hv1", "127.0.0.2"))
    assert cert.subject.rfc4514_string() == "CN=hv1,OU=host,O=Ferryman"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hv1"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


def test_csr_with_a_non_p256_key_is_refused(ca: CertificateAuthority) -> None:
    """Only EC P-256 keys are certified."""
    csr = make_csr(ec.generate_private_key(ec.SECP384R1()), "hv1")
    with pytest.raises(PKIError, match="P-256"):
        ca.sign_host_csr(csr, "hv1", "127.0.0.2")


def test_host_names_that_are_not_dns_names_are_refused(ca: CertificateAuthority) -> None:
    """A name with DN metacharacters never reaches a certificate (it would confuse QEMU's DN match)."""
    with pytest.raises(InvalidInput):
        ca.sign_host_csr(make_csr(generate_key(), "hv1,O=x"), "hv1,O=x", "127.0.0.2")


def test_address_that_is_a_name_becomes_a_dns_san(ca: CertificateAuthority) -> None:
    """An address that is not an IP is certified as a DNS name, alongside the host name."""
    cert = _cert(_host_cert(ca, "hv1", "hv1.lab.example"))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hv1", "hv1.lab.example"]
    assert san.get_values_for_type(x509.IPAddress) == []


def test_controller_certificate(ca: CertificateAuthority) -> None:
    """A controller certificate has OU=controller, its name, localhost and its IPs; its key matches."""
    key_pem, issued = ca.issue_controller_certificate("ctl1", ["127.0.0.1", "::1"])
    cert = _cert(issued)
    assert issued.subject == "CN=ctl1,OU=controller,O=Ferryman"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ctl1", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert load_private_key(key_pem).public_key() == cert.public_key()


def test_serials_are_random_and_distinct(ca: CertificateAuthority) -> None:
    """Two certificates never share a serial (revocation is by serial)."""
    serials = {_host_cert(ca).serial for _ in range(20)}
    assert len(serials) == 20
    assert all(serial.bit_length() > 64 for serial in serials)


def test_certificate_cannot_outlive_the_ca(ca: CertificateAuthority) -> None:
    """A validity longer than the CA's is cut to the CA's expiry."""
    issued = ca.sign_host_csr(make_csr(generate_key(), "hv1"), "hv1", "127.0.0.2", validity=dt.timedelta(days=99999))
    assert issued.not_after == ca.cert.not_valid_after_utc


# --- identities -------------------------------------------------------------------------------------------------


def test_identity_from_der(ca: CertificateAuthority) -> None:
    """The identity carries CN, OU as role, serial, expiry and the RFC 4514 subject."""
    issued = _host_cert(ca)
    assert identity_from_der(_der(issued)) == PeerIdentity(
        common_name="hv1",
        role="host",
        serial=issued.serial,
        not_after=issued.not_after,
        subject="CN=hv1,OU=host,O=Ferryman",
    )


def test_check_peer_accepts_the_expected_host(ca: CertificateAuthority, clock: FixedClock) -> None:
    """The right host with a current, unrevoked certificate passes."""
    issued = _host_cert(ca)
    identity = check_peer(
        _der(issued), expected_role="host", expected_name="hv1", is_revoked=_never_revoked, clock=clock
    )
    assert identity.common_name == "hv1"
    assert identity.serial == issued.serial


def test_check_peer_accepts_any_name_when_none_is_expected(ca: CertificateAuthority, clock: FixedClock) -> None:
    """Without an expected name, any certificate of the right role passes."""
    identity = check_peer(
        _der(_host_cert(ca, "hv7")), expected_role="host", expected_name=None, is_revoked=_never_revoked, clock=clock
    )
    assert identity.common_name == "hv7"


def test_check_peer_refuses_wrong_role(ca: CertificateAuthority, clock: FixedClock) -> None:
    """A host certificate cannot act as the controller."""
    with pytest.raises(Forbidden, match="role 'host', expected 'controller'"):
        check_peer(
            _der(_host_cert(ca)), expected_role="controller", expected_name=None, is_revoked=_never_revoked, clock=clock
        )


def test_check_peer_refuses_wrong_name(ca: CertificateAuthority, clock: FixedClock) -> None:
    """Another host from the same CA is not the host this migration was assigned."""
    with pytest.raises(Forbidden, match="peer is 'hv2', expected 'hv1'"):
        check_peer(
            _der(_host_cert(ca, "hv2")),
            expected_role="host",
            expected_name="hv1",
            is_revoked=_never_revoked,
            clock=clock,
        )


def test_check_peer_refuses_revoked(ca: CertificateAuthority, clock: FixedClock) -> None:
    """A revoked serial is refused even though the certificate is otherwise perfect."""
    issued = _host_cert(ca)
    revoked = {issued.serial}
    with pytest.raises(Forbidden, match="revoked"):
        check_peer(
            _der(issued), expected_role="host", expected_name="hv1", is_revoked=revoked.__contains__, clock=clock
        )


def test_check_peer_refuses_expired(ca: CertificateAuthority, clock: FixedClock) -> None:
    """An expired certificate is refused, judged by the injected clock."""
    issued = expired_host_cert(ca, "hv1", "127.0.0.2", generate_key())
    with pytest.raises(Forbidden, match="expired"):
        check_peer(_der(issued), expected_role="host", expected_name="hv1", is_revoked=_never_revoked, clock=clock)


def test_check_peer_refuses_not_yet_valid(ca: CertificateAuthority, clock: FixedClock) -> None:
    """A certificate dated in the future is refused."""
    issued = not_yet_valid_host_cert(ca, "hv1", "127.0.0.2", generate_key())
    with pytest.raises(Forbidden, match="not valid before"):
        check_peer(_der(issued), expected_role="host", expected_name="hv1", is_revoked=_never_revoked, clock=clock)


def test_check_peer_follows_the_clock_past_expiry(ca: CertificateAuthority, clock: FixedClock) -> None:
    """The same certificate is accepted today and refused once the clock passes its expiry."""
    der = _der(_host_cert(ca))
    check_peer(der, expected_role="host", expected_name="hv1", is_revoked=_never_revoked, clock=clock)
    clock.current = T0 + dt.timedelta(days=366)
    with pytest.raises(Forbidden, match="expired"):
        check_peer(der, expected_role="host", expected_name="hv1", is_revoked=_never_revoked, clock=clock)


def test_rogue_ca_with_the_same_name_is_not_our_ca(tmp_path: Path, ca: CertificateAuthority, clock: FixedClock) -> None:
    """A certificate from another CA called "Ferryman CA" fails the issuer check."""
    rogue = rogue_ca(tmp_path, clock)
    assert rogue.cert.subject == ca.cert.subject
    forged = _host_cert(rogue)
    with pytest.raises(Forbidden, match="not issued by"):
        verify_issued_by(_cert(forged), ca.cert)
    with pytest.raises(Forbidden, match="not issued by"):
        check_peer(
            _der(forged),
            expected_role="host",
            expected_name="hv1",
            is_revoked=_never_revoked,
            clock=clock,
            issuer=ca.cert,
        )


def test_forged_copy_of_our_ca_is_not_our_ca(ca: CertificateAuthority) -> None:
    """A CA certificate copied field for field but holding another key fails the issuer check."""
    forged = forged_ca(ca)
    assert forged.cert.subject == ca.cert.subject
    with pytest.raises(Forbidden, match="not issued by"):
        verify_issued_by(_cert(_host_cert(forged)), ca.cert)


def test_garbage_peer_certificate_is_forbidden(clock: FixedClock) -> None:
    """Bytes that are not a certificate are refused as an identity problem."""
    with pytest.raises(Forbidden):
        check_peer(b"\x30\x03junk", expected_role="host", expected_name=None, is_revoked=_never_revoked, clock=clock)


def test_write_host_credentials(tmp_path: Path, ca: CertificateAuthority) -> None:
    """The helper writes a certificate, an owner-only key and the issuing CA's certificate."""
    creds = write_host_credentials(ca, "hv1", "127.0.0.2", tmp_path / "hv1")
    cert = x509.load_pem_x509_certificate(creds.cert_path.read_bytes())
    assert cert.serial_number == creds.serial
    assert stat.S_IMODE(creds.key_path.stat().st_mode) == 0o600
    assert creds.ca_path.read_bytes() == ca.cert_pem
    assert load_private_key(creds.key_path.read_bytes()).public_key() == cert.public_key()


# --- QEMU's spelling of the DN ----------------------------------------------------------------------------------


def test_qemu_dn_is_in_certificate_order(ca: CertificateAuthority) -> None:
    """QEMU's authz sees GnuTLS' DN: attributes in encoding order, the reverse of RFC 4514."""
    cert = _cert(_host_cert(ca, "hv1"))
    assert subject_dn_for_qemu(cert) == "O=Ferryman,OU=host,CN=hv1"
    assert subject_dn_for_qemu(ca.cert) == "O=Ferryman,CN=Ferryman CA"


def test_qemu_dn_refuses_subjects_that_need_escaping() -> None:
    """A subject whose spelling could differ between GnuTLS and RFC 4514 is refused, not guessed."""
    key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a,b")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(T0)
        .not_valid_after(T0 + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(PKIError):
        subject_dn_for_qemu(cert)


def test_qemu_dn_of_host_matches_issued_certificates(tmp_path):
    """The DN computed from a host name is the one QEMU reads from the certificate issued to that host."""
    from cryptography import x509 as _x509

    from ferryman.core.clock import SystemClock
    from ferryman.pki.ca import CertificateAuthority
    from ferryman.pki.csr import generate_key, make_csr
    from ferryman.pki.identity import qemu_dn_of_host, subject_dn_for_qemu

    ca = CertificateAuthority.load_or_create(tmp_path / "ca", SystemClock())
    issued = ca.sign_host_csr(make_csr(generate_key(), "host-q"), "host-q", "127.0.0.9")
    assert subject_dn_for_qemu(_x509.load_pem_x509_certificate(issued.pem)) == qemu_dn_of_host("host-q")
