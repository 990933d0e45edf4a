"""Virtual networks on SQL: :class:`SqlNetworkMixin` implements :class:`~ferryman.cmdb.networks.NetworkRepository`
for :class:`~ferryman.cmdb.sql.SqlRepository`.

Allocation takes the network's row ``FOR UPDATE`` (PostgreSQL; SQLite serialises writers), reads the live addresses
and writes the NICs in the same transaction; the partial unique indexes on live MACs and addresses back it up.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import sqlalchemy as sa

from ferryman.cmdb.networks import NicRequest
from ferryman.cmdb.schema import networks, nics
from ferryman.cmdb.sql_base import SqlBase, first_or_not_found, from_row, vm_row
from ferryman.cmdb.values import utc
from ferryman.core.errors import Conflict, InvalidInput, NotFound
from ferryman.core.models import Network, Nic
from ferryman.network import ipam

FIRST_VNI = 1000  # allocated VNIs start here; an operator's --vlan N is carried as VNI N
NIC_CHANGES = frozenset({"isolated", "host", "rules_hash", "applied_at"})
_LIVE = nics.c.released_at.is_(None)


def _network(row: sa.Row[Any]) -> Network:
    return from_row(Network, row)


def _nic(row: sa.Row[Any]) -> Nic:
    return from_row(Nic, row, isolated=bool(row.isolated))


class SqlNetworkMixin(SqlBase):
    """:class:`~ferryman.cmdb.networks.NetworkRepository` for :class:`~ferryman.cmdb.sql.SqlRepository`."""

    def add_network(self, network: Network) -> Network:
        network = dataclasses.replace(
            network, created_at=utc(network.created_at, "created_at") if network.created_at else self._clock.now()
        )
        with self._write() as conn:
            own = sa.select(networks.c.name).where(networks.c.tenant == network.tenant, networks.c.name == network.name)
            if conn.scalar(own) is not None:
                raise Conflict(f"tenant {network.tenant!r} has a network named {network.name!r} already")
            if network.vni == 0:
                top = conn.scalar(sa.select(sa.func.max(networks.c.vni)).where(networks.c.vni >= FIRST_VNI))
                network = dataclasses.replace(network, vni=(top or FIRST_VNI - 1) + 1)
            else:
                taken = conn.scalar(sa.select(networks.c.name).where(networks.c.vni == network.vni))
                if taken is not None:
                    raise Conflict(f"segment {network.vni} is used by another network already")
            conn.execute(sa.insert(networks).values(**dataclasses.asdict(network)))
        return network

    def get_network(self, name: str, *, tenant: str | None = None) -> Network:
        query = sa.select(networks).where(networks.c.name == name).order_by(networks.c.tenant)
        if tenant is not None:
            query = query.where(networks.c.tenant == tenant)
        with self._read() as conn:
            rows = conn.execute(query.limit(2)).all()
        if len(rows) > 1:
            raise InvalidInput(f"network name {name!r} is used in several tenants: name its tenant (--tenant)")
        if not rows:
            raise NotFound(f"network {name!r} not found")
        return _network(rows[0])

    def list_networks(self, tenant: str | None = None) -> list[Network]:
        query = sa.select(networks).order_by(networks.c.name)
        if tenant is not None:
            query = query.where(networks.c.tenant == tenant)
        with self._read() as conn:
            return [_network(r) for r in conn.execute(query)]

    def add_nics(self, vm_id: str, requests: list[NicRequest]) -> list[Nic]:
        created: list[Nic] = []
        with self._write() as conn:
            vm = vm_row(conn, vm_id)
            macs = set(conn.scalars(sa.select(nics.c.mac).where(_LIVE)))
            for index, request in enumerate(requests):
                mine = sa.select(networks).where(networks.c.tenant == vm.tenant, networks.c.name == request.network)
                row = conn.execute(mine.with_for_update()).first()
                if row is None:  # another tenant's network of this name is not this one's
                    raise NotFound(f"network {request.network!r} not found for tenant {vm.tenant}")
                net = _network(row)
                on_net = (nics.c.tenant == net.tenant, nics.c.network == net.name)
                used = list(conn.scalars(sa.select(nics.c.ipv4).where(_LIVE, *on_net)))
                used += [n.ipv4 for n in created if n.network == net.name]
                ipv4 = ipam.pick_ipv4(net.cidr, used, request.ipv4)
                mac = ipam.new_mac(macs)
                macs.add(mac)
                nic = Nic(
                    id=ipam.new_nic_id(),
                    vm_id=vm_id,
                    network=net.name,
                    index=index,
                    mac=mac,
                    ipv4=ipv4,
                    ipv6=ipam.ipv6_twin(net.cidr, net.cidr6, ipv4) if net.cidr6 else None,
                )
                conn.execute(sa.insert(nics).values(**dataclasses.asdict(nic), tenant=vm.tenant))
                created.append(nic)
        return created

    def nics_of(self, vm_id: str) -> list[Nic]:
        query = sa.select(nics).where(_LIVE, nics.c.vm_id == vm_id).order_by(nics.c.index)
        with self._read() as conn:
            return [_nic(r) for r in conn.execute(query)]

    def nics_on(self, network: Network) -> list[Nic]:
        on_net = (nics.c.tenant == network.tenant, nics.c.network == network.name)
        query = sa.select(nics).where(_LIVE, *on_net).order_by(nics.c.ipv4)
        with self._read() as conn:
            return [_nic(r) for r in conn.execute(query)]

    def all_live_nics(self) -> list[Nic]:
        with self._read() as conn:
            return [_nic(r) for r in conn.execute(sa.select(nics).where(_LIVE).order_by(nics.c.vm_id, nics.c.index))]

    def update_nic(self, nic_id: str, **changes: Any) -> Nic:
        unknown = set(changes) - NIC_CHANGES
        if unknown:
            raise InvalidInput(f"NIC attributes {sorted(unknown)} cannot be changed (use {sorted(NIC_CHANGES)})")
        if changes.get("applied_at") is not None:
            changes["applied_at"] = utc(changes["applied_at"], "applied_at")
        with self._write() as conn:
            query = sa.select(nics).where(nics.c.id == nic_id, _LIVE)
            row = first_or_not_found(conn, query, f"NIC {nic_id!r}", lock=True)
            if "isolated" in changes and bool(changes["isolated"]) != bool(row.isolated):
                # what the rules allow changes: a new revision, whose hash is not known until a host reads it back
                changes |= {"revision": row.revision + 1, "rules_hash": None, "host": None, "applied_at": None}
            if changes:
                conn.execute(sa.update(nics).where(nics.c.id == nic_id).values(**changes))
            return _nic(conn.execute(sa.select(nics).where(nics.c.id == nic_id)).one())

    def release_nics(self, vm_id: str, at: dt.datetime) -> list[Nic]:
        at = utc(at, "at")
        with self._write() as conn:
            rows = list(conn.execute(sa.select(nics).where(_LIVE, nics.c.vm_id == vm_id).order_by(nics.c.index)))
            if not rows:
                return []
            conn.execute(sa.update(nics).where(_LIVE, nics.c.vm_id == vm_id).values(released_at=at))
        return [_nic(r) for r in rows]


__all__ = ["NicRequest", "SqlNetworkMixin"]
