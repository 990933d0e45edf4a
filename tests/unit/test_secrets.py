"""API tokens and one-time secrets: only hashes are stored; malformed tokens are refused without echoing them."""

from __future__ import annotations

import pytest

from ferryman.core.errors import Unauthenticated
from ferryman.security.secrets import hash_secret, make_api_token, new_secret, secret_matches, split_api_token


def test_api_token_round_trip():
    """A token splits into its id and a secret that matches the stored hash; the hash is not the secret."""
    token, token_id, stored = make_api_token()
    got_id, secret = split_api_token(token)
    assert got_id == token_id
    assert secret_matches(secret, stored)
    assert secret not in stored and token not in stored


def test_wrong_secret_does_not_match():
    """Another token's secret does not match this token's hash."""
    _, _, stored = make_api_token()
    other, _, _ = make_api_token()
    assert not secret_matches(split_api_token(other)[1], stored)


@pytest.mark.parametrize("token", ["", "fm_", "fm_abc", "xx_abc_def", "fm__secret", "fm_abc_"])
def test_malformed_tokens_are_refused_without_echo(token):
    """Malformed tokens raise Unauthenticated whose message does not repeat the token."""
    with pytest.raises(Unauthenticated) as info:
        split_api_token(token)
    if token:
        assert token not in str(info.value) or token == "fm_"


def test_secrets_are_random_and_hashes_stable():
    """Two secrets differ; hashing is deterministic."""
    a, b = new_secret(), new_secret()
    assert a != b and len(a) >= 43
    assert hash_secret(a) == hash_secret(a) != hash_secret(b)
