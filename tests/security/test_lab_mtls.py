"""Controller and agent authentication on a running lab, tried as an attacker would.

The controller accepts agent reports only over a verified, unrevoked host certificate and takes the host's identity from
that certificate; the agent serves only the controller; enrolment tokens are single use.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest

from ferryman.core.clock import SystemClock
from ferryman.pki.ca import CertificateAuthority
from ferryman.pki.csr import generate_key, key_to_pem, make_csr
from ferryman.testing.pki import rogue_ca, write_host_credentials

pytestmark = [pytest.mark.lab, pytest.mark.qemu]


def trust(lab) -> ssl.SSLContext:
    """A client context that trusts only the lab's CA and presents no certificate."""
    return ssl.create_default_context(cafile=str(lab.lab.ca_file))


def controller_url(lab) -> str:
    return f"https://127.0.0.1:{lab.state.port}"


def host_client(lab, cert: Path, key: Path) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(lab.lab.ca_file))
    ctx.load_cert_chain(str(cert), str(key))
    return httpx.Client(base_url=controller_url(lab), verify=ctx, timeout=10)


def real_ca(lab) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(lab.dir / "controller" / "pki", SystemClock())


def register_host(lab, name: str, address: str) -> str:
    body = {
        "name": name,
        "address": address,
        "agent_port": 18444,
        "site": "dc-edge",
        "zone": "zone-9",
        "subnet": "10.99.0.0/24",
        "hypervisor_version": "7.2.0",
        "patch_level": 1,
        "memory_mb": 512,
    }
    return lab.api().post("/api/v1/hosts", body)["enrol_token"]


def enrol(lab, host: str, token: str, csr_host: str | None = None) -> httpx.Response:
    key = generate_key()
    csr = make_csr(key, csr_host or host).decode()
    return httpx.post(
        f"{controller_url(lab)}/api/v1/enrol",
        json={"host": host, "token": token, "csr_pem": csr},
        verify=trust(lab),
        timeout=10,
    ), key


def test_enrolment_token_is_single_use_and_bound_to_its_host(lab, tmp_path):
    """A one-time token enrols its host once; reuse, a wrong token and a CSR naming another host are refused."""
    token = register_host(lab, "enrol-x", "127.0.0.20")
    wrong, _ = enrol(lab, "enrol-x", "not-the-token")
    assert wrong.status_code == 401
    other_cn, _ = enrol(lab, "enrol-x", token, csr_host="host-a")
    assert other_cn.status_code == 400 and "host-a" in other_cn.json()["detail"]
    ok, key = enrol(lab, "enrol-x", token)
    assert ok.status_code == 200, ok.text
    replay, _ = enrol(lab, "enrol-x", token)
    assert replay.status_code == 401
    # the issued certificate works for reports until the host is revoked
    cert, key_file = tmp_path / "x.pem", tmp_path / "x.key"
    cert.write_text(ok.json()["certificate_pem"])
    key_file.write_bytes(key_to_pem(key))
    with host_client(lab, cert, key_file) as client:
        assert client.post("/agent/v1/report", json={"vms": []}).json()["host"] == "enrol-x"
        lab.api().post("/api/v1/hosts/enrol-x/revoke")
        refused = client.post("/agent/v1/report", json={"vms": []})
    assert refused.status_code == 403 and "revoked" in refused.json()["detail"]
    refusals = lab.api().get("/api/v1/events", kind="agent.refused")
    assert any("revoked" in e["message"] for e in refusals)


def test_host_cannot_report_as_another_host(lab):
    """host-b's certificate reporting web-1 with a body naming host-a is taken as host-b: an unexpected copy alarm."""
    cert, key, _ = lab.host_pki("host-b")
    web1 = lab.api().get("/api/v1/vms/web-1")
    assert web1["host"] == "host-a"
    forged = {"host": "host-a", "vms": [{"vm_id": web1["id"], "name": "web-1", "run_state": "running", "pid": 1}]}
    with host_client(lab, cert, key) as client:
        ack = client.post("/agent/v1/report", json=forged)
    assert ack.json()["host"] == "host-b"
    alarms = lab.api().get("/api/v1/alarms", all=True)
    assert any(a["kind"] == "vm.unexpected_copy" and a["vm"] == web1["id"] and a["host"] == "host-b" for a in alarms)
    assert lab.api().get("/api/v1/vms/web-1")["host"] == "host-a"  # the CMDB was not rewritten
    # host-b's next genuine reports resolve the alarm (bounded wait)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        open_alarms = lab.api().get("/api/v1/alarms")
        if not any(a["kind"] == "vm.unexpected_copy" and a["vm"] == web1["id"] for a in open_alarms):
            break
        time.sleep(1)
    else:
        pytest.fail("the forged report's alarm was not resolved by genuine reports")


def test_certificate_from_another_ca_is_refused(lab, tmp_path):
    """A certificate for host-a from a rogue CA with the same name fails the TLS handshake with the controller."""
    creds = write_host_credentials(rogue_ca(tmp_path), "host-a", "127.0.0.2", tmp_path / "rogue")
    with pytest.raises(httpx.TransportError), host_client(lab, creds.cert_path, creds.key_path) as client:
        client.post("/agent/v1/report", json={"vms": []})


def test_expired_certificate_is_refused(lab, tmp_path):
    """An expired host certificate from the real CA fails the TLS handshake."""
    creds = write_host_credentials(real_ca(lab), "host-a", "127.0.0.2", tmp_path / "old", validity="expired")
    with pytest.raises(httpx.TransportError), host_client(lab, creds.cert_path, creds.key_path) as client:
        client.post("/agent/v1/report", json={"vms": []})


def test_agent_endpoints_need_a_host_certificate(lab):
    """Without a client certificate (or with only an API token) the agent endpoints refuse."""
    response = httpx.post(f"{controller_url(lab)}/agent/v1/report", json={"vms": []}, verify=trust(lab), timeout=10)
    assert response.status_code == 401


def test_plain_tcp_client_gets_nothing(lab):
    """A plain HTTP request to the controller port gets no HTTP answer."""
    with socket.create_connection(("127.0.0.1", lab.state.port), timeout=5) as sock:
        sock.sendall(b"GET /api/v1/vms HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        try:
            data = sock.recv(4096)
        except (ConnectionResetError, TimeoutError):
            data = b""
    assert not data.startswith(b"HTTP/")


def test_api_needs_a_token(lab):
    """The REST API refuses requests without a valid bearer token."""
    response = httpx.get(f"{controller_url(lab)}/api/v1/vms", verify=trust(lab), timeout=10)
    assert response.status_code == 401


def test_agent_serves_only_the_controller(lab):
    """host-a's agent refuses host-b's valid certificate and clients without one; the controller's is accepted."""
    address = lab.state.addresses["host-a"]
    url = f"https://{address}:{lab.state.agent_port}/v1/health"
    cert, key, ca = lab.host_pki("host-b")
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    assert httpx.get(url, verify=ctx, timeout=10).status_code == 403
    with pytest.raises(httpx.TransportError):
        httpx.get(url, verify=ssl.create_default_context(cafile=str(ca)), timeout=10)
    pki = lab.dir / "controller" / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / "controller.pem"), str(pki / "controller.key"))
    assert httpx.get(url, verify=ctx, timeout=10).json()["host"] == "host-a"
