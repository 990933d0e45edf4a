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
from ferryman.agent.hypervisor.qmp import QemuDriver
from ferryman.agent.migration import MigrationAgent
from ferryman.agent.reporter import Reporter
from ferryman.agent.settings import AgentSettings
from ferryman.core.clock import SystemClock
from ferryman.core.errors import FerrymanError
from ferryman.lab.guest import ensure_guest
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
    p.add_argument("--cache-dir", type=Path)
    p.add_argument(
        "--snapshots-keep",
        type=int,
        default=os.environ.get("FERRYMAN_SNAPSHOTS_KEEP", "1"),  # argparse applies ``type`` to a string default
        help="pre-migration snapshots kept per disk (default 1; 0: none kept after the migration)",
    )
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    if args.snapshots_keep < 0:
        p.error("--snapshots-keep must be 0 or more")
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
    )
    return settings, args


async def serve(settings: AgentSettings) -> None:
    guest = ensure_guest(settings.cache_dir)
    accel = (
        settings.accel if settings.accel != "auto" else detect_accel(guest, settings.cache_dir or guest.kernel.parent)
    )
    driver = QemuDriver(settings.state_dir, guest, accel)
    reattached = await driver.reattach()
    log.info("agent starting", host=settings.name, accel=accel, reattached=len(reattached))
    migrations = MigrationAgent(settings, driver, SystemClock(), snapshots_keep=settings.snapshots_keep)
    app = create_agent_app(settings, driver, migrations)
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
        if not is_enrolled(settings):
            if args.enrol_token_file is None:
                raise FerrymanError(f"{settings.name} is not enrolled: pass --enrol-token-file")
            serial = enrol(settings, args.enrol_token_file.read_text().strip())
            log.info("enrolled", host=settings.name, serial=f"{serial:x}")
        asyncio.run(serve(settings))
    except FerrymanError as err:
        print(f"ferryman-agent: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        pass
