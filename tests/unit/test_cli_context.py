"""The CLI's shared pieces: ``--profile`` parsing and the client factory's configuration errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferryman.cli.context import api, parse_profile, vm_path
from ferryman.client import CliError


def test_parse_profile_maps_keys_to_values():
    """Each key=value becomes one label; the value may itself contain '='."""
    assert parse_profile(["environment=production", "tier=web", "note=a=b"]) == {
        "environment": "production",
        "tier": "web",
        "note": "a=b",
    }


def test_parse_profile_later_key_wins():
    """A key given twice keeps the last value."""
    assert parse_profile(["tier=web", "tier=db"]) == {"tier": "db"}


def test_parse_profile_empty():
    """No --profile is an empty profile."""
    assert parse_profile([]) == {}


@pytest.mark.parametrize("item", ["production", "=production", "environment=", "="])
def test_parse_profile_rejects_malformed_item(item: str):
    """An item without a key, a value or the '=' is a one-line error that shows the expected form."""
    with pytest.raises(CliError, match=r"bad --profile .*use key=value"):
        parse_profile([item])


def test_api_without_configuration_is_a_cli_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """With neither environment nor config file, building the client says how to configure one."""
    for name in ("FERRYMAN_CONFIG", "FERRYMAN_URL", "FERRYMAN_CA", "FERRYMAN_TOKEN", "FERRYMAN_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FERRYMAN_LAB_DIR", str(tmp_path))
    with pytest.raises(CliError, match="no controller configured"):
        api()


def test_vm_path_names_a_vm_by_id_name_or_tenant_slash_name():
    """``tenant/name`` becomes the name in the path and the tenant as a query; anything else stays one path
    segment, so a name can never reach another route."""
    assert vm_path("web") == "/api/v1/vms/web"
    assert vm_path("acme/web", "/stop") == "/api/v1/vms/web/stop?tenant=acme"
    assert vm_path("web?x=1", "/history") == "/api/v1/vms/web%3Fx%3D1/history"
    for bad in ("acme/", "/web", "a/b/c", ""):
        with pytest.raises(CliError, match="tenant/name"):
            vm_path(bad)
