"""Host enrolment: a one-time token and a CSR buy the host its certificate from the controller.

The private key never leaves the host. The controller's CA is pinned out of band (``--controller-ca``): enrolment talks
only to a controller whose certificate chains to it, and refuses a response carrying a different CA.
"""

from __future__ import annotations

import httpx

from ferryman.agent.settings import AgentSettings
from ferryman.core.errors import AgentUnreachable, PKIError, Unauthenticated
from ferryman.pki.csr import generate_key, key_to_pem, make_csr, write_private_key
from ferryman.pki.tls import client_context


def is_enrolled(settings: AgentSettings) -> bool:
    return settings.cert.exists() and settings.key.exists() and settings.ca.exists()


def enrol(settings: AgentSettings, token: str) -> int:
    """Enrol with the controller; write key (0600), certificate and CA into the agent's PKI directory. Returns the
    certificate serial."""
    settings.pki_dir.mkdir(parents=True, exist_ok=True)
    settings.pki_dir.chmod(0o700)
    key = generate_key()
    csr = make_csr(key, settings.name)
    ctx = client_context(settings.controller_ca, check_hostname=True)
    try:
        response = httpx.post(
            f"{settings.controller_url}/api/v1/enrol",
            json={"host": settings.name, "token": token, "csr_pem": csr.decode()},
            verify=ctx,
            timeout=30,
        )
    except httpx.TransportError as err:
        raise AgentUnreachable(f"controller unreachable at {settings.controller_url}: {err}") from err
    if response.status_code != 200:
        detail = response.json().get("detail", response.text) if response.content else response.reason_phrase
        raise Unauthenticated(f"enrolment of {settings.name} refused: {detail}")
    body = response.json()
    pinned = settings.controller_ca.read_bytes().strip()
    if body["ca_pem"].encode().strip() != pinned:
        raise PKIError("the controller answered with a CA other than the pinned one; refusing its certificate")
    write_private_key(settings.key, key_to_pem(key))
    settings.cert.write_bytes(body["certificate_pem"].encode())
    settings.ca.write_bytes(pinned + b"\n")
    return int(body["serial"])
