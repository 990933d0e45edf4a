"""Migration hooks, as XAPI has them: executables an operator drops into a host's hooks directory.

For a hook point ``P`` (``pre-migrate-source``, ``pre-migrate-destination``, ``post-migrate-source``,
``post-migrate-destination``, ``rollback``) every executable regular file in ``<hooks_dir>/P.d/`` runs, in name order,
with the migration's context as JSON on stdin. A non-zero exit of a *pre* hook vetoes the migration; post and rollback
hooks are recorded but cannot undo what is done. Each hook has a time limit (killed when it runs over: that counts as a
failure) and its output is kept, truncated, in the result that the controller stores with the migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUTPUT_LIMIT = 4096


class HookPoint(enum.StrEnum):
    PRE_MIGRATE_SOURCE = "pre-migrate-source"
    PRE_MIGRATE_DESTINATION = "pre-migrate-destination"
    POST_MIGRATE_SOURCE = "post-migrate-source"
    POST_MIGRATE_DESTINATION = "post-migrate-destination"
    ROLLBACK = "rollback"

    @property
    def can_veto(self) -> bool:
        return self.value.startswith("pre-")


@dataclass(frozen=True)
class HookResult:
    hook: str
    point: str
    exit_code: int | None  # None: killed at the time limit
    duration_s: float
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class HookRun:
    point: str
    results: tuple[HookResult, ...]

    @property
    def vetoed(self) -> bool:
        return HookPoint(self.point).can_veto and any(not r.ok for r in self.results)

    def summary(self) -> str:
        failed = [r for r in self.results if not r.ok]
        if not failed:
            return f"{self.point}: {len(self.results)} hook(s) passed"
        first = failed[0]
        why = "timed out" if first.exit_code is None else f"exit {first.exit_code}"
        detail = (first.stderr or first.stdout).strip().splitlines()[-1:] or [""]
        return f"{self.point}: hook {first.hook} {why} {detail[0]}".strip()


def hooks_for(hooks_dir: Path, point: HookPoint) -> list[Path]:
    directory = hooks_dir / f"{point.value}.d"
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and os.access(p, os.X_OK))


async def _run_one(path: Path, point: HookPoint, context: bytes, timeout_s: float) -> HookResult:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "FERRYMAN_HOOK": point.value},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(context), timeout_s)
        code: int | None = proc.returncode
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        out, err = await proc.communicate()
        code = None
    return HookResult(
        hook=path.name,
        point=point.value,
        exit_code=code,
        duration_s=round(time.monotonic() - started, 3),
        stdout=out.decode(errors="replace")[-OUTPUT_LIMIT:],
        stderr=err.decode(errors="replace")[-OUTPUT_LIMIT:],
    )


async def run_hooks(
    hooks_dir: Path, point: HookPoint, context: Mapping[str, Any], *, timeout_s: float = 30.0
) -> HookRun:
    """Run every hook of ``point``; a pre hook that fails stops the remaining ones (the migration is vetoed)."""
    payload = json.dumps({"hook": point.value, **context}, sort_keys=True, default=str).encode()
    results: list[HookResult] = []
    for path in hooks_for(hooks_dir, point):
        result = await _run_one(path, point, payload, timeout_s)
        results.append(result)
        if point.can_veto and not result.ok:
            break
    return HookRun(point.value, tuple(results))
