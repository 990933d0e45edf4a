"""What every ``ferryman`` command shares: the API client of the configured controller and option value parsing.

Command modules import this one and never each other's command modules for these pieces, so the command modules stay
free of import cycles and ``main`` only assembles them. Nothing here talks to the controller by itself: ``api()``
builds a client from the configuration, the first request connects.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote, urlencode

import typer

from ferryman.client import Api, CliConfig, CliError

Json = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


def api() -> Api:
    """A client for the controller named by the environment or the config file (see :class:`CliConfig`)."""
    return Api(CliConfig.load())


def vm_path(ref: str, rest: str = "") -> str:
    """The API path of the VM ``ref`` names: its id, its name (in the caller's tenant, or the one live VM of that
    name), or ``tenant/name`` (what an operator writes when several tenants have a VM of that name); ``rest`` is the
    sub-resource (``/stop``)."""
    tenant, sep, name = ref.rpartition("/")
    if not name or (sep and not tenant) or "/" in tenant or {name, tenant} & {".", ".."}:
        raise CliError(f"bad VM {ref!r}: name it by its id, its name or tenant/name")
    path = f"/api/v1/vms/{segment(name)}{rest}"
    return f"{path}?{urlencode({'tenant': tenant})}" if sep else path


def segment(name: str) -> str:
    """``name`` as one path segment of an API URL: quoted, and never one that moves up or stays (``.``, ``..``)."""
    if name in ("", ".", ".."):
        raise CliError(f"bad name {name!r}")
    return quote(name, safe="")


def parse_profile(items: list[str]) -> dict[str, str]:
    """``--profile key=value`` options as a mapping; a later key wins. A malformed item is a CliError."""
    profile = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise CliError(f"bad --profile {item!r}: use key=value, e.g. environment=production")
        profile[key] = value
    return profile
