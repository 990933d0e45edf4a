"""Failpoints: hold the migration runner at a chosen phase so that a fault can be injected at that exact moment.

Why it exists: the protocol's invariants (DESIGN.md, "The migration protocol") must hold whatever dies and whenever
it dies. A fault-injection test needs the runner to stand still in a known phase (persisted, next step not yet
started), strike (kill the controller, an agent or a QEMU), then let it go on.

How: only when the controller runs with ``FERRYMAN_FAILPOINTS_DIR`` set. Before the runner executes a command of a
migration in phase P (its state already persisted), :func:`maybe_pause` looks for ``<dir>/pause-at-<P>`` (P as the
journal spells it, e.g. ``pause-at-transferring``) and for ``<dir>/pause-before-<S>`` (S the step about to run, e.g.
``pause-before-resume_source``: a rollback runs several steps in one phase). For the first that exists it writes
``<dir>/reached-<P>`` or ``<dir>/reached-before-<S>`` (holding the migration id) and waits, polling, until that pause
file is removed, for at most :data:`MAX_PAUSE_S`.

What it must not do: anything at all when the variable is unset (the production default), decide or change a
migration, or wait without a bound.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import structlog

ENV_VAR = "FERRYMAN_FAILPOINTS_DIR"
MAX_PAUSE_S = 300.0
POLL_S = 0.1

log = structlog.get_logger(__name__)


def failpoints_dir() -> Path | None:
    """The failpoint directory, or None (failpoints off) when the controller was started without the variable."""
    value = os.environ.get(ENV_VAR)
    return Path(value) if value else None


async def maybe_pause(
    phase: str, migration_id: str = "", step: str | None = None, *, directory: Path | None = None
) -> None:
    """Wait while ``pause-at-<phase>`` or ``pause-before-<step>`` exists (bounded); a no-op when failpoints are off."""
    directory = directory or failpoints_dir()
    if directory is None:
        return
    points = [(f"pause-at-{phase}", f"reached-{phase}")]
    if step:
        points.append((f"pause-before-{step}", f"reached-before-{step}"))
    hit = next(((directory / p, directory / r) for p, r in points if (directory / p).exists()), None)
    if hit is None:
        return
    pause, reached = hit
    reached.write_text(migration_id)
    log.warning("failpoint: runner paused", failpoint=pause.name, migration=migration_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MAX_PAUSE_S
    while pause.exists() and loop.time() < deadline:  # noqa: ASYNC110 - another process removes the file
        await asyncio.sleep(POLL_S)
    log.warning("failpoint: runner released", failpoint=pause.name, migration=migration_id, timed_out=pause.exists())
