"""Files that survive a crash or a power cut: an atomic replacement of a small file, and the directory sync that makes
a rename or an unlink durable.

It exists so that every part of Ferryman that keeps state in files (keys, certificates, nonces, migration contexts,
snapshots, scrubbed artefacts) gets these steps right in one place: the data is synced before the rename, and the
directory after it. It uses plain ``os`` calls only, raises ``OSError`` as it comes (callers wrap it into their own
error at their boundary), and knows nothing of what the files hold.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one.

    The temporary file is created with ``mode`` from the start (never world-readable, not even for an instant), synced,
    renamed over ``path``, and the directory is synced so the rename survives a power cut. On an error the temporary
    file is removed and the ``OSError`` raised.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(fd, mode)  # the umask may have removed bits we asked for
            handle.write(data)
            handle.flush()
            os.fsync(fd)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def fsync_directory(directory: Path) -> None:
    """Sync ``directory`` itself, so that a file created, renamed or unlinked in it stays so after a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
