"""``ferryman lab up|status|down``: the local multi-host lab."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from ferryman.cli.inventory import host_list, vm_list
from ferryman.cli.output import emit_json, fields, table
from ferryman.client import default_lab_dir

if TYPE_CHECKING:
    from ferryman.lab.lab import Lab

lab_app = typer.Typer(no_args_is_help=True, help="The local lab: a controller, host agents and VMs on this machine.")


def _lab() -> Lab:
    from ferryman.lab.lab import Lab, default_say

    return Lab(default_lab_dir(), default_say)


@lab_app.command("up")
def up(
    hosts: Annotated[int, typer.Option(help="number of hosts")] = 3,
    vms: Annotated[int, typer.Option(help="number of VMs to boot")] = 4,
    port: Annotated[int, typer.Option(help="controller port on 127.0.0.1")] = 8443,
    agent_port: Annotated[int, typer.Option("--agent-port", help="agent port on 127.0.0.2…")] = 8444,
) -> None:
    """Start a controller and N hosts on loopback, enrol them, boot VMs, show the fleet."""
    lab = _lab()
    lab.up(hosts=hosts, vms=vms, port=port, agent_port=agent_port)
    print()
    host_list(json_=False)
    vm_list(tenant=None, host=None, json_=False)
    print(f"\nthe lab is up (state in {lab.dir}); try: ferryman vm show web-1 · ferryman lab down")


@lab_app.command("status")
def status(json_: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Which lab processes run."""
    info = _lab().status()
    if json_:
        return emit_json(info)
    fields(
        [
            ("lab", info["lab_dir"]),
            ("up", info["up"]),
            ("controller", info.get("controller_url")),
            ("accel", info.get("accel")),
            ("QEMU processes", info["qemu_processes"]),
        ]
    )
    if info["processes"]:
        table(None, ["PROCESS", "RUNNING"], [[k, "yes" if v else "NO"] for k, v in info["processes"].items()])


@lab_app.command("down")
def down() -> None:
    """Stop every lab process (agents, QEMU, controller) and remove the lab's state."""
    _lab().down()
    print("the lab is down")
