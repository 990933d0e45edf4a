"""Agent command line: snapshot retention is a setting, from the option or the environment, checked."""

from __future__ import annotations

import pytest

from ferryman.agent.main import parse_args

BASE = ["--name", "host-a", "--state-dir", "/tmp/a", "--controller-ca", "/tmp/ca.pem"]


def test_snapshot_retention_from_option_environment_and_default(monkeypatch):
    """--snapshots-keep wins over FERRYMAN_SNAPSHOTS_KEEP, which wins over the default of 1."""
    monkeypatch.delenv("FERRYMAN_SNAPSHOTS_KEEP", raising=False)
    assert parse_args(BASE)[0].snapshots_keep == 1
    monkeypatch.setenv("FERRYMAN_SNAPSHOTS_KEEP", "3")
    assert parse_args(BASE)[0].snapshots_keep == 3
    assert parse_args([*BASE, "--snapshots-keep", "0"])[0].snapshots_keep == 0


@pytest.mark.parametrize("value", ["-1", "many"])
def test_bad_snapshot_retention_is_a_usage_error(value, capsys):
    """A negative or non-numeric retention ends with a usage error, not a traceback."""
    with pytest.raises(SystemExit) as exited:
        parse_args([*BASE, "--snapshots-keep", value])
    assert exited.value.code == 2 and "--snapshots-keep" in capsys.readouterr().err
