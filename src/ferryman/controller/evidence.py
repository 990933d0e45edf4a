"""The controller's evidence store: sealed artefacts moved off the hosts, their keys, and signed manifests.

A capture's artefacts arrive sealed (AES-256-GCM, :mod:`ferryman.forensics.sealed`) under keys the controller made
for them and sent to the host with the capture request; the store keeps the sealed bytes as they came
(``<data-dir>/evidence/<capture>/<artefact>.sealed``, read-only) and each key only wrapped under the evidence KEK
(``<data-dir>/evidence/kek``, owner-only), bound to its capture and artefact. A manifest names the VM, its generation,
the host, the times, the sizes and the SHA-256 of each plaintext and sealed artefact and the collector, as canonical
JSON signed by the controller's CA key. Verification re-hashes the sealed file, unseals it (every chunk
authenticated) and hashes the plaintext, and checks the manifest's signature: one flipped byte anywhere fails it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding

from ferryman.core.errors import FerrymanError, InvalidInput, NotFound, StorageError
from ferryman.durable import fsync_directory
from ferryman.forensics.sealed import SealInfo, open_sealed
from ferryman.pki.ca import CertificateAuthority

MANIFEST_FORMAT = "ferryman-evidence-v1"
SIGNATURE = "ecdsa-p256-sha256"  # over the manifest's exact bytes; DER signature, base64 in the .sig file
CHUNK = 1 << 20
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


def canonical(body: dict[str, Any]) -> str:
    """The exact text a manifest signature covers: sorted keys, no spaces, UTF-8."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_tag(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Verified:
    artefact: str
    ok: bool
    detail: str  # what was checked, or what failed


class EvidenceStore:
    def __init__(self, root: Path, ca: CertificateAuthority) -> None:
        self.root = root
        self._ca = ca
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._kek = self._load_kek(root / "kek")

    @staticmethod
    def _load_kek(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        key = AESGCM.generate_key(bit_length=256)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
            out.flush()
            os.fsync(out.fileno())
        fsync_directory(path.parent)
        return key

    # -- keys --------------------------------------------------------------------------------------------------------

    @staticmethod
    def new_key() -> bytes:
        return secrets.token_bytes(32)

    def wrap(self, capture: str, artefact: str, key: bytes) -> str:
        nonce = secrets.token_bytes(12)
        sealed = AESGCM(self._kek).encrypt(nonce, key, f"{capture}/{artefact}".encode())
        return base64.b64encode(nonce + sealed).decode()

    def unwrap(self, capture: str, artefact: str, wrapped: str) -> bytes:
        raw = base64.b64decode(wrapped)
        try:
            return AESGCM(self._kek).decrypt(raw[:12], raw[12:], f"{capture}/{artefact}".encode())
        except InvalidTag:
            raise StorageError(f"the key of {capture}/{artefact} does not unwrap under this controller's KEK") from None

    # -- files -------------------------------------------------------------------------------------------------------

    def path(self, capture: str, artefact: str) -> Path:
        if not _NAME_RE.match(capture) or not _NAME_RE.match(artefact):
            raise InvalidInput(f"bad evidence name {capture}/{artefact}")
        return self.root / capture / f"{artefact}.sealed"

    def receive(self, capture: str, artefact: str, chunks: Iterable[bytes], expected_sha256: str) -> int:
        """Write the sealed bytes of one artefact as they stream in; StorageError (and nothing kept) unless they hash
        to ``expected_sha256``. The bytes written."""
        path = self.path(capture, artefact)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        partial = path.with_suffix(".partial")
        digest, size = hashlib.sha256(), 0
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            got = "sha256:" + digest.hexdigest()
            if got != expected_sha256:
                raise StorageError(f"{capture}/{artefact} arrived as {got}, the host reported {expected_sha256}")
            partial.chmod(0o400)
            os.replace(partial, path)
            fsync_directory(path.parent)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return size

    def sealed_chunks(self, capture: str, artefact: str) -> Iterator[bytes]:
        path = self.path(capture, artefact)
        try:
            with path.open("rb") as inp:
                while chunk := inp.read(CHUNK):
                    yield chunk
        except FileNotFoundError:
            raise NotFound(f"evidence {capture}/{artefact} is not in the store") from None

    def plaintext(self, capture: str, artefact: str, key: bytes) -> Iterator[bytes]:
        """The artefact's plaintext, chunk by chunk, every chunk authenticated before it is given out."""
        path = self.path(capture, artefact)
        try:
            with path.open("rb") as inp:
                yield from open_sealed(inp, key)
        except FileNotFoundError:
            raise NotFound(f"evidence {capture}/{artefact} is not in the store") from None

    # -- manifests ---------------------------------------------------------------------------------------------------

    @property
    def signer(self) -> dict[str, str]:
        """Who signs manifests, as a manifest names it: the SHA-256 of the controller CA's certificate (DER) and the
        algorithm, so that anyone holding :attr:`signer_pem` checks a manifest without Ferryman."""
        return {"certificate_sha256": sha256_tag(self._ca.cert.public_bytes(Encoding.DER)), "algorithm": SIGNATURE}

    @property
    def signer_pem(self) -> str:
        return self._ca.cert_pem.decode()

    def sign(self, body: dict[str, Any]) -> tuple[str, str]:
        """The canonical text of ``body`` (naming its signer) and the CA's signature over it (base64)."""
        text = canonical({"format": MANIFEST_FORMAT, "signer": self.signer, **body})
        return text, base64.b64encode(self._ca.sign(text.encode())).decode()

    def signature_ok(self, text: str, signature: str) -> bool:
        public = self._ca.cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            return False
        try:
            public.verify(base64.b64decode(signature), text.encode(), ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True

    def verify(self, capture: str, artefact: str, key: bytes, listed: dict[str, Any]) -> Verified:
        """Re-hash the sealed file, unseal it and hash the plaintext; compare both with the manifest's entry."""
        try:
            sealed = hashlib.sha256()
            for chunk in self.sealed_chunks(capture, artefact):
                sealed.update(chunk)
            if "sha256:" + sealed.hexdigest() != listed["sealed_sha256"]:
                return Verified(artefact, False, f"sealed file hashes to sha256:{sealed.hexdigest()[:16]}…")
            plain, size = hashlib.sha256(), 0
            for chunk in self.plaintext(capture, artefact, key):
                plain.update(chunk)
                size += len(chunk)
        except FerrymanError as err:
            return Verified(artefact, False, str(err))
        if "sha256:" + plain.hexdigest() != listed["plaintext_sha256"] or size != listed["plaintext_bytes"]:
            return Verified(artefact, False, f"plaintext hashes to sha256:{plain.hexdigest()[:16]}… ({size} bytes)")
        return Verified(artefact, True, f"{size} bytes, {listed['plaintext_sha256'][:23]}… sealed and plain")


def seal_entry(artefact: str, info: SealInfo, started_at: str, finished_at: str) -> dict[str, Any]:
    return {
        "artefact": artefact,
        "plaintext_sha256": info.plaintext_sha256,
        "plaintext_bytes": info.plaintext_bytes,
        "sealed_sha256": info.sealed_sha256,
        "sealed_bytes": info.sealed_bytes,
        "started_at": started_at,
        "finished_at": finished_at,
    }
