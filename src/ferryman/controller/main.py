"""``ferryman-controller``: bootstrap (CA, controller certificate, first admin token) and serve the API over TLS."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import structlog
from fastapi import FastAPI

from ferryman.cmdb.access import PrincipalRecord
from ferryman.cmdb.event_sql import SqlAuditLog
from ferryman.cmdb.impact_sql import SqlImpact
from ferryman.cmdb.sql import open_repository
from ferryman.controller.agent_client import HttpAgentClient
from ferryman.controller.app import create_app
from ferryman.controller.audit import AuditService
from ferryman.controller.compliance import Compliance
from ferryman.controller.evidence import EvidenceStore
from ferryman.controller.fleet import Fleet, certificate_revoked
from ferryman.controller.images import ImageService
from ferryman.controller.incidents import IncidentService
from ferryman.controller.keys import DiskKeys
from ferryman.controller.migrations import MigrationService
from ferryman.controller.networks import NetworkService
from ferryman.controller.playbooks import PlaybookRunner
from ferryman.controller.reconcile import Reconciler
from ferryman.controller.settings import ControllerSettings
from ferryman.controller.stale import StaleCopies
from ferryman.core.clock import Clock, SystemClock
from ferryman.core.errors import FerrymanError
from ferryman.images.store import BlobStore
from ferryman.incidents.limits import AlertGate
from ferryman.logs import configure_logging
from ferryman.pki.ca import CertificateAuthority
from ferryman.pki.csr import write_private_key
from ferryman.security.asgi_tls import make_server
from ferryman.security.secrets import make_api_token

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ControllerFiles:
    ca: Path
    cert: Path
    key: Path


def ensure_controller_identity(settings: ControllerSettings, ca: CertificateAuthority) -> ControllerFiles:
    """The controller's own certificate, issued by its CA on first start."""
    files = ControllerFiles(
        ca=settings.pki_dir / "ca.pem",
        cert=settings.pki_dir / "controller.pem",
        key=settings.pki_dir / "controller.key",
    )
    if not (files.cert.exists() and files.key.exists()):
        key_pem, issued = ca.issue_controller_certificate(settings.name, [settings.bind_host])
        write_private_key(files.key, key_pem)
        files.cert.write_bytes(issued.pem)
    return files


def ensure_admin_token(settings: ControllerSettings, fleet: Fleet, clock: Clock) -> None:
    """On first start only: create the bootstrap admin token and write it to a 0600 file."""
    if fleet.repo.get_setting("bootstrap_admin_token") is not None:
        return
    token, token_id, secret_hash = make_api_token()
    fleet.repo.add_api_token(token_id, "admin", "fleet-admin", secret_hash, clock.now())
    if not any(p.name == "admin" for p in fleet.repo.list_principals()):
        fleet.repo.add_principal(PrincipalRecord("admin", "fleet-admin", None, clock.now(), "system"))
    fd = os.open(settings.admin_token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    fleet.repo.put_setting("bootstrap_admin_token", token_id)
    fleet.audit("token.bootstrap", f"bootstrap admin token written to {settings.admin_token_file}", "system")


def build(settings: ControllerSettings, clock: Clock | None = None) -> tuple[FastAPI, Fleet, ControllerFiles]:
    clock = clock or SystemClock()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.data_dir.chmod(0o700)
    repo = open_repository(settings.db_url)
    ca = CertificateAuthority.load_or_create(settings.pki_dir, clock)
    files = ensure_controller_identity(settings, ca)
    reconciler = Reconciler(repo, clock, settings.reconcile.stale_after_s)
    agents = HttpAgentClient(
        ca=files.ca,
        cert=files.cert,
        key=files.key,
        clock=clock,
        timeout_s=settings.agent_timeout_s,
        is_revoked=functools.partial(certificate_revoked, repo),
    )
    keys = DiskKeys(repo, settings.keys_dir, clock)
    fleet = Fleet(repo, agents, ca, clock, reconciler, settings.enrol_token_ttl_s, keys)
    reconciler.subscribe(StaleCopies(fleet).schedule)
    compliance = Compliance(fleet, settings.governor)
    fleet.admission = compliance
    fleet.watch(compliance.on_change)
    ensure_admin_token(settings, fleet, clock)
    audit_log = AuditService(SqlAuditLog(repo.engine), ca, clock, record=fleet.audit)

    async def reconcile_forever() -> None:
        loop = asyncio.get_running_loop()
        next_audit = loop.time() + settings.reconcile.compliance_interval_s
        while True:
            await asyncio.sleep(settings.reconcile.interval_s)
            try:
                reconciler.run()
                if loop.time() >= next_audit:  # the periodic full compliance audit, off the event loop
                    next_audit = loop.time() + settings.reconcile.compliance_interval_s
                    await asyncio.to_thread(compliance.audit_all)
                await asyncio.to_thread(audit_log.maybe_checkpoint)  # a signed checkpoint of the audit chain
            except FerrymanError as err:
                log.error("reconciliation pass failed", error=str(err))

    migrations = MigrationService(fleet, agents, settings.governor, settings.scrub_mode)
    images = ImageService(fleet, BlobStore(settings.images_dir))
    fleet.images = images
    fleet.default_image = settings.default_image
    networks = NetworkService(repo, fleet.audit, clock.now)
    fleet.networks = networks
    incidents = IncidentService(
        fleet,
        EvidenceStore(settings.data_dir / "evidence", ca),
        AlertGate(
            settings.alert_limits["per_vm_rate"],
            settings.alert_limits["per_vm_burst"],
            settings.alert_limits["global_rate"],
            settings.alert_limits["global_burst"],
            clock,
        ),
        SqlImpact(repo.engine),
    )
    playbooks = PlaybookRunner(incidents, migrations, networks)
    incidents.on_opened = playbooks.notify
    app = create_app(
        fleet,
        migrations=migrations,
        background=reconcile_forever,
        compliance=compliance,
        images=images,
        networks=networks,
        incidents=incidents,
        playbooks=playbooks,
        audit=audit_log,
    )
    return app, fleet, files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ferryman-controller", description="Run the Ferryman controller.")
    parser.add_argument("--data-dir", type=Path, help="state directory (CA, CMDB, admin token)")
    parser.add_argument("--bind", help="address:port to serve on (default 127.0.0.1:8443)")
    parser.add_argument("--db-url", help="SQLAlchemy URL of the CMDB (default: SQLite in the data directory)")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-json", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(args.log_level, json=args.log_json)
    settings = ControllerSettings.load(args.data_dir, args.bind, args.db_url)
    try:
        app, _, files = build(settings)
    except FerrymanError as err:
        print(f"ferryman-controller: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    server = make_server(
        app,
        host=settings.bind_host,
        port=settings.bind_port,
        cert=files.cert,
        key=files.key,
        ca=files.ca,
        client_cert="optional",
    )
    log.info("controller serving", url=settings.url, data_dir=str(settings.data_dir))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
