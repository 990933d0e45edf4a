"""The image registry on SQL: :class:`SqlImageMixin` implements :class:`~ferryman.cmdb.images.ImageRepository` for
:class:`~ferryman.cmdb.sql.SqlRepository`.

Nothing here verifies a signature or reads an image file: the controller's image service does, before it writes.
Revoking an image and removing a signing key are written once (a second attempt is a Conflict, never a new time).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import sqlalchemy as sa

from ferryman.cmdb.images import ImageRecord, SigningKeyRecord
from ferryman.cmdb.schema import images, signing_keys
from ferryman.cmdb.sql_base import SqlBase, first_or_not_found, from_row
from ferryman.cmdb.values import utc
from ferryman.core.errors import Conflict


def _image(row: sa.Row[Any]) -> ImageRecord:
    return from_row(ImageRecord, row, guest_agent=bool(row.guest_agent))


def _key(row: sa.Row[Any]) -> SigningKeyRecord:
    return from_row(SigningKeyRecord, row)


class SqlImageMixin(SqlBase):
    """:class:`~ferryman.cmdb.images.ImageRepository` for :class:`~ferryman.cmdb.sql.SqlRepository`."""

    def add_image(self, image: ImageRecord) -> ImageRecord:
        image = dataclasses.replace(image, imported_at=utc(image.imported_at, "imported_at"))
        with self._write() as conn:
            if conn.scalar(sa.select(images.c.name).where(images.c.name == image.name)) is not None:
                raise Conflict(f"an image named {image.name!r} exists already")
            publisher = sa.select(signing_keys).where(signing_keys.c.name == image.publisher)
            first_or_not_found(conn, publisher, f"signing key {image.publisher!r}")
            conn.execute(sa.insert(images).values(**dataclasses.asdict(image)))
        return image

    def get_image(self, name: str) -> ImageRecord:
        with self._read() as conn:
            return _image(first_or_not_found(conn, sa.select(images).where(images.c.name == name), f"image {name!r}"))

    def list_images(self) -> list[ImageRecord]:
        with self._read() as conn:
            return [_image(r) for r in conn.execute(sa.select(images).order_by(images.c.name))]

    def revoke_image(self, name: str, at: dt.datetime, by: str, reason: str) -> ImageRecord:
        at = utc(at)
        with self._write() as conn:
            row = first_or_not_found(conn, sa.select(images).where(images.c.name == name), f"image {name!r}", lock=True)
            if row.revoked_at is not None:
                raise Conflict(f"image {name!r} was revoked already at {row.revoked_at:%Y-%m-%d %H:%M:%S}Z")
            conn.execute(
                sa.update(images)
                .where(images.c.name == name)
                .values(revoked_at=at, revoked_by=by, revoked_reason=reason)
            )
            return _image(first_or_not_found(conn, sa.select(images).where(images.c.name == name), f"image {name!r}"))

    def add_signing_key(self, key: SigningKeyRecord) -> SigningKeyRecord:
        """A new trusted key; a name whose key was removed before is taken over by the new key."""
        key = dataclasses.replace(key, added_at=utc(key.added_at, "added_at"), removed_at=None, removed_by=None)
        with self._write() as conn:
            row = conn.execute(sa.select(signing_keys).where(signing_keys.c.name == key.name).with_for_update()).first()
            if row is not None and row.removed_at is None:
                raise Conflict(f"a trusted signing key named {key.name!r} exists already ({row.fingerprint})")
            if row is not None:
                same = signing_keys.c.name == key.name
                conn.execute(sa.update(signing_keys).where(same).values(**dataclasses.asdict(key)))
            else:
                conn.execute(sa.insert(signing_keys).values(**dataclasses.asdict(key)))
        return key

    def get_signing_key(self, name: str) -> SigningKeyRecord:
        with self._read() as conn:
            query = sa.select(signing_keys).where(signing_keys.c.name == name)
            return _key(first_or_not_found(conn, query, f"signing key {name!r}"))

    def list_signing_keys(self, *, trusted_only: bool = False) -> list[SigningKeyRecord]:
        query = sa.select(signing_keys).order_by(signing_keys.c.name)
        if trusted_only:
            query = query.where(signing_keys.c.removed_at.is_(None))
        with self._read() as conn:
            return [_key(r) for r in conn.execute(query)]

    def remove_signing_key(self, name: str, at: dt.datetime, by: str) -> SigningKeyRecord:
        at = utc(at)
        with self._write() as conn:
            query = sa.select(signing_keys).where(signing_keys.c.name == name)
            row = first_or_not_found(conn, query, f"signing key {name!r}", lock=True)
            if row.removed_at is not None:
                raise Conflict(f"signing key {name!r} was removed already")
            removal = {"removed_at": at, "removed_by": by}
            conn.execute(sa.update(signing_keys).where(signing_keys.c.name == name).values(**removal))
            return _key(first_or_not_found(conn, query, f"signing key {name!r}"))
