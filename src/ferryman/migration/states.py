"""The phases of one live migration and the only moves between them.

The protocol (DESIGN.md, "The migration protocol") is a line of forward phases with a single commit point. Before
:attr:`Phase.COMMITTED` any failure rolls back; from it on, the migration can only go forward (or stop in
:attr:`Phase.STUCK` and wait for an operator). :data:`TRANSITIONS` lists every allowed change of phase;
:func:`check_transition` is how :mod:`ferryman.migration.machine` asserts it never leaves the table.

Phases name what has been *reached*; a :class:`Step` is the unit of work that reaches the next one. The runner
persists "phase P reached, step S about to run" before it runs S, so a restarted controller knows what may have been
half done.

This module is pure data: it imports nothing that does I/O.
"""

from __future__ import annotations

import enum
import itertools

from ferryman.core.errors import Conflict


class Phase(enum.StrEnum):
    """Where a migration stands. Values are the strings stored in the migration journal."""

    REQUESTED = "requested"
    ADMITTED = "admitted"  # governor and placement policy said yes
    SNAPSHOTTED = "snapshotted"  # pre-migration snapshot of the source taken
    DEST_PREPARED = "dest_prepared"  # destination QEMU waits paused (-incoming, -S); disk target and NBD export ready
    PRE_HOOKS_PASSED = "pre_hooks_passed"
    MIRRORING = "mirroring"  # block mirror to the destination running and in sync (local storage only)
    TRANSFERRING = "transferring"  # RAM stream to the destination running
    SWITCHED_OVER = "switched_over"  # source paused, destination paused, both complete
    COMMITTED = "committed"  # CMDB placement = destination, generation + 1: the linearisation point
    ACTIVATED = "activated"  # destination running
    SOURCE_RETIRED = "source_retired"  # source QEMU quit
    SCRUBBED = "scrubbed"  # source residues erased, receipt recorded
    POST_HOOKS_PASSED = "post_hooks_passed"
    DONE = "done"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"  # destination killed and scrubbed, source running as before
    REFUSED = "refused"  # admission said no; nothing was done on any host
    STUCK = "stuck"  # a step failed beyond its retries; an operator must act (an alarm is raised)


class Step(enum.StrEnum):
    """A unit of work the runner executes. Each forward step reaches exactly one forward phase."""

    ADMIT = "admit"
    SNAPSHOT = "snapshot"
    PREPARE_DESTINATION = "prepare_destination"
    PRE_HOOKS = "pre_hooks"
    START_MIRROR = "start_mirror"
    TRANSFER = "transfer"
    SWITCH_OVER = "switch_over"
    COMMIT = "commit"
    ACTIVATE = "activate"
    RETIRE_SOURCE = "retire_source"
    SCRUB_SOURCE = "scrub_source"
    POST_HOOKS = "post_hooks"
    FINISH = "finish"
    # rollback, in this order
    KILL_DESTINATION = "kill_destination"
    SCRUB_DESTINATION = "scrub_destination"
    RESUME_SOURCE = "resume_source"
    ROLLBACK_HOOKS = "rollback_hooks"


LOCAL_PATH: tuple[Phase, ...] = (
    Phase.REQUESTED,
    Phase.ADMITTED,
    Phase.SNAPSHOTTED,
    Phase.DEST_PREPARED,
    Phase.PRE_HOOKS_PASSED,
    Phase.MIRRORING,
    Phase.TRANSFERRING,
    Phase.SWITCHED_OVER,
    Phase.COMMITTED,
    Phase.ACTIVATED,
    Phase.SOURCE_RETIRED,
    Phase.SCRUBBED,
    Phase.POST_HOOKS_PASSED,
    Phase.DONE,
)
"""The forward phases of a migration whose disks live on the source host (the disk is mirrored)."""

SHARED_PATH: tuple[Phase, ...] = tuple(p for p in LOCAL_PATH if p is not Phase.MIRRORING)
"""The forward phases on shared storage: both hosts see the disk, so there is nothing to mirror."""

REACHED_BY: dict[Phase, Step] = {
    Phase.ADMITTED: Step.ADMIT,
    Phase.SNAPSHOTTED: Step.SNAPSHOT,
    Phase.DEST_PREPARED: Step.PREPARE_DESTINATION,
    Phase.PRE_HOOKS_PASSED: Step.PRE_HOOKS,
    Phase.MIRRORING: Step.START_MIRROR,
    Phase.TRANSFERRING: Step.TRANSFER,
    Phase.SWITCHED_OVER: Step.SWITCH_OVER,
    Phase.COMMITTED: Step.COMMIT,
    Phase.ACTIVATED: Step.ACTIVATE,
    Phase.SOURCE_RETIRED: Step.RETIRE_SOURCE,
    Phase.SCRUBBED: Step.SCRUB_SOURCE,
    Phase.POST_HOOKS_PASSED: Step.POST_HOOKS,
    Phase.DONE: Step.FINISH,
}
"""The forward step that reaches each forward phase."""

ROLLBACK_STEPS: tuple[Step, ...] = (
    Step.KILL_DESTINATION,
    Step.SCRUB_DESTINATION,
    Step.RESUME_SOURCE,
    Step.ROLLBACK_HOOKS,
)
"""Rollback, in order. The destination dies before the source resumes, so two copies never run (invariant 1).
Every rollback step is idempotent: recovery restarts the list from its first step."""

LEADS_TO: dict[Step, Phase] = {
    **{step: phase for phase, step in REACHED_BY.items()},
    Step.KILL_DESTINATION: Phase.ROLLING_BACK,
    Step.SCRUB_DESTINATION: Phase.ROLLING_BACK,
    Step.RESUME_SOURCE: Phase.ROLLING_BACK,
    Step.ROLLBACK_HOOKS: Phase.ROLLED_BACK,
}
"""The phase the migration is in once each step has succeeded (rollback steps but the last stay in ROLLING_BACK)."""

TERMINAL: frozenset[Phase] = frozenset({Phase.DONE, Phase.ROLLED_BACK, Phase.REFUSED, Phase.STUCK})

COMMITTED_PHASES: frozenset[Phase] = frozenset(LOCAL_PATH[LOCAL_PATH.index(Phase.COMMITTED) :])
"""COMMITTED and every forward phase after it: the VM officially lives on the destination."""

PRE_COMMIT_PHASES: frozenset[Phase] = frozenset(LOCAL_PATH[: LOCAL_PATH.index(Phase.COMMITTED)])
"""REQUESTED up to SWITCHED_OVER: a failure here rolls back."""


def _build_transitions() -> frozenset[tuple[Phase, Phase]]:
    moves: set[tuple[Phase, Phase]] = set()
    for path in (LOCAL_PATH, SHARED_PATH):
        moves.update(itertools.pairwise(path))
    moves.add((Phase.REQUESTED, Phase.REFUSED))
    # REQUESTED has touched no host yet: it ends in REFUSED, never in a rollback.
    moves.update((p, Phase.ROLLING_BACK) for p in PRE_COMMIT_PHASES if p is not Phase.REQUESTED)
    moves.update({(Phase.ROLLING_BACK, Phase.ROLLED_BACK), (Phase.ROLLING_BACK, Phase.STUCK)})
    moves.update((p, Phase.STUCK) for p in COMMITTED_PHASES if p is not Phase.DONE)
    return frozenset(moves)


TRANSITIONS: frozenset[tuple[Phase, Phase]] = _build_transitions()
"""Every allowed change of phase. Staying in the same phase (a retry, a restarted rollback) is not a transition."""


def is_terminal(phase: Phase) -> bool:
    """True for DONE, ROLLED_BACK, REFUSED and STUCK: the machine emits nothing more from them."""
    return phase in TERMINAL


def is_committed(phase: Phase) -> bool:
    """True from COMMITTED on (forward phases only): recovery rolls forward, never back."""
    return phase in COMMITTED_PHASES


def forward_path(shared_storage: bool) -> tuple[Phase, ...]:
    """The forward phases for this storage mode, REQUESTED to DONE."""
    return SHARED_PATH if shared_storage else LOCAL_PATH


def next_forward(phase: Phase, shared_storage: bool) -> Phase:
    """The forward phase after ``phase``; :class:`Conflict` if ``phase`` is not a forward phase before DONE."""
    path = forward_path(shared_storage)
    if phase not in path or phase is Phase.DONE:
        raise Conflict(f"no forward phase after {phase.value} ({'shared' if shared_storage else 'local'} storage)")
    return path[path.index(phase) + 1]


def check_transition(current: Phase, new: Phase) -> None:
    """Raise :class:`Conflict` unless ``current → new`` is in :data:`TRANSITIONS` (or is no change at all)."""
    if current is new or (current, new) in TRANSITIONS:
        return
    allowed = sorted(b.value for (a, b) in TRANSITIONS if a is current)
    raise Conflict(
        f"illegal migration transition {current.value} → {new.value}"
        + (f" (allowed: {', '.join(allowed)})" if allowed else " (terminal phase)")
    )
