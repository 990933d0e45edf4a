"""nftables in a host's namespace: load a rule file, read a table back, hash it, read counters, list tables.

What proves which rules a host runs is the hash of nft's own stateless listing of the table (``nft -s list table``:
no counter values, no handles, but the comment, hook device, priority and policy), not the hash of the file that was
loaded: nft canonicalises the text (sorts set elements, drops implied matches, rewrites priorities). The expected
value comes from :class:`CanonicalHashes`, which loads the same file into a throw-away namespace (with a device named
like the tap, for kernels whose netdev chains need the device to exist) and hashes that listing. Both listings come
from the same nft binary, so a version change of nft cannot make them differ. nft 1.0.6's JSON output omits the
table comment and a netdev chain's device, so JSON is used for counters and table names only.

This module neither decides nor renders rules (:mod:`ferryman.network.rules` does); it never touches a table
other than the one it is asked about.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any

from ferryman.agent.network.netns import Namespace, check_ifname, in_scratch_netns
from ferryman.core.errors import NetworkError

__all__ = [
    "LOAD_TIMEOUT",
    "CanonicalHashes",
    "counters",
    "delete_table",
    "listing",
    "listing_hash",
    "load",
    "tables",
]

LOAD_TIMEOUT = 30.0
_ABSENT = "No such file or directory"  # nft's message for a table that does not exist


def listing_hash(text: str) -> str:
    """``sha256:<hex>`` of a table's listing."""
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def load(ns: Namespace, text: str, what: str) -> None:
    """``nft -f -`` of ``text`` in ``ns``: one transaction, all or nothing."""
    ns.run(ns.nft("-f", "-"), what, input=text, timeout=LOAD_TIMEOUT)


def listing(ns: Namespace, family: str, table: str) -> str | None:
    """The stateless listing of ``family table`` in ``ns``, or None if there is no such table."""
    what = f"reading back table {family} {table}"
    done = ns.try_run(ns.nft("-s", "list", "table", family, table), what)
    if done.returncode == 0:
        return done.stdout
    if _ABSENT in done.stderr:
        return None
    raise NetworkError(f"{what} in {ns.where} failed: {done.stderr.strip()}")


def delete_table(ns: Namespace, family: str, table: str) -> None:
    """Delete ``family table`` in ``ns`` if it exists; ``add`` first makes the transaction succeed either way."""
    load(ns, f"add table {family} {table}\ndelete table {family} {table}\n", f"deleting table {family} {table}")


def tables(ns: Namespace) -> list[tuple[str, str]]:
    """Every nftables table in ``ns`` as (family, name)."""
    found: list[tuple[str, str]] = []
    for item in _json_objects(ns.run(ns.nft("-j", "list", "tables"), "listing nftables tables"), ns):
        table = item.get("table")
        if isinstance(table, dict):
            found.append((str(table.get("family")), str(table.get("name"))))
    return found


def counters(
    ns: Namespace, family: str | None = None, table: str | None = None
) -> dict[tuple[str, str], dict[str, int]]:
    """Packets per named counter, by (family, table): of one table if given (empty if it does not exist), else
    of every table in ``ns``."""
    # one table: list the table itself (its counter objects come with it); ``list counters table`` reads the
    # whole ruleset in nft 1.0.6, which costs more with every NIC table the namespace holds
    scope = ["table", family, table] if family and table else []
    what = f"reading counters of table {family} {table}" if scope else "reading nftables counters"
    done = ns.try_run(ns.nft("-j", "list", *(scope or ["counters"])), what)
    if done.returncode != 0:
        if scope and _ABSENT in done.stderr:
            return {}
        raise NetworkError(f"{what} in {ns.where} failed: {done.stderr.strip()}")
    found: dict[tuple[str, str], dict[str, int]] = {}
    for item in _json_objects(done.stdout, ns):
        counter = item.get("counter")
        if isinstance(counter, dict) and "name" in counter:
            key = (str(counter.get("family")), str(counter.get("table")))
            found.setdefault(key, {})[str(counter["name"])] = int(counter.get("packets", 0))
    return found


def _json_objects(text: str, ns: Namespace) -> list[dict[str, Any]]:
    try:
        objects = json.loads(text or '{"nftables": []}')["nftables"]
    except (ValueError, KeyError, TypeError) as err:
        raise NetworkError(f"nft printed JSON that cannot be read in {ns.where}: {err}") from err
    return [item for item in objects if isinstance(item, dict)]


class CanonicalHashes:
    """The hash a rule file's table lists as when loaded on its own, computed in a throw-away namespace and
    remembered by the sha256 of the file (at most ``size`` of them, least recently used dropped first)."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._known: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def hash_for(self, text: str, family: str, table: str, devices: tuple[str, ...]) -> str:
        """``sha256:<hex>`` of the listing of ``family table`` after loading ``text`` into an empty namespace
        that has a veth for each name in ``devices`` (the devices the table's base chains hook)."""
        key = hashlib.sha256(text.encode()).hexdigest()
        with self._lock:
            if key in self._known:
                self._known.move_to_end(key)
                return self._known[key]
        for device in devices:
            check_ifname(device)
        canonical = listing_hash(
            in_scratch_netns(lambda: _load_and_list(text, family, table, devices), purpose="canon")
        )
        with self._lock:
            self._known[key] = canonical
            while len(self._known) > self._size:
                self._known.popitem(last=False)
        return canonical

    def __len__(self) -> int:
        with self._lock:
            return len(self._known)


def _load_and_list(text: str, family: str, table: str, devices: tuple[str, ...]) -> str:
    """Runs on the scratch namespace's thread: its subprocesses inherit that namespace."""
    here = Namespace(None, label="a throw-away network namespace")
    for index, device in enumerate(devices):
        here.run(here.ip("link", "add", device, "type", "veth", "peer", "name", f"fmcanon{index}"), f"adding {device}")
    load(here, text, f"loading table {family} {table} to compute its canonical hash")
    found = listing(here, family, table)
    if found is None:
        raise NetworkError(f"table {family} {table} is missing after loading its file into a throw-away namespace")
    return found
