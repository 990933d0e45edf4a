"""The assembled ``ferryman`` app: every command group and command, in ``--help`` order, and the error contract."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import typer.main

from ferryman.cli.main import app, main

COMMANDS = {
    "host": ["list", "show", "add", "revoke", "neighbours", "history", "drain", "set", "compromise"],
    "vm": [
        "create",
        "list",
        "show",
        "start",
        "stop",
        "pause",
        "resume",
        "delete",
        "history",
        "keys",
        "migrate",
        "snapshots",
        "restore",
        "nics",
        "isolate",
        "unisolate",
        "baseline",
        "remediated",
        "destroy-keys",
    ],
    "image": ["import", "list", "show", "verify", "revoke", "push", "keygen", "sign", "trust"],
    "network": ["create", "list", "show"],
    "incident": ["open", "list", "show", "capture", "evidence", "impact", "close", "capacity", "playbook"],
    "site": ["list", "add"],
    "lab": ["up", "status", "down"],
    "migration": ["list", "show", "cancel"],
    "policy": ["validate", "apply", "clear", "list", "versions", "show"],
    "compliance": ["check", "plan", "report"],
    "audit": ["verify", "export", "checkpoint"],
    "principal": ["create", "list", "show", "disable"],
    "token": ["rotate"],
    "role": ["list", "show", "policy"],
    "approval": ["list", "approve", "deny"],
}


def test_app_has_every_command_in_order():
    """Top-level commands come first, then the groups, each with its commands in help order."""
    root = typer.main.get_command(app)
    assert list(root.commands) == ["events", "alarms", "place", *COMMANDS]
    groups = {name: list(cmd.commands) for name, cmd in root.commands.items() if hasattr(cmd, "commands")}
    assert groups == COMMANDS


@pytest.fixture
def unconfigured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("FERRYMAN_CONFIG", "FERRYMAN_URL", "FERRYMAN_CA", "FERRYMAN_TOKEN", "FERRYMAN_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FERRYMAN_LAB_DIR", str(tmp_path))


@pytest.mark.usefixtures("unconfigured")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["vm", "list"], "error: no controller configured"),
        (["vm", "create", "x", "--tenant", "t", "--profile", "bad"], "error: bad --profile 'bad'"),
        (["host", "set", "h"], "error: nothing to change"),
    ],
)
def test_cli_error_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
):
    """A CliError ends the command with exit status 1 and one 'error: …' line on stderr, no traceback."""
    monkeypatch.setattr(sys, "argv", ["ferryman", *argv])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("creating ")]
    assert len(lines) == 1 and lines[0].startswith(message), err
