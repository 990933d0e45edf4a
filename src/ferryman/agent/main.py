"""``ferryman-agent``: enrol if needed, re-attach to running VMs, serve the controller over mTLS, report inventory."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path

import structlog

from ferryman.agent.app import create_agent_app
from ferryman.agent.enrol import enrol, is_enrolled
from ferryman.agent.hypervisor.accel import detect_accel
from ferryman.agent.hypervisor.boot import BootImage
from ferryman.agent.hypervisor.qmp import QemuDriver
from ferryman.agent.migration import MigrationAgent
from ferryman.agent.network.host import HostNetwork
from ferryman.agent.probes import GuestProbe, load_probe
from ferryman.agent.reporter import Reporter
from ferryman.agent.settings import AgentSettings
from ferryman.core.bootparams import BOOT_PARAMETERS, DEFAULT_CMDLINE
from ferryman.core.clock import SystemClock
from ferryman.core.errors import FerrymanError, InvalidInput
from ferryman.logs import configure_logging
from ferryman.security.asgi_tls import make_server

log = structlog.get_logger(__name__)


def parse_args(argv: list[str] | None) -> tuple[AgentSettings, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="ferryman-agent", description="Run the Ferryman agent of one hypervisor host.")
    p.add_argument("--name", required=True, help="host name, as registered at the controller")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--listen", default="127.0.0.2:8444", help="address:port to serve the controller on")
    p.add_argument("--controller", default="https://127.0.0.1:8443")
    p.add_argument("--controller-ca", type=Path, required=True, help="the controller's CA certificate (pinned)")
    p.add_argument("--enrol-token-file", type=Path, help="one-time enrolment token (needed on first start only)")
    p.add_argument("--accel", choices=["auto", "kvm", "tcg"], default=os.environ.get("FERRYMAN_ACCEL", "auto"))
    p.add_argument("--report-interval", type=float, default=2.0)
    p.add_argument("--cache-dir", type=Path, help="where the accelerator verdict is cached (default: by the kernel)")
    p.add_argument(
        "--snapshots-keep",
        type=int,
        default=os.environ.get("FERRYMAN_SNAPSHOTS_KEEP", "1"),  # argparse applies ``type`` to a string default
        help="pre-migration snapshots kept per disk (default 1; 0: none kept after the migration)",
    )
    _boot_options(p)
    p.add_argument(
        "--guest-probe",
        action="append",
        dest="guest_probes",
        metavar="MODULE:FACTORY",
        help="one more check that a migrated guest runs here, beside its run state and vCPU progress (repeatable;"
        " default: FERRYMAN_GUEST_PROBES, comma-separated)",
    )
    p.add_argument("--netns", help="network namespace holding this host's bridges, taps and NIC rules")
    p.add_argument("--underlay-ip", help="this host's overlay endpoint address (VXLAN); without it VMs get no NICs")
    p.add_argument("--underlay-dev", default="ul0", help="the device that carries --underlay-ip (default ul0)")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    if args.snapshots_keep < 0:
        p.error("--snapshots-keep must be 0 or more")
    boot = _boot_image(p, args)
    probes = args.guest_probes if args.guest_probes is not None else _env_list("FERRYMAN_GUEST_PROBES")
    host, _, port = args.listen.rpartition(":")
    settings = AgentSettings(
        name=args.name,
        state_dir=args.state_dir,
        listen_host=host,
        listen_port=int(port),
        controller_url=args.controller.rstrip("/"),
        controller_ca=args.controller_ca,
        accel=args.accel,
        report_interval_s=args.report_interval,
        cache_dir=args.cache_dir,
        snapshots_keep=args.snapshots_keep,
        boot=boot,
        guest_probes=tuple(probes),
        netns=args.netns,
        underlay_ip=args.underlay_ip,
        underlay_dev=args.underlay_dev,
    )
    return settings, args


def _boot_options(p: argparse.ArgumentParser) -> None:
    """How this host boots guests: ``--boot-*``, each defaulting to its ``FERRYMAN_BOOT_*`` variable."""
    boot = p.add_argument_group(
        "guest boot image", "how this host boots its guests, handed over by whoever deploys the agent (e.g. the lab)"
    )
    env = os.environ.get
    boot.add_argument("--boot-kernel", type=Path, default=env("FERRYMAN_BOOT_KERNEL"), metavar="PATH", help="kernel")
    boot.add_argument("--boot-initrd", type=Path, default=env("FERRYMAN_BOOT_INITRD"), metavar="PATH", help="initrd")
    boot.add_argument(
        "--boot-cmdline",
        default=env("FERRYMAN_BOOT_CMDLINE", DEFAULT_CMDLINE),
        metavar="TEMPLATE",
        help=f"the kernel command line, where {', '.join(f'${{{name}}}' for name in BOOT_PARAMETERS)} stand for each"
        f" VM's values (default {DEFAULT_CMDLINE!r})",
    )
    boot.add_argument(
        "--boot-ready-marker",
        default=env("FERRYMAN_BOOT_READY_MARKER") or None,
        metavar="TEXT",
        help="what the guest prints on its serial console once booted (needed to prove that KVM boots it)",
    )


def _boot_image(p: argparse.ArgumentParser, args: argparse.Namespace) -> BootImage | None:
    if (args.boot_kernel is None) != (args.boot_initrd is None):
        p.error("--boot-kernel and --boot-initrd go together")
    if args.boot_kernel is None:
        return None
    try:
        return BootImage(
            kernel=args.boot_kernel.absolute(),
            initrd=args.boot_initrd.absolute(),
            cmdline=args.boot_cmdline,
            ready_marker=args.boot_ready_marker,
        )
    except InvalidInput as err:
        p.error(str(err))


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def load_boot_and_probes(settings: AgentSettings) -> tuple[BootImage, list[GuestProbe]]:
    """The boot image (its files must exist) and the extra guest probes; FerrymanError if either is unusable."""
    boot = settings.boot
    if boot is None:
        raise FerrymanError("no guest boot image: pass --boot-kernel and --boot-initrd (or FERRYMAN_BOOT_*)")
    missing = [str(path) for path in (boot.kernel, boot.initrd) if not path.is_file()]
    if missing:
        raise FerrymanError(f"the guest boot image is incomplete: no file {', '.join(missing)}")
    return boot, [load_probe(ref) for ref in settings.guest_probes]


async def serve(settings: AgentSettings, boot: BootImage, probes: list[GuestProbe]) -> None:
    accel = settings.accel if settings.accel != "auto" else detect_accel(boot, settings.cache_dir or boot.kernel.parent)
    network = (
        HostNetwork(settings.netns, settings.underlay_ip, settings.underlay_dev)
        if settings.underlay_ip is not None or settings.netns is not None
        else None
    )
    driver = QemuDriver(settings.state_dir, boot, accel, network=network)
    reattached = await driver.reattach()
    log.info("agent starting", host=settings.name, accel=accel, reattached=len(reattached), probes=len(probes))
    migrations = MigrationAgent(settings, driver, SystemClock(), snapshots_keep=settings.snapshots_keep, probes=probes)
    app = create_agent_app(settings, driver, migrations, driver.images)
    server = make_server(
        app,
        host=settings.listen_host,
        port=settings.listen_port,
        cert=settings.cert,
        key=settings.key,
        ca=settings.ca,
        client_cert="required",
    )
    serving = asyncio.create_task(server.serve())
    # report only once the controller can reach us: a report makes the host look "up"
    while not server.started and not serving.done():  # noqa: ASYNC110 - uvicorn offers only a flag
        await asyncio.sleep(0.05)
    reporting = asyncio.create_task(Reporter(settings, driver).run()) if server.started else None
    try:
        await serving
    finally:
        if reporting is not None:
            reporting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporting


def main(argv: list[str] | None = None) -> None:
    settings, args = parse_args(argv)
    configure_logging(args.log_level)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        boot, probes = load_boot_and_probes(settings)  # first: an agent that cannot boot guests spends no token
        if not is_enrolled(settings):
            if args.enrol_token_file is None:
                raise FerrymanError(f"{settings.name} is not enrolled: pass --enrol-token-file")
            serial = enrol(settings, args.enrol_token_file.read_text().strip())
            log.info("enrolled", host=settings.name, serial=f"{serial:x}")
        asyncio.run(serve(settings, boot, probes))
    except FerrymanError as err:
        print(f"ferryman-agent: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        pass
