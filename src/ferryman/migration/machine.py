"""The migration protocol as a pure function: ``step(state, event) -> (state, commands)``.

Why it exists: every safety property of a live migration (one running copy, a single commit point, bounded effort)
is decided here, where it can be tested exhaustively without QEMU, a database or a clock. What it must not do: any
I/O, logging, reading the time or randomness. The runner (async, I/O) persists the returned state, *then* executes the
returned commands one at a time and feeds their results back as events.

Rules, by where the migration stands:

* **Forward.** Each successful step moves exactly one phase and emits the command of the next step. With shared
  storage PRE_HOOKS_PASSED goes straight to TRANSFERRING.
* **Before COMMITTED** any failure or time-out, a :class:`Cancel`, or a :class:`Recover` starts the rollback:
  ROLLING_BACK, then KillDestination, Scrub(destination), ResumeSource, RunHooks("rollback"), one at a time, then
  ROLLED_BACK. A failure before the commit is not retried within the migration: whether to try again is a new attempt,
  decided by the governor. REQUESTED is the exception: nothing has touched a host, so a failed admission or a cancel
  ends in REFUSED and a restart simply re-runs admission.
* **The commit is the linearisation point.** While the Commit step is in flight its outcome decides: a
  :class:`Cancel` is only recorded, and a :class:`Timeout` of the commit is ignored because it says nothing about
  whether the transaction landed (the runner re-reads the journal and sends :class:`Recover`).
* **From COMMITTED on** the machine only goes forward. A :class:`Cancel` is recorded (``cancel_requested``) and
  otherwise ignored: the VM already lives on the destination, and undoing that would be a second migration. A
  retryable failure retries the same step up to ``max_retries`` times; then, or on a permanent failure, STUCK with
  an alarm. :class:`Recover` re-issues the command of the current step (roll forward).
* **Rollback steps** are idempotent, retried like post-commit steps, and end in STUCK with an alarm when they cannot
  succeed. A :class:`Recover` during rollback restarts it from its first step.
* **Bounded effort.** Retries per step are capped by ``max_retries`` and restarts per migration by
  ``max_recoveries``; past either the migration is STUCK (or REFUSED before admission). No event sequence yields an
  unbounded number of commands.
* **Stale and impossible events** (a late result of a step that is no longer pending, anything on a terminal state)
  return the state unchanged with no commands; :func:`step` never raises for an event.

What the runner must do for these rules to hold:

* persist the returned state before executing its commands, execute them in order, one step at a time, and report
  every command whose ``step`` is not None with :class:`StepDone`, :class:`StepFailed` or :class:`Timeout`;
* write the state that ``step(state, StepDone(Step.COMMIT))`` returns *in the commit transaction itself*, so the
  journal says COMMITTED exactly when the placement moved; report :class:`StepFailed` for Commit only when the
  transaction is known not to have been applied;
* when a :class:`Cancel` interrupts an in-flight step, let that step settle (abort it and wait) before executing
  the rollback commands; its late result is then ignored here.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ferryman.core.errors import InvalidInput
from ferryman.migration.states import (
    LEADS_TO,
    REACHED_BY,
    ROLLBACK_STEPS,
    Phase,
    Step,
    check_transition,
    forward_path,
    is_committed,
    is_terminal,
    next_forward,
)

DEFAULT_MAX_RETRIES = 3
"""Retries of one step after the commit or during rollback, beyond its first try."""

DEFAULT_MAX_RECOVERIES = 3
"""Controller restarts one migration survives before it is declared STUCK."""

Fact = str | int | float | bool | None
"""A value a step reports back (snapshot name, NBD port, bytes sent); JSON-friendly so the journal can hold it."""

Outcome = Literal["done", "rolled_back", "refused", "stuck"]
"""How a migration ended, as the journal records it."""

AttemptOutcome = Literal["done", "rolled_back", "disrupted", "refused"]
"""How a migration ended, in the governor's vocabulary (:class:`ferryman.scheduler.governor.Attempt`)."""

HookKind = Literal["pre", "post", "rollback"]
Side = Literal["source", "destination"]


# --------------------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Start:
    """Begin the migration: ask for admission."""


@dataclass(frozen=True)
class StepDone:
    """The pending ``step`` succeeded; ``data`` is merged into :attr:`MigrationState.facts`."""

    step: Step
    data: Mapping[str, Fact] = field(default_factory=dict)


@dataclass(frozen=True)
class StepFailed:
    """The pending ``step`` failed. ``retryable`` is the error type's property (TransientError vs PermanentError)."""

    step: Step
    error: str
    retryable: bool


@dataclass(frozen=True)
class Timeout:
    """The pending ``step`` made no progress in time; treated as a retryable failure (never for Commit)."""

    step: Step


@dataclass(frozen=True)
class Cancel:
    """Someone asked to stop the migration. Honoured before the commit, recorded only after it."""

    reason: str = "cancel requested"


@dataclass(frozen=True)
class Recover:
    """The controller restarted and read this state from the journal: before the commit roll back, after it roll
    forward."""


Event = Start | StepDone | StepFailed | Timeout | Cancel | Recover


# ------------------------------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    """Something the runner must do. ``step`` is what the runner reports back with :class:`StepDone` or
    :class:`StepFailed` (None: nothing to report); ``leads_to`` is the phase reached once it succeeds, so the runner can
    record "about to do X" before doing it."""

    _step: ClassVar[Step | None] = None

    @property
    def step(self) -> Step | None:
        return self._step

    @property
    def leads_to(self) -> Phase:
        step = self.step
        if step is None:  # pragma: no cover - every command without a step overrides leads_to
            raise NotImplementedError
        return LEADS_TO[step]


@dataclass(frozen=True)
class Admit(Command):
    """Ask the governor and the placement policy whether this migration may start."""

    _step: ClassVar[Step | None] = Step.ADMIT


@dataclass(frozen=True)
class Snapshot(Command):
    """Take the pre-migration snapshot of the source (kept after a rollback: it is the safety net)."""

    _step: ClassVar[Step | None] = Step.SNAPSHOT


@dataclass(frozen=True)
class PrepareDestination(Command):
    """Start the destination QEMU paused and waiting for the incoming stream; create the disk target and NBD export
    (all TLS, bound to this host pair)."""

    _step: ClassVar[Step | None] = Step.PREPARE_DESTINATION


@dataclass(frozen=True)
class RunHooks(Command):
    """Run the pre (may veto), post (validate) or rollback hooks."""

    kind: HookKind

    @property
    def step(self) -> Step:
        return {"pre": Step.PRE_HOOKS, "post": Step.POST_HOOKS, "rollback": Step.ROLLBACK_HOOKS}[self.kind]


@dataclass(frozen=True)
class StartMirror(Command):
    """Start the block mirror to the destination's NBD export and wait until it is in sync (local storage only)."""

    _step: ClassVar[Step | None] = Step.START_MIRROR


@dataclass(frozen=True)
class Transfer(Command):
    """Start the RAM stream to the destination (TLS, capped bandwidth)."""

    _step: ClassVar[Step | None] = Step.TRANSFER


@dataclass(frozen=True)
class SwitchOver(Command):
    """Let the transfer converge: source paused, destination complete and still paused, mirror completed."""

    _step: ClassVar[Step | None] = Step.SWITCH_OVER


@dataclass(frozen=True)
class Commit(Command):
    """THE commit: placement = destination, generation + 1 and phase COMMITTED, in one transaction."""

    _step: ClassVar[Step | None] = Step.COMMIT


@dataclass(frozen=True)
class Activate(Command):
    """Resume the destination under a lease for the new generation."""

    _step: ClassVar[Step | None] = Step.ACTIVATE


@dataclass(frozen=True)
class RetireSource(Command):
    """Quit the source QEMU (it can never be resumed: its generation is stale)."""

    _step: ClassVar[Step | None] = Step.RETIRE_SOURCE


@dataclass(frozen=True)
class Scrub(Command):
    """Erase the losing side's residues (images, temp files, NBD targets) and record a receipt."""

    side: Side

    @property
    def step(self) -> Step:
        return Step.SCRUB_SOURCE if self.side == "source" else Step.SCRUB_DESTINATION


@dataclass(frozen=True)
class KillDestination(Command):
    """Kill the destination QEMU if it exists (idempotent)."""

    _step: ClassVar[Step | None] = Step.KILL_DESTINATION


@dataclass(frozen=True)
class ResumeSource(Command):
    """Put the source back in its pre-migration run state (idempotent; only after the destination is dead)."""

    _step: ClassVar[Step | None] = Step.RESUME_SOURCE


@dataclass(frozen=True)
class RaiseAlarm(Command):
    """Raise an operator alarm; nothing to report back."""

    kind: str
    message: str

    @property
    def leads_to(self) -> Phase:
        return Phase.STUCK


@dataclass(frozen=True)
class Finish(Command):
    """Record the outcome, release the migration's admission slot. Only ``done`` is a step reported back (it reaches
    DONE); the other outcomes are emitted when the machine has already reached its terminal phase."""

    outcome: Outcome
    disrupted: bool = False  # a rollback caused by a failure or time-out (counts for the circuit breaker)

    @property
    def step(self) -> Step | None:
        return Step.FINISH if self.outcome == "done" else None

    @property
    def leads_to(self) -> Phase:
        return {
            "done": Phase.DONE,
            "rolled_back": Phase.ROLLED_BACK,
            "refused": Phase.REFUSED,
            "stuck": Phase.STUCK,
        }[self.outcome]

    @property
    def attempt_outcome(self) -> AttemptOutcome:
        """The governor's outcome for this attempt: a stuck migration counts as disrupted."""
        if self.outcome == "stuck" or (self.outcome == "rolled_back" and self.disrupted):
            return "disrupted"
        return self.outcome


_FIXED_COMMANDS: dict[Step, Command] = {
    Step.ADMIT: Admit(),
    Step.SNAPSHOT: Snapshot(),
    Step.PREPARE_DESTINATION: PrepareDestination(),
    Step.PRE_HOOKS: RunHooks("pre"),
    Step.START_MIRROR: StartMirror(),
    Step.TRANSFER: Transfer(),
    Step.SWITCH_OVER: SwitchOver(),
    Step.COMMIT: Commit(),
    Step.ACTIVATE: Activate(),
    Step.RETIRE_SOURCE: RetireSource(),
    Step.SCRUB_SOURCE: Scrub("source"),
    Step.POST_HOOKS: RunHooks("post"),
    Step.FINISH: Finish("done"),
    Step.KILL_DESTINATION: KillDestination(),
    Step.SCRUB_DESTINATION: Scrub("destination"),
    Step.RESUME_SOURCE: ResumeSource(),
    Step.ROLLBACK_HOOKS: RunHooks("rollback"),
}


def command_for(step: Step) -> Command:
    """The command that performs ``step``."""
    return _FIXED_COMMANDS[step]


# ---------------------------------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class MigrationState:
    """Everything the protocol knows about one migration; persisted to the journal before each side effect."""

    migration_id: str
    vm_id: str
    source: str
    destination: str
    shared_storage: bool
    phase: Phase = Phase.REQUESTED
    pending: Step | None = None  # the step issued and not yet reported; None before Start and when terminal
    retries: int = 0  # retries the pending step has used
    max_retries: int = DEFAULT_MAX_RETRIES
    recoveries: int = 0  # controller restarts this migration went through
    max_recoveries: int = DEFAULT_MAX_RECOVERIES
    cause: str | None = None  # why it left the forward path (rollback, refusal)
    error: str | None = None  # the last step error
    disrupted: bool = False  # the rollback was caused by a failure or time-out, not a cancel, veto or restart
    cancel_requested: bool = False
    rollback_from: Phase | None = None  # the forward phase where the rollback began
    rollback_done: int = 0  # rollback steps completed, in ROLLBACK_STEPS order
    stuck_at: Phase | None = None  # the phase in which it became STUCK
    facts: Mapping[str, Fact] = field(default_factory=dict)

    @property
    def committed(self) -> bool:
        """True once the commit happened (also when STUCK after it)."""
        if self.phase is Phase.STUCK:
            return self.stuck_at is not None and is_committed(self.stuck_at)
        return is_committed(self.phase)

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict for the journal; :meth:`from_record` reads it back."""
        record: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            record[f.name] = value.value if isinstance(value, enum.Enum) else value
        record["facts"] = dict(self.facts)
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> MigrationState:
        """Rebuild a state from :meth:`to_record` output; :class:`InvalidInput` names what is wrong."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise InvalidInput(f"bad migration record: unknown field(s) {', '.join(unknown)}")
        values = dict(record)
        try:
            values["phase"] = Phase(values.get("phase", Phase.REQUESTED))
            for name in ("pending",):
                values[name] = None if values.get(name) is None else Step(values[name])
            for name in ("rollback_from", "stuck_at"):
                values[name] = None if values.get(name) is None else Phase(values[name])
            values["facts"] = dict(values.get("facts") or {})
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise InvalidInput(f"bad migration record {record.get('migration_id')!r}: {err}") from err


def initial(
    migration_id: str,
    vm_id: str,
    source: str,
    destination: str,
    shared_storage: bool,
    *,
    max_retries: int = DEFAULT_MAX_RETRIES,
    max_recoveries: int = DEFAULT_MAX_RECOVERIES,
) -> MigrationState:
    """A new migration in REQUESTED; feed it :class:`Start`. :class:`InvalidInput` for a same-host move or a negative
    cap."""
    if source == destination:
        raise InvalidInput(f"migration {migration_id}: source and destination are the same host {source!r}")
    if max_retries < 0 or max_recoveries < 0:
        raise InvalidInput(f"migration {migration_id}: max_retries and max_recoveries must be >= 0")
    return MigrationState(
        migration_id=migration_id,
        vm_id=vm_id,
        source=source,
        destination=destination,
        shared_storage=shared_storage,
        max_retries=max_retries,
        max_recoveries=max_recoveries,
    )


def next_command(state: MigrationState) -> Command | None:
    """The command of the pending step (what to re-issue after a restart), or None when nothing is pending."""
    return None if state.pending is None else command_for(state.pending)


def max_commands(state: MigrationState) -> int:
    """An upper bound on the commands one migration can ever emit, whatever the events: the proof that no retry is
    infinite. Each run (the first and each restart) issues each step at most ``max_retries + 1`` times."""
    steps = len(forward_path(state.shared_storage)) - 1 + len(ROLLBACK_STEPS)
    runs = state.max_recoveries + 2  # the first run, the restarts, and the rollback a last restart may start
    return runs * steps * (state.max_retries + 1) + 2  # + RaiseAlarm and Finish


# ----------------------------------------------------------------------------------------------------------- step

Result = tuple[MigrationState, tuple[Command, ...]]


def step(state: MigrationState, event: Event) -> Result:
    """Apply ``event`` to ``state``: the new state (persist it first) and the commands to execute, in order."""
    if is_terminal(state.phase):
        return state, ()
    match event:
        case Start():
            return _on_start(state)
        case StepDone():
            return _on_done(state, event)
        case StepFailed():
            return _on_failure(state, event.step, event.error, retryable=event.retryable)
        case Timeout():
            if event.step is Step.COMMIT:
                return state, ()  # ambiguous: only the journal knows whether the commit landed
            return _on_failure(state, event.step, f"{event.step.value} timed out", retryable=True)
        case Cancel():
            return _on_cancel(state, event.reason)
        case Recover():
            return _on_recover(state)
    return state, ()  # pragma: no cover - not an event


def _move(state: MigrationState, phase: Phase, **changes: Any) -> MigrationState:
    check_transition(state.phase, phase)
    return dataclasses.replace(state, phase=phase, **changes)


def _issue(state: MigrationState) -> Result:
    command = next_command(state)
    return state, (() if command is None else (command,))


def _on_start(state: MigrationState) -> Result:
    if state.phase is not Phase.REQUESTED or state.pending is not None:
        return state, ()  # a duplicate Start
    return _issue(dataclasses.replace(state, pending=Step.ADMIT))


def _on_done(state: MigrationState, event: StepDone) -> Result:
    if state.pending is None or event.step is not state.pending:
        return state, ()  # a late result of a step that is no longer pending
    facts = {**state.facts, **event.data} if event.data else state.facts
    if state.phase is Phase.ROLLING_BACK:
        done = state.rollback_done + 1
        if done == len(ROLLBACK_STEPS):
            new = _move(state, Phase.ROLLED_BACK, pending=None, retries=0, rollback_done=done, facts=facts)
            return new, (Finish("rolled_back", disrupted=new.disrupted),)
        return _issue(
            dataclasses.replace(state, pending=ROLLBACK_STEPS[done], retries=0, rollback_done=done, facts=facts)
        )
    reached = next_forward(state.phase, state.shared_storage)
    if reached is Phase.DONE:
        return _move(state, Phase.DONE, pending=None, retries=0, facts=facts), ()
    after = next_forward(reached, state.shared_storage)
    return _issue(_move(state, reached, pending=REACHED_BY[after], retries=0, facts=facts))


def _on_failure(state: MigrationState, failed: Step, error: str, *, retryable: bool) -> Result:
    if state.pending is None or failed is not state.pending:
        return state, ()
    message = f"{failed.value} failed: {error}"
    if state.phase is Phase.REQUESTED:
        return _refuse(state, message, error=error)
    if not is_committed(state.phase) and state.phase is not Phase.ROLLING_BACK:
        vetoed = failed is Step.PRE_HOOKS and not retryable  # a pre-hook said no: a decision, not a disruption
        return _begin_rollback(state, message, disrupted=not vetoed, error=error)
    if retryable and state.retries < state.max_retries:
        return _issue(dataclasses.replace(state, retries=state.retries + 1, error=error))
    tries = state.retries + 1
    detail = f"{message} ({'permanent error' if not retryable else f'{tries} tries, limit reached'})"
    return _stuck(dataclasses.replace(state, error=error), detail)


def _on_cancel(state: MigrationState, reason: str) -> Result:
    if state.phase is Phase.REQUESTED:
        return _refuse(dataclasses.replace(state, cancel_requested=True), f"cancelled before admission: {reason}")
    in_flight_commit = state.pending is Step.COMMIT
    if is_committed(state.phase) or state.phase is Phase.ROLLING_BACK or in_flight_commit:
        # After the commit a cancel cannot undo anything; during the commit its outcome decides; during a rollback
        # the rollback already is the cancel.
        if state.cancel_requested:
            return state, ()
        return dataclasses.replace(state, cancel_requested=True), ()
    return _begin_rollback(
        dataclasses.replace(state, cancel_requested=True), f"cancelled: {reason}", disrupted=False, error=None
    )


def _on_recover(state: MigrationState) -> Result:
    restarts = state.recoveries + 1
    if state.phase is Phase.REQUESTED:
        if state.recoveries >= state.max_recoveries:
            return _refuse(state, f"controller restarted {restarts} times before admission")
        return _issue(dataclasses.replace(state, recoveries=restarts, pending=Step.ADMIT, retries=0))
    if not is_committed(state.phase) and state.phase is not Phase.ROLLING_BACK:
        # The journal says the commit did not happen (it is written in the commit transaction): roll back.
        return _begin_rollback(
            dataclasses.replace(state, recoveries=restarts),
            f"controller restarted during {state.phase.value}",
            disrupted=False,
            error=None,
        )
    if state.recoveries >= state.max_recoveries:
        return _stuck(state, f"controller restarted {restarts} times (limit {state.max_recoveries})")
    if state.phase is Phase.ROLLING_BACK:
        # Restart the rollback from its first step: every step is idempotent, and what ran before the restart is
        # not known for certain.
        return _issue(
            dataclasses.replace(state, recoveries=restarts, pending=ROLLBACK_STEPS[0], rollback_done=0, retries=0)
        )
    return _issue(dataclasses.replace(state, recoveries=restarts))  # roll forward: re-issue the pending step


def _begin_rollback(state: MigrationState, cause: str, *, disrupted: bool, error: str | None) -> Result:
    new = _move(
        state,
        Phase.ROLLING_BACK,
        pending=ROLLBACK_STEPS[0],
        retries=0,
        rollback_from=state.phase,
        rollback_done=0,
        cause=cause,
        disrupted=disrupted,
        error=error if error is not None else state.error,
    )
    return _issue(new)


def _refuse(state: MigrationState, cause: str, *, error: str | None = None) -> Result:
    new = _move(state, Phase.REFUSED, pending=None, retries=0, cause=cause, error=error)
    return new, (Finish("refused"),)


def _stuck(state: MigrationState, detail: str) -> Result:
    direction = "rolling_back" if state.phase is Phase.ROLLING_BACK else "rolling_forward"
    action = (
        "the source may not be running; finish the rollback by hand"
        if direction == "rolling_back"
        else "the VM belongs to the destination; finish the migration forward by hand"
    )
    message = (
        f"migration {state.migration_id} of VM {state.vm_id} ({state.source} → {state.destination}) is stuck in "
        f"{state.phase.value}: {detail}; {action}"
    )
    new = _move(state, Phase.STUCK, pending=None, stuck_at=state.phase, cause=state.cause or detail)
    return new, (RaiseAlarm(kind=f"migration_stuck_{direction}", message=message), Finish("stuck", disrupted=True))
