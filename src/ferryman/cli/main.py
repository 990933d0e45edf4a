"""``ferryman``: hosts, VMs, events and the local lab. Every listing has ``--json``; errors are one line, exit 1.

This module only assembles the command groups of the other ``ferryman.cli`` modules into one Typer app, in the order
``--help`` lists them, and turns a :class:`CliError` into the one-line error. No command module imports this one.
"""

from __future__ import annotations

import sys

import typer

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


def main() -> None:
    try:
        app(prog_name="ferryman")
    except CliError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
