"""Credentials and settings on SQL: :class:`SqlCredentialMixin` implements
:class:`~ferryman.cmdb.repository.CredentialRepository` for :class:`~ferryman.cmdb.sql.SqlRepository`.

Only hashes of token secrets are stored. Revocation (of API tokens and host certificates) is written once: revoking
again keeps the first time. An enrolment token is consumed by one guarded update, so two enrolments with the same
token cannot both succeed. Nothing here hashes a secret or decides what revocation means: the callers do.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import sqlalchemy as sa

from ferryman.cmdb.repository import ApiToken, HostCertificate
from ferryman.cmdb.schema import api_tokens, certificates, enrol_tokens, settings
from ferryman.cmdb.sql_base import SqlBase, from_row, insert_for, require_host
from ferryman.cmdb.values import as_json as _json
from ferryman.cmdb.values import utc as _utc
from ferryman.core.errors import Conflict, NotFound


def _token(row: sa.Row[Any]) -> ApiToken:
    return from_row(ApiToken, row)


def _certificate(row: sa.Row[Any]) -> HostCertificate:
    return from_row(HostCertificate, row)


class SqlCredentialMixin(SqlBase):
    """:class:`~ferryman.cmdb.repository.CredentialRepository` for :class:`~ferryman.cmdb.sql.SqlRepository`."""

    def add_api_token(self, token_id: str, name: str, role: str, secret_hash: str, at: dt.datetime) -> ApiToken:
        """Store a token; only the hash of its secret is kept."""
        token = ApiToken(id=token_id, name=name, role=role, created_at=_utc(at))
        with self._write() as conn:
            if conn.scalar(sa.select(api_tokens.c.id).where(api_tokens.c.id == token_id)) is not None:
                raise Conflict(f"API token {token_id!r} already exists")
            conn.execute(sa.insert(api_tokens).values(**dataclasses.asdict(token), secret_hash=secret_hash))
        return token

    def find_api_token(self, token_id: str) -> tuple[ApiToken, str] | None:
        """The token and its secret hash, revoked or not (the caller decides what revocation means)."""
        with self._read() as conn:
            row = conn.execute(sa.select(api_tokens).where(api_tokens.c.id == token_id)).first()
        return None if row is None else (_token(row), row.secret_hash)

    def list_api_tokens(self) -> list[ApiToken]:
        with self._read() as conn:
            return [_token(r) for r in conn.execute(sa.select(api_tokens).order_by(api_tokens.c.created_at))]

    def revoke_api_token(self, token_id: str, at: dt.datetime) -> ApiToken:
        """Revoke the token at ``at``; revoking again keeps the first revocation time."""
        return _token(self._revoke(api_tokens, api_tokens.c.id == token_id, at, f"API token {token_id!r}"))

    def add_enrol_token(self, host: str, secret_hash: str, expires_at: dt.datetime) -> None:
        expires_at = _utc(expires_at, "expires_at")
        with self._write() as conn:
            require_host(conn, host)
            conn.execute(sa.insert(enrol_tokens).values(host=host, secret_hash=secret_hash, expires_at=expires_at))

    def consume_enrol_token(self, host: str, secret_hash: str, at: dt.datetime) -> bool:
        """Atomically mark the host's unexpired (``at < expires_at``), unused token with this hash as used."""
        at = _utc(at)
        with self._write() as conn:
            used = conn.execute(
                sa.update(enrol_tokens)
                .where(
                    enrol_tokens.c.host == host,
                    enrol_tokens.c.secret_hash == secret_hash,
                    enrol_tokens.c.used_at.is_(None),
                    enrol_tokens.c.expires_at > at,
                )
                .values(used_at=at)
            )
        return used.rowcount > 0

    def add_certificate(self, cert: HostCertificate) -> None:
        values = dataclasses.asdict(cert)
        for name in ("not_after", "issued_at", "revoked_at"):
            if values[name] is not None:
                values[name] = _utc(values[name], name)
        with self._write() as conn:
            require_host(conn, cert.host)
            if conn.scalar(sa.select(certificates.c.serial).where(certificates.c.serial == cert.serial)) is not None:
                raise Conflict(f"a certificate with serial {cert.serial:x} already exists")
            conn.execute(sa.insert(certificates).values(**values))

    def get_certificate(self, serial: int) -> HostCertificate | None:
        with self._read() as conn:
            row = conn.execute(sa.select(certificates).where(certificates.c.serial == serial)).first()
        return None if row is None else _certificate(row)

    def list_certificates(self, host: str | None = None) -> list[HostCertificate]:
        query = sa.select(certificates).order_by(certificates.c.issued_at, certificates.c.serial)
        if host is not None:
            query = query.where(certificates.c.host == host)
        with self._read() as conn:
            return [_certificate(r) for r in conn.execute(query)]

    def hosts_with_live_certificates(self) -> set[str]:
        query = sa.select(certificates.c.host).where(certificates.c.revoked_at.is_(None)).distinct()
        with self._read() as conn:
            return set(conn.scalars(query))

    def revoke_certificate(self, serial: int, at: dt.datetime) -> HostCertificate:
        """Revoke at ``at``; revoking again keeps the first revocation time. NotFound for an unknown serial."""
        which = certificates.c.serial == serial
        return _certificate(self._revoke(certificates, which, at, f"certificate with serial {serial:x}"))

    def _revoke(self, table: sa.Table, which: sa.ColumnElement[bool], at: dt.datetime, what: str) -> sa.Row[Any]:
        """Set ``revoked_at`` of the row ``which`` selects unless it is set already, and return the row; NotFound,
        naming ``what``, if there is none."""
        at = _utc(at)
        with self._write() as conn:
            conn.execute(sa.update(table).where(which, table.c.revoked_at.is_(None)).values(revoked_at=at))
            row = conn.execute(sa.select(table).where(which)).first()
        if row is None:
            raise NotFound(f"{what} not found")
        return row

    def get_setting(self, key: str) -> Any | None:
        with self._read() as conn:
            return conn.scalar(sa.select(settings.c.value).where(settings.c.key == key))

    def put_setting(self, key: str, value: Any) -> None:
        """Store any JSON-serialisable value under ``key``, replacing what was there."""
        with self._write() as conn:
            insert = insert_for(conn, settings).values(key=key, value=_json(value, f"setting {key!r}"))
            conn.execute(insert.on_conflict_do_update(index_elements=["key"], set_={"value": insert.excluded.value}))
