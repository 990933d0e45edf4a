"""Forensic capture on the wire: the controller asks a host to capture a VM's memory and disks sealed under keys it
sends with the request (never written down by the host), fetches the sealed files, then has the host scrub its copy.

The sealed bytes are not JSON: ``GET /v1/forensics/{capture}/{artefact}`` streams them (:data:`FETCH_PATH`).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, ClassVar

from pydantic import Field, field_serializer, field_validator

from ferryman.wire.base import AgentCall, Keyed, Reply
from ferryman.wire.vms import Receipt

FETCH_PATH = "/v1/forensics/{capture}/{artefact}"
SEAL_KEY_BYTES = 32


class CapturedArtefact(Reply):
    artefact: str  # memory | disk<N>
    plaintext_sha256: str
    plaintext_bytes: int
    sealed_sha256: str
    sealed_bytes: int
    started_at: str
    finished_at: str


class Captured(Reply):
    capture: str
    generation: int
    artefacts: list[CapturedArtefact]


class Capture(Keyed, AgentCall[Captured]):
    """Capture the VM's memory (ELF core, ``dump-guest-memory``) and/or disks (point in time), live, each sealed
    from its first byte under its own key; ``disk_key`` opens an encrypted VM's disks."""

    path: ClassVar[str] = "/v1/vms/{target}/forensics"
    capture: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    artefacts: list[str] = Field(min_length=1, max_length=9)
    keys: dict[str, bytes] = Field(default_factory=dict, repr=False)

    @field_validator("keys", mode="before")
    @classmethod
    def _decode_keys(cls, value: Any) -> dict[str, bytes]:
        if not isinstance(value, dict):
            raise ValueError("keys must map artefact names to base64 keys")
        out = {}
        for name, key in value.items():
            if isinstance(key, bytes):
                raw = key
            else:
                try:
                    raw = base64.b64decode(str(key), validate=True)
                except (binascii.Error, ValueError):
                    raise ValueError("a sealing key must be base64") from None
            if len(raw) != SEAL_KEY_BYTES:
                raise ValueError(f"a sealing key has {SEAL_KEY_BYTES} bytes")
            out[str(name)] = raw
        return out

    @field_serializer("keys")
    def _encode_keys(self, keys: dict[str, bytes]) -> dict[str, str]:
        return {name: base64.b64encode(key).decode() for name, key in keys.items()}


class CaptureDiscarded(Reply):
    receipts: list[Receipt]


class DiscardCapture(AgentCall[CaptureDiscarded]):
    """The controller holds the sealed files: scrub this host's copy (idempotent)."""

    path: ClassVar[str] = "/v1/forensics/{target}/discard"
