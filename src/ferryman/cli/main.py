"""``ferryman``: hosts, VMs, events and the local lab. Every listing has ``--json``; errors are one line, exit 1.

This module only assembles the command groups of the other ``ferryman.cli`` modules into one Typer app, in the order
``--help`` lists them, and turns a :class:`CliError` into the one-line error. No command module imports this one.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from ferryman.cli.access import (
    approval_app,
    principal_app,
    role_app,
    role_policy_app,
    token_app,
    vm_baseline,
    vm_destroy_keys,
    vm_remediated,
)
from ferryman.cli.audit import audit_app
from ferryman.cli.events import alarms, events
from ferryman.cli.images import image_app
from ferryman.cli.incidents import host_compromise, incident_app, playbook_app
from ferryman.cli.inventory import host_app, site_app, vm_app
from ferryman.cli.lab import lab_app
from ferryman.cli.migrate import migration_app
from ferryman.cli.networks import network_app, vm_isolate, vm_nics, vm_unisolate
from ferryman.cli.policy import compliance_app, host_set, place, policy_app
from ferryman.client import CliError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Ferryman: move virtual machines safely.",
)


@app.callback()
def _options(
    approval: Annotated[
        int | None,
        typer.Option("--approval", help="present this approved request (two-person rule) with the command"),
    ] = None,
) -> None:
    if approval is not None:
        os.environ["FERRYMAN_APPROVAL"] = str(approval)


app.command("events")(events)
app.command("alarms")(alarms)
app.command("place")(place)
# ``host set`` lives with the policy commands: a changed host has its VMs re-checked against the policies
host_app.command("set")(host_set)
host_app.command("compromise")(host_compromise)
incident_app.add_typer(playbook_app, name="playbook")
vm_app.command("nics")(vm_nics)
vm_app.command("isolate")(vm_isolate)
vm_app.command("unisolate")(vm_unisolate)
vm_app.command("baseline")(vm_baseline)
vm_app.command("remediated")(vm_remediated)
vm_app.command("destroy-keys")(vm_destroy_keys)
app.add_typer(host_app, name="host")
app.add_typer(vm_app, name="vm")
app.add_typer(image_app, name="image")
app.add_typer(network_app, name="network")
app.add_typer(incident_app, name="incident")
app.add_typer(site_app, name="site")
app.add_typer(lab_app, name="lab")
app.add_typer(migration_app, name="migration")
app.add_typer(policy_app, name="policy")
app.add_typer(compliance_app, name="compliance")
app.add_typer(audit_app, name="audit")
role_app.add_typer(role_policy_app, name="policy")
app.add_typer(principal_app, name="principal")
app.add_typer(token_app, name="token")
app.add_typer(role_app, name="role")
app.add_typer(approval_app, name="approval")


def main() -> None:
    try:
        app(prog_name="ferryman")
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
