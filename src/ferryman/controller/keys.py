"""Per-copy disk keys of encrypted VMs, and the key-encryption keys (KEKs) that wrap them.

Every copy of an encrypted VM (the VM on one host at one generation) has its own random 256-bit key: its images are
LUKS-encrypted qcow2 whose passphrase derives from it. The CMDB stores each key only wrapped (AES-256-GCM under the
current KEK, with the key's id, VM, host and generation as associated data, so a wrapped key moved to another row
does not unwrap). Agents get a key in the body of the one request that needs it (over mutual TLS), hand it to QEMU
through a pipe, and never write it down.

**Destroying a key is the crypto-erase of its copy.** The row loses its wrapped key, and then the KEK is *rotated*:
a new KEK wraps every key still alive, and the old KEK file is overwritten and unlinked. Whatever the database keeps
of the destroyed key (SQLite's write-ahead log, PostgreSQL's dead row versions, a backup) is wrapped under a KEK that
exists nowhere any more. The copy's images on the losing host then hold ciphertext nobody can decrypt, even if the
host never answered the scrub.

KEKs live in ``<data_dir>/keys/kek-<n>`` (owner-only). The controller is the only writer; one lock orders every key
operation within it.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ferryman.cmdb.key_store import DiskKeyRecord
from ferryman.cmdb.repository import Repository
from ferryman.core.clock import Clock
from ferryman.core.errors import Conflict, NotFound, PKIError, StorageError
from ferryman.durable import fsync_directory
from ferryman.pki.csr import write_atomic

log = structlog.get_logger(__name__)

KEY_BYTES = 32
_NONCE_BYTES = 12
_KEK_RE = re.compile(r"^kek-(\d+)$")
ROTATION_ATTEMPTS = 3


@dataclass(frozen=True)
class Copy:
    """One copy of a VM: the images on ``host`` at ``generation``."""

    vm_id: str
    host: str
    generation: int


def encode_key(key: bytes) -> str:
    """The wire form of a key in a request body (base64)."""
    return base64.b64encode(key).decode()


class DiskKeys:
    def __init__(self, repo: Repository, keys_dir: Path, clock: Clock) -> None:
        self.repo = repo
        self.dir = keys_dir
        self.clock = clock
        self._lock = threading.RLock()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self._pending = self.dir / "rotation-pending"
        if self._pending.exists():  # keys were destroyed but the KEK they were wrapped with may still exist
            self.rotate()

    # -- KEKs ----------------------------------------------------------------------------------------------------------

    def _kek_ids(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _KEK_RE.match(p.name)))

    def _kek_path(self, kek_id: int) -> Path:
        return self.dir / f"kek-{kek_id}"

    def _kek(self, kek_id: int) -> bytes:
        try:
            data = self._kek_path(kek_id).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"key-encryption key {kek_id} is missing from {self.dir}") from None
        if len(data) != KEY_BYTES:
            raise StorageError(f"key-encryption key {kek_id} in {self.dir} is corrupt ({len(data)} bytes)")
        return data

    def current_kek_id(self) -> int:
        """The KEK new keys are wrapped with; the first one is made on first use."""
        with self._lock:
            ids = self._kek_ids()
            return ids[-1] if ids else self._new_kek(1)

    def _new_kek(self, kek_id: int) -> int:
        self._write(self._kek_path(kek_id), secrets.token_bytes(KEY_BYTES))
        return kek_id

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        try:
            write_atomic(path, data, mode=0o600)
        except PKIError as err:
            raise StorageError(f"cannot write {path.name} in the key directory: {err}") from err

    # -- wrapping ------------------------------------------------------------------------------------------------------

    @staticmethod
    def _aad(key_id: str, copy: Copy) -> bytes:
        return f"ferryman-disk-key|{key_id}|{copy.vm_id}|{copy.host}|{copy.generation}".encode()

    def _wrap(self, kek_id: int, key_id: str, copy: Copy, key: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return nonce + AESGCM(self._kek(kek_id)).encrypt(nonce, key, self._aad(key_id, copy))

    def _unwrap(self, record: DiskKeyRecord) -> bytes:
        if record.wrapped is None or record.kek_id is None:
            raise NotFound(
                f"the key of VM {record.vm_id} on {record.host} (generation {record.generation}) was destroyed"
            )
        copy = Copy(record.vm_id, record.host, record.generation)
        nonce, body = record.wrapped[:_NONCE_BYTES], record.wrapped[_NONCE_BYTES:]
        try:
            return AESGCM(self._kek(record.kek_id)).decrypt(nonce, body, self._aad(record.id, copy))
        except InvalidTag:
            raise StorageError(f"disk key {record.id} does not unwrap: its row or its KEK was altered") from None

    # -- keys ----------------------------------------------------------------------------------------------------------

    def create(self, copy: Copy, key: bytes | None = None) -> bytes:
        """A new key for ``copy`` (or ``key``, for a copy that opens the same images), stored wrapped before any agent
        sees it. Conflict if the copy has a live key already."""
        key = key if key is not None else secrets.token_bytes(KEY_BYTES)
        with self._lock:
            kek_id = self.current_kek_id()
            key_id = str(uuid.uuid4())
            self.repo.add_disk_key(
                DiskKeyRecord(
                    id=key_id,
                    vm_id=copy.vm_id,
                    host=copy.host,
                    generation=copy.generation,
                    kek_id=kek_id,
                    wrapped=self._wrap(kek_id, key_id, copy, key),
                    created_at=self.clock.now(),
                )
            )
        return key

    def ensure(self, copy: Copy) -> bytes:
        """The copy's key, made if it has none yet (a retried step finds the one it made before)."""
        with self._lock:
            found = self.repo.live_disk_key(copy.vm_id, copy.host, copy.generation)
            return self._unwrap(found) if found is not None else self.create(copy)

    def get(self, copy: Copy) -> bytes:
        """The live key of ``copy``; NotFound if it has none (never made, or destroyed)."""
        found = self.repo.live_disk_key(copy.vm_id, copy.host, copy.generation)
        if found is None:
            raise NotFound(
                f"no live disk key for VM {copy.vm_id} on {copy.host} at generation {copy.generation}: "
                "the copy was never keyed or its key was destroyed"
            )
        return self._unwrap(found)

    def share(self, source: Copy, target: Copy) -> bytes:
        """Shared storage: ``target`` opens the very images of ``source``, so it gets the same key in a row of its
        own (destroying either row later leaves the other copy's access intact). Idempotent."""
        with self._lock:
            if (found := self.repo.live_disk_key(target.vm_id, target.host, target.generation)) is not None:
                return self._unwrap(found)
            return self.create(target, self.get(source))

    def destroy(self, vm_id: str, reason: str, *, host: str | None = None, generation: int | None = None) -> list[str]:
        """Destroy the live keys of a VM's copies (all, or those on ``host`` / at ``generation``), then rotate the
        KEK so no remnant of them unwraps. Returns the ids of the keys destroyed now (idempotent: [] the second time).
        """
        with self._lock:
            # the mark makes the rotation survive a failure or crash after the rows are gone: the next destroy (or
            # the controller's next start) rotates while it exists
            pending = self._pending.exists()
            self._write(self._pending, b"")
            gone = self.repo.destroy_disk_keys(vm_id, self.clock.now(), reason, host=host, generation=generation)
            if gone or pending:
                self.rotate()
            else:
                _erase(self._pending)
            if gone:
                log.info("disk keys destroyed", vm=vm_id, host=host, generation=generation, keys=[k.id for k in gone])
            return [k.id for k in gone]

    def rotate(self) -> int:
        """A new KEK wraps every live key; then every older KEK file is overwritten and unlinked. Returns its id."""
        with self._lock:
            old = self._kek_ids()
            new = self._new_kek((old[-1] if old else 0) + 1)
            for _ in range(ROTATION_ATTEMPTS):
                live = self.repo.list_disk_keys(live_only=True)
                try:
                    self.repo.rewrap_disk_keys(
                        {
                            r.id: (new, self._wrap(new, r.id, Copy(r.vm_id, r.host, r.generation), self._unwrap(r)))
                            for r in live
                            if r.kek_id != new
                        }
                    )
                except (NotFound, Conflict):
                    continue  # a key changed under us (another controller process?): read again
                break
            else:
                raise StorageError(f"could not re-wrap the disk keys under KEK {new} in {ROTATION_ATTEMPTS} attempts")
            still = {r.kek_id for r in self.repo.list_disk_keys(live_only=True)}
            for kek_id in old:
                if kek_id not in still:
                    _erase(self._kek_path(kek_id))
            _erase(self._pending)
            return new


def _erase(path: Path) -> None:
    """Overwrite a small key file in place, sync it, and unlink it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            os.pwrite(fd, b"\0" * size, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()
        fsync_directory(path.parent)
    except FileNotFoundError:
        return
    except OSError as err:
        raise StorageError(f"cannot erase the retired key-encryption key {path}: {err}") from err
