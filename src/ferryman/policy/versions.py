"""Hypervisor and image versions as ordered values, so a floor of "7.2.0" admits "7.10.0" (string order would not).

Why it exists: policies set minimum hypervisor versions and minimum image versions (an image's registry version,
such as "12.8", is read the same way), and hosts report versions in two shapes, upstream
("7.10.0") and Debian packages ("1:7.2+dfsg-7+deb12u6": epoch, upstream version, revision). Both are ordered with
the dpkg algorithm: the epoch numerically, then the upstream version, then the revision, each compared as
alternating runs of non-digits (lexically, ``~`` before anything, even the end of the string, letters before other
characters) and digits (numerically). A plain "7.2.0" is epoch 0 with no revision.

What it must not do: guess. A string that is not a version raises :class:`VersionError` (an
:class:`~ferryman.core.errors.InvalidInput`); callers that read host or image facts decide what an unparseable version
means (the engine treats it as below every floor).
"""

from __future__ import annotations

import functools
import re

from ferryman.core.errors import InvalidInput

_ALLOWED = re.compile(r"[A-Za-z0-9.+~:-]+")
_RUNS = re.compile(r"([^0-9]*)([0-9]*)")

_Part = tuple[tuple[int, ...], int]
_END: _Part = ((0,), 0)  # what a string that has ended contributes: no characters, number 0


class VersionError(InvalidInput):
    """The text is not a version."""


def _char_weight(char: str) -> int:
    if char == "~":
        return -1
    if char.isalpha():
        return ord(char)
    return ord(char) + 256


def _key(text: str) -> tuple[_Part, ...]:
    """dpkg's verrevcmp as a sort key: (non-digit run weights + terminator, number) pairs, then an end marker."""
    parts: list[_Part] = []
    for match in _RUNS.finditer(text):
        letters, digits = match.group(1), match.group(2)
        if not letters and not digits:
            continue
        parts.append(((*(_char_weight(c) for c in letters), 0), int(digits) if digits else 0))
    while parts and parts[-1] == _END:  # "0" and "" are the same revision, as in dpkg
        parts.pop()
    parts.append(_END)
    return tuple(parts)


@functools.total_ordering
class Version:
    """A parsed version; compare, hash and sort it like a number. ``str()`` gives back the text."""

    __slots__ = ("_key", "epoch", "revision", "text", "upstream")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise VersionError(f"a version must be a string, got {type(text).__name__} {text!r}")
        stripped = text.strip()
        if not stripped or not _ALLOWED.fullmatch(stripped):
            raise VersionError(
                f"{text!r} is not a version: use digits, letters and . + ~ - : (like 7.2.0 or 1:7.2+dfsg-7+deb12u6)"
            )
        epoch_text, colon, rest = stripped.partition(":")
        if not colon:
            epoch_text, rest = "0", stripped
        if not epoch_text.isdigit() or not epoch_text.isascii():
            raise VersionError(f"{text!r} is not a version: the epoch before ':' must be a whole number")
        upstream, dash, revision = rest.rpartition("-")
        if not dash:
            upstream, revision = rest, ""
        if not upstream or not upstream[0].isdigit() or (dash and not revision):
            raise VersionError(f"{text!r} is not a version: the upstream part must start with a digit")
        if ":" in upstream or ":" in revision:
            raise VersionError(f"{text!r} is not a version: only one epoch ':' is allowed")
        self.text = stripped
        self.epoch = int(epoch_text)
        self.upstream = upstream
        self.revision = revision
        self._key = (self.epoch, _key(upstream), _key(revision))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key == other._key

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key < other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Version({self.text!r})"

    def __str__(self) -> str:
        return self.text


def parse_version(text: str) -> Version:
    """Parse ``text`` or raise :class:`VersionError`."""
    return Version(text)


def version_or_none(text: str) -> Version | None:
    """Parse ``text``; None when it is not a version (a host reporting garbage)."""
    try:
        return Version(text)
    except VersionError:
        return None
