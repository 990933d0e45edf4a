"""Parsing of human sizes (``64M``, ``1G``, ``256``) into bytes or MiB."""

from __future__ import annotations

import re

from ferryman.core.errors import InvalidInput

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_FACTORS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int, *, default_unit: str = "") -> int:
    """Return the number of bytes in ``text`` (``64M`` → 67108864). A bare number uses ``default_unit``."""
    if isinstance(text, int):
        text = str(text)
    match = _SIZE.match(text)
    if match is None:
        raise InvalidInput(f"bad size {text!r}: use a whole number with an optional K, M, G or T suffix (e.g. 64M)")
    number, unit = int(match.group(1)), (match.group(2) or default_unit).upper()
    size = number * _FACTORS[unit]
    if size <= 0:
        raise InvalidInput(f"bad size {text!r}: must be greater than zero")
    return size


def parse_mib(text: str | int) -> int:
    """Return a size in whole MiB; a bare number is MiB already (``--memory 256``)."""
    size = parse_size(text, default_unit="M")
    if size % (1 << 20):
        raise InvalidInput(f"bad size {text!r}: must be a whole number of MiB")
    return size >> 20


def format_bytes(size: int) -> str:
    """A size for people: ``1.5 GiB``, ``64.0 MiB``, ``512 B``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
