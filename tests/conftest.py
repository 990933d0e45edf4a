"""Fixtures shared by the suites. The ``lab`` fixture is a real lab: controller, three agents, QEMU guests.

A long-lived session fixture (the lab, the fault lab) would otherwise run until the session ends,
its guests taking CPU from every later test on a small machine. The tests that use one are run together, and it is
shut down right after the last of them (:func:`release_after_last_user`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest

from ferryman.client import Api, CliConfig
from ferryman.testing.labhandle import LabHandle, running_lab

LAB_PORT = 18443
LAB_AGENT_PORT = 18444

LONG_LIVED = ("lab", "fault_lab")
_LAST_USER = pytest.StashKey[dict[str, str]]()  # fixture name -> node id of the last test that uses it
_RELEASE = pytest.StashKey[dict[str, Callable[[], None]]]()  # fixture name -> how to shut it down now


def _session_fixture(item: pytest.Item, name: str) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.get(name) if info is not None else None
    return bool(defs) and defs[-1].scope == "session"


def pytest_itemcollected(item: pytest.Item) -> None:
    """A test that uses a shared lab boots real guests: it is a ``lab`` and ``qemu`` test whether or not its module
    says so, so that it runs with the other guests' tests (``./run-tests``), never beside the tests that share the
    cores. Collection marks it before the deselection by markers (``-m``) sees it."""
    if any(_session_fixture(item, name) for name in LONG_LIVED):
        item.add_marker(pytest.mark.lab)
        item.add_marker(pytest.mark.qemu)


@pytest.hookimpl(trylast=True)  # after the deselection by markers, on the items that will run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    last: dict[str, str] = {}
    for name in LONG_LIVED:
        users = [i for i in items if _session_fixture(i, name)]
        if not users:
            continue
        # move the users together, where the first of them was; the others keep their order
        first = items.index(users[0])
        chosen = {id(i) for i in users}
        rest = [i for i in items if id(i) not in chosen]
        at = sum(1 for i in items[:first] if id(i) not in chosen)
        items[:] = rest[:at] + users + rest[at:]
        last[name] = users[-1].nodeid
    config.stash[_LAST_USER] = last


@pytest.fixture(scope="session")
def release_after_last_user(request: pytest.FixtureRequest) -> Callable[[str, Callable[[], None]], None]:
    """``register(name, release)``: have the session fixture ``name`` shut down (``release``, which must be
    idempotent) once its last test has torn down, instead of at the end of the session."""

    def register(name: str, release: Callable[[], None]) -> None:
        request.config.stash.setdefault(_RELEASE, {})[name] = release

    return register


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    try:
        return (yield)
    finally:
        releases = item.config.stash.get(_RELEASE, {})
        for name, nodeid in item.config.stash.get(_LAST_USER, {}).items():
            if nodeid == item.nodeid and name in releases:
                releases.pop(name)()


@pytest.fixture(scope="session")
def lab(
    tmp_path_factory: pytest.TempPathFactory, release_after_last_user: Callable[[str, Callable[[], None]], None]
) -> Iterator[LabHandle]:
    """A lab of three hosts with two booted VMs, shared by the lab tests of the session."""
    lab_dir = tmp_path_factory.mktemp("ferryman") / "lab"
    with contextlib.ExitStack() as stack:
        handle = stack.enter_context(running_lab(lab_dir, hosts=3, vms=2, port=LAB_PORT, agent_port=LAB_AGENT_PORT))
        release_after_last_user("lab", stack.close)
        yield handle


@pytest.fixture
def api(lab: LabHandle) -> Api:
    return lab.api()


def api_for(lab: LabHandle) -> Api:
    return Api(CliConfig.load(lab.dir / "cli.json"))
