"""Encrypted disk images: creating a LUKS-encrypted qcow2, the passphrase derived from a controller key, giving that
passphrase to QEMU and its tools, and recognising an encrypted image by its headers.

It exists so that every part of the agent hands disk keys to QEMU the same way: to ``qemu-img`` and ``qemu-io``
through an inherited pipe (:func:`run_qemu_tool`), to a running QEMU through QMP ``object-add``
(:func:`secret_object_qmp`), and not on a command line, which other local users can read (see
:func:`secret_object_arg`). :func:`encrypted_header_end` tells the scrubber where the region holding the image headers
and every LUKS keyslot ends: that region is what crypto-erase overwrites.

This module does not choose, store or wrap keys (the controller does), does not talk to a running QEMU, and deletes
nothing. It blocks; async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import base64
import os
import struct
import subprocess
from collections.abc import Sequence
from pathlib import Path

import structlog

from ferryman.core.errors import HypervisorError, InvalidInput

log = structlog.get_logger(__name__)

_QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_CRYPT_LUKS = 2
_QCOW2_EXT_FDE = 0x0537BE77
_QCOW2_V2_HEADER = 72
_LUKS_MAGIC = b"LUKS\xba\xbe"
_LUKS_SECTOR = 512
_LUKS_SLOTS_AT = 208
_LUKS_SLOT_BYTES = 48
_LUKS_SLOT_COUNT = 8
_LUKS_HEADER_BYTES = _LUKS_SLOTS_AT + _LUKS_SLOT_COUNT * _LUKS_SLOT_BYTES
KEY_OBJECT_ID = "sec0"
_HEADER_PROBE = 64 << 10
_QEMU_IMG_TIMEOUT = 600.0
_PBKDF_FLAKE = "Unable to get accurate CPU usage"
_PBKDF_ATTEMPTS = 8


def is_encrypted_image(path: Path) -> bool:
    """Whether ``path`` is a LUKS-encrypted qcow2 or a raw LUKS1 image, i.e. whether crypto-erase applies."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return encrypted_header_end(fd, os.fstat(fd).st_size) is not None
    finally:
        os.close(fd)


def encrypted_header_end(fd: int, size: int) -> int | None:
    """End offset of the region holding the image headers and every LUKS keyslot, or None if not encrypted."""
    head = os.pread(fd, _HEADER_PROBE, 0)
    if head.startswith(_LUKS_MAGIC):
        end = _luks_end(head, 0)
        return None if end is None else min(end, size)
    if not head.startswith(_QCOW2_MAGIC) or len(head) < _QCOW2_V2_HEADER:
        return None
    version, crypt_method = struct.unpack_from(">I", head, 4)[0], struct.unpack_from(">I", head, 32)[0]
    if crypt_method != _QCOW2_CRYPT_LUKS:
        return None
    offset = struct.unpack_from(">I", head, 100)[0] if version >= 3 else _QCOW2_V2_HEADER
    while offset + 8 <= len(head):
        kind, length = struct.unpack_from(">II", head, offset)
        if kind == 0:
            break
        if kind == _QCOW2_EXT_FDE and length >= 16:
            luks_at, luks_len = struct.unpack_from(">QQ", head, offset + 8)
            end = _luks_end(os.pread(fd, _LUKS_HEADER_BYTES, luks_at), luks_at)
            return None if end is None else min(max(end, luks_at + luks_len), size)
        offset += 8 + -(-length // 8) * 8
    return None


def _luks_end(header: bytes, at: int) -> int | None:
    """End of a LUKS1 header found at file offset ``at``: past the payload offset and every keyslot's material."""
    if not header.startswith(_LUKS_MAGIC) or len(header) < _LUKS_HEADER_BYTES:
        return None
    if struct.unpack_from(">H", header, 6)[0] != 1:
        return None
    payload_sectors, key_bytes = struct.unpack_from(">II", header, 104)
    end: int = payload_sectors * _LUKS_SECTOR
    for slot in range(_LUKS_SLOT_COUNT):
        material, stripes = struct.unpack_from(">II", header, _LUKS_SLOTS_AT + slot * _LUKS_SLOT_BYTES + 40)
        slot_end: int = material * _LUKS_SECTOR + -(-key_bytes * stripes // _LUKS_SECTOR) * _LUKS_SECTOR
        end = max(end, slot_end)
    return at + max(end, _LUKS_HEADER_BYTES)


def luks_passphrase(key: bytes) -> bytes:
    """The LUKS passphrase derived from a controller key: its base64 text (QEMU requires a UTF-8 passphrase)."""
    if len(key) < 16:
        raise InvalidInput("an image key needs at least 16 bytes")
    return base64.b64encode(key)


def secret_object_arg(secret_id: str, key: bytes) -> str:
    """The QEMU ``--object``/``-object`` value defining ``secret_id`` as the passphrase of ``key``.

    Anything on a command line is readable by local users in /proc/<pid>/cmdline: give a running QEMU the same
    properties through QMP ``object-add`` instead (:func:`secret_object_qmp`); the tools run here pass it through a
    pipe (:func:`run_qemu_tool`).
    """
    data = base64.b64encode(luks_passphrase(key)).decode()
    return f"secret,id={_check_id(secret_id)},data={data},format=base64"


def secret_object_qmp(secret_id: str, key: bytes) -> dict[str, str]:
    """The QMP ``object-add`` arguments defining ``secret_id`` as the passphrase of ``key``."""
    data = base64.b64encode(luks_passphrase(key)).decode()
    return {"qom-type": "secret", "id": _check_id(secret_id), "data": data, "format": "base64"}


def open_args_for_encrypted(path: Path, key_secret_id: str) -> list[str]:
    """``qemu-img``/``qemu-io`` arguments that open the encrypted qcow2 ``path`` with the secret ``key_secret_id``.

    The secret itself is defined separately (:func:`secret_object_arg` or :func:`run_qemu_tool`). For QEMU's
    ``-blockdev`` use the same option string with a ``node-name=`` added.
    """
    filename = str(path).replace(",", ",,")
    return [
        "--image-opts",
        f"driver=qcow2,file.driver=file,file.filename={filename},encrypt.key-secret={_check_id(key_secret_id)}",
    ]


def create_encrypted_qcow2(
    path: Path,
    size: int,
    key: bytes,
    *,
    iter_time_ms: int = 2000,
    qemu_img: str = "qemu-img",
    backing: tuple[Path, str] | None = None,
) -> None:
    """Create a LUKS-encrypted qcow2 image of ``size`` bytes whose passphrase derives from ``key``; with ``backing``
    (path, format) an overlay on that read-only image (only what the guest writes is encrypted: the base is public).

    ``iter_time_ms`` is LUKS's PBKDF2 time budget; lower it only where opening speed matters more than brute-force
    resistance of the passphrase (tests). Raises :class:`HypervisorError` if qemu-img refuses.
    """
    if size < _LUKS_SECTOR:
        raise InvalidInput(f"an image needs at least {_LUKS_SECTOR} bytes, got {size}")
    opts = encrypt_options(iter_time_ms)
    chain = ["-F", backing[1], "-b", str(backing[0])] if backing is not None else []
    run_qemu_tool([qemu_img, "create", "-q", "-f", "qcow2", "-o", opts, *chain, str(path), str(size)], key=key)


def copy_image(
    source: Path,
    source_format: str,
    path: Path,
    size: int,
    *,
    key: bytes | None = None,
    iter_time_ms: int = 2000,
    qemu_img: str = "qemu-img",
) -> None:
    """A full, independent qcow2 copy of ``source`` at ``path``, grown to ``size`` bytes (LUKS-encrypted with
    ``key``). Raises :class:`HypervisorError` if qemu-img refuses."""
    opts = ["-o", encrypt_options(iter_time_ms)] if key is not None else []
    convert = [qemu_img, "convert", "-q", "-f", source_format, "-O", "qcow2", *opts, str(source), str(path)]
    run_qemu_tool(convert, key=key)
    if key is None:
        run_qemu_tool([qemu_img, "resize", "-q", "-f", "qcow2", str(path), str(size)])
        return
    target = f"driver=qcow2,file.filename={path},encrypt.key-secret={KEY_OBJECT_ID}"
    run_qemu_tool([qemu_img, "resize", "-q", "--image-opts", target, str(size)], key=key)


def encrypt_options(iter_time_ms: int) -> str:
    """The ``qemu-img -o`` options that make a new qcow2 LUKS-encrypted under the secret :data:`KEY_OBJECT_ID`
    (``iter_time_ms`` as in :func:`create_encrypted_qcow2`)."""
    return f"encrypt.format=luks,encrypt.key-secret={KEY_OBJECT_ID},encrypt.iter-time={int(iter_time_ms)}"


def run_qemu_tool(
    argv: Sequence[str], *, key: bytes | None = None, secret_id: str = KEY_OBJECT_ID, timeout: float = _QEMU_IMG_TIMEOUT
) -> str:
    """Run ``qemu-img``/``qemu-io`` with ``secret_id`` defined from ``key`` (if given); returns stdout.

    The passphrase goes through an inherited pipe (``--object secret,...,file=/dev/fd/N`` appended to ``argv``),
    never on the command line. QEMU times PBKDF2 with the thread's CPU clock when it creates a LUKS header and gives up
    when that clock is too coarse to measure ("Unable to get accurate CPU usage"), so that one failure is retried a
    bounded number of times. Raises :class:`HypervisorError` with the tool's message on failure or timeout.
    """
    for attempt in range(1, _PBKDF_ATTEMPTS + 1):
        done = _run_once(argv, key, secret_id, timeout)
        if done.returncode == 0:
            return done.stdout
        stderr = done.stderr.strip()
        if _PBKDF_FLAKE not in stderr or attempt == _PBKDF_ATTEMPTS:
            raise HypervisorError(f"{argv[0]} {argv[1]} failed: {stderr}")
        log.debug("qemu PBKDF2 benchmark could not time itself; retrying", attempt=attempt)
    raise AssertionError("unreachable")


def _run_once(
    argv: Sequence[str], key: bytes | None, secret_id: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    args = list(argv)
    read_fd: int | None = None
    if key is not None:
        read_fd, write_fd = os.pipe()
        try:
            os.write(write_fd, luks_passphrase(key))
        finally:
            os.close(write_fd)
        args += ["--object", f"secret,id={_check_id(secret_id)},file=/dev/fd/{read_fd},format=raw"]
    try:
        return subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            pass_fds=() if read_fd is None else (read_fd,),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise HypervisorError(f"{args[0]} {args[1]} failed: {err}") from err
    finally:
        if read_fd is not None:
            os.close(read_fd)


def _check_id(value: str) -> str:
    if not value.replace("-", "").replace("_", "").isalnum() or not value[:1].isalpha():
        raise InvalidInput(f"bad QEMU object id {value!r}: letters, digits, - and _, starting with a letter")
    return value
