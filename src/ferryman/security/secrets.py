"""Random secrets and their stored hashes: API tokens for people and tools, one-time host enrolment tokens.

Only hashes are stored. The secrets are 256 random bits, so a plain SHA-256 is enough (no password hashing: there is
nothing to brute-force), and comparison is constant-time. An API token reads ``fm_<id>_<secret>``: the id is public and
selects the stored hash, the secret proves possession.

What it must not do: log, echo or store a secret, or say in an error message how a presented token was malformed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from ferryman.core.errors import Unauthenticated

SECRET_BYTES = 32
_PREFIX = "fm"
_ID_BYTES = 8
_TOKEN = re.compile(rf"^{_PREFIX}_([0-9a-f]{{{2 * _ID_BYTES}}})_([A-Za-z0-9_-]{{43,128}})$")


def new_secret() -> str:
    """A URL-safe secret of 32 random bytes (43 characters)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def hash_secret(secret: str) -> str:
    """The SHA-256 hex digest to store in place of ``secret``."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def secret_matches(secret: str, stored_hash: str) -> bool:
    """Whether ``secret`` hashes to ``stored_hash``, compared in constant time."""
    return hmac.compare_digest(hash_secret(secret).encode("ascii"), stored_hash.encode("utf-8"))


def make_api_token() -> tuple[str, str, str]:
    """A new API token: ``(token, id, hash)``. Show the token once; store the id and the hash."""
    token_id = secrets.token_hex(_ID_BYTES)
    secret = new_secret()
    return f"{_PREFIX}_{token_id}_{secret}", token_id, hash_secret(secret)


def split_api_token(token: str) -> tuple[str, str]:
    """``(id, secret)`` of an API token; :class:`Unauthenticated` if it is not one of ours."""
    match = _TOKEN.fullmatch(token)
    if match is None:
        raise Unauthenticated("malformed API token")
    return match.group(1), match.group(2)
