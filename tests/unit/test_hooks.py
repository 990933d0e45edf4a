"""Migration hooks: JSON context on stdin, veto by pre hooks, time limit, recorded output."""

from __future__ import annotations

import json
import stat

from ferryman.agent.hooks import HookPoint, run_hooks


def hook(hooks_dir, point: str, name: str, body: str, executable: bool = True):
    d = hooks_dir / f"{point}.d"
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    if executable:
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


async def test_hooks_get_context_and_run_in_order(tmp_path):
    """Hooks run in name order and read the migration context as JSON on stdin."""
    hook(tmp_path, "pre-migrate-source", "20-second", f"cat > {tmp_path}/second.json")
    hook(tmp_path, "pre-migrate-source", "10-first", "echo first")
    run = await run_hooks(tmp_path, HookPoint.PRE_MIGRATE_SOURCE, {"migration_id": "m-1", "vm": "web-1"})
    assert [r.hook for r in run.results] == ["10-first", "20-second"]
    assert not run.vetoed and run.results[0].stdout.strip() == "first"
    context = json.loads((tmp_path / "second.json").read_text())
    assert context == {"hook": "pre-migrate-source", "migration_id": "m-1", "vm": "web-1"}


async def test_failing_pre_hook_vetoes_and_stops_the_rest(tmp_path):
    """A non-zero pre hook vetoes the migration; later hooks do not run; its stderr is in the summary."""
    hook(tmp_path, "pre-migrate-destination", "10-deny", "echo 'not on fridays' >&2; exit 3")
    hook(tmp_path, "pre-migrate-destination", "20-never", f"touch {tmp_path}/ran")
    run = await run_hooks(tmp_path, HookPoint.PRE_MIGRATE_DESTINATION, {})
    assert run.vetoed and run.results[0].exit_code == 3
    assert "not on fridays" in run.summary()
    assert not (tmp_path / "ran").exists()


async def test_failing_post_hook_does_not_veto(tmp_path):
    """A failing post hook is recorded but cannot veto."""
    hook(tmp_path, "post-migrate-source", "10-fail", "exit 1")
    run = await run_hooks(tmp_path, HookPoint.POST_MIGRATE_SOURCE, {})
    assert not run.vetoed and not run.results[0].ok


async def test_hook_over_its_time_limit_is_killed(tmp_path):
    """A hook that runs past its limit is killed and counts as a failure (a veto for a pre hook)."""
    hook(tmp_path, "pre-migrate-source", "10-slow", "sleep 30")
    run = await run_hooks(tmp_path, HookPoint.PRE_MIGRATE_SOURCE, {}, timeout_s=0.5)
    assert run.vetoed and run.results[0].exit_code is None
    assert run.results[0].duration_s < 10
    assert "timed out" in run.summary()


async def test_non_executable_files_are_ignored(tmp_path):
    """Only executable files are hooks."""
    hook(tmp_path, "rollback", "README", "exit 1", executable=False)
    assert (await run_hooks(tmp_path, HookPoint.ROLLBACK, {})).results == ()
