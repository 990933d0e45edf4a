"""The CLI's shared pieces: ``--profile`` parsing and the client factory's configuration errors."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from ferryman.cli.context import api, parse_profile, vm_path
from ferryman.client import Api, CliConfig, CliError


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


def test_a_vm_named_tenant_slash_name_keeps_its_tenant_on_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tenant travels in the query of reads (whose own parameters are merged with it), of actions and of a
    delete; what the controller is asked for is the name in that tenant, never the name alone."""
    from ferryman.cli import inventory, networks

    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.raw_path.decode()}")
        if request.url.path.endswith("/nics"):
            return httpx.Response(200, json=[])
        if request.method == "GET" and request.url.path.endswith("/history"):
            return httpx.Response(200, json=[])
        vm = {"name": "web", "state": "stopped", "host": "h1"}
        return httpx.Response(200, json=vm)

    client = Api.__new__(Api)
    client.config = CliConfig("https://controller", Path("/nonexistent"), "token")
    client._client = httpx.Client(base_url="https://controller", transport=httpx.MockTransport(answer))
    monkeypatch.setattr(inventory, "api", lambda: client)
    monkeypatch.setattr(networks, "api", lambda: client)
    inventory.vm_show("globex/web", json_=True)
    inventory.vm_history("globex/web", json_=True)
    networks.vm_nics("globex/web", live=True, json_=True)
    inventory.vm_stop("globex/web")
    assert seen == [
        "GET /api/v1/vms/web?tenant=globex",
        "GET /api/v1/vms/web/history?tenant=globex",
        "GET /api/v1/vms/web/nics?tenant=globex&live=true",
        "POST /api/v1/vms/web/stop?tenant=globex",
    ]
    for bad in ("..", "globex/..", "./web"):
        with pytest.raises(CliError, match="bad VM"):
            vm_path(bad)
