"""The migration protocol's pure step function: walk-throughs of every path and a stateful property test."""

from __future__ import annotations

import collections
import json

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from ferryman.core.errors import Conflict, InvalidInput
from ferryman.migration.machine import (
    Activate,
    Admit,
    Cancel,
    Command,
    Commit,
    Event,
    Finish,
    KillDestination,
    MigrationState,
    PrepareDestination,
    RaiseAlarm,
    Recover,
    ResumeSource,
    RetireSource,
    RunHooks,
    Scrub,
    Snapshot,
    Start,
    StartMirror,
    StepDone,
    StepFailed,
    SwitchOver,
    Timeout,
    Transfer,
    command_for,
    initial,
    max_commands,
    next_command,
    step,
)
from ferryman.migration.states import (
    COMMITTED_PHASES,
    LOCAL_PATH,
    PRE_COMMIT_PHASES,
    ROLLBACK_STEPS,
    SHARED_PATH,
    TERMINAL,
    TRANSITIONS,
    Phase,
    Step,
    check_transition,
    is_committed,
    is_terminal,
    next_forward,
)

ROLLBACK_COMMANDS = [KillDestination(), Scrub("destination"), ResumeSource(), RunHooks("rollback")]
PRE_COMMIT_STARTED = [p for p in LOCAL_PATH if p in PRE_COMMIT_PHASES and p is not Phase.REQUESTED]
MODES = [False, True]


def modes_and(phases: list[Phase]) -> list[tuple[bool, Phase]]:
    """(shared, phase) pairs, without MIRRORING on shared storage."""
    return [(shared, p) for shared in MODES for p in phases if not (shared and p is Phase.MIRRORING)]


AFTER_COMMIT = [p for p in LOCAL_PATH if p in COMMITTED_PHASES and p is not Phase.DONE]


def new(shared: bool = False, **caps: int) -> MigrationState:
    return initial("m1", "vm1", "host-a", "host-b", shared, **caps)


def drive(state: MigrationState, until: Phase) -> tuple[MigrationState, list[Command]]:
    """Start (if needed) and report every pending step done until ``until`` is reached."""
    commands: list[Command] = []
    if state.pending is None and state.phase is Phase.REQUESTED:
        state, out = step(state, Start())
        commands += out
    for _ in range(len(LOCAL_PATH)):
        if state.phase is until:
            return state, commands
        assert state.pending is not None
        state, out = step(state, StepDone(state.pending))
        commands += out
    raise AssertionError(f"{until} not reached, stopped in {state.phase}")


def finish_rollback(state: MigrationState) -> tuple[MigrationState, list[Command]]:
    commands: list[Command] = []
    while state.phase is Phase.ROLLING_BACK:
        assert state.pending is not None
        state, out = step(state, StepDone(state.pending))
        commands += out
    return state, commands


# ---------------------------------------------------------------------------------------------------- happy paths


def test_local_storage_happy_path_walks_every_phase_and_emits_one_command_per_step():
    """Local storage: thirteen steps, each reaching exactly one phase, mirror included, ending in DONE."""
    state, commands = drive(new(shared=False), Phase.DONE)
    assert commands == [
        Admit(),
        Snapshot(),
        PrepareDestination(),
        RunHooks("pre"),
        StartMirror(),
        Transfer(),
        SwitchOver(),
        Commit(),
        Activate(),
        RetireSource(),
        Scrub("source"),
        RunHooks("post"),
        Finish("done"),
    ]
    assert [c.leads_to for c in commands] == list(LOCAL_PATH[1:])
    assert state.phase is Phase.DONE and state.pending is None and state.committed


def test_shared_storage_skips_the_mirror():
    """Shared storage goes from PRE_HOOKS_PASSED straight to TRANSFERRING and never mirrors."""
    state, all_commands = drive(new(shared=True), Phase.DONE)
    assert StartMirror() not in all_commands
    assert [c.leads_to for c in all_commands] == list(SHARED_PATH[1:])
    state, _ = drive(new(shared=True), Phase.PRE_HOOKS_PASSED)
    assert state.pending is Step.TRANSFER
    state, _ = step(state, StepDone(Step.TRANSFER))
    assert state.phase is Phase.TRANSFERRING


def test_step_data_is_merged_into_facts():
    """What a step reports (snapshot name, ports) accumulates in the state for later steps and the journal."""
    state, _ = drive(new(), Phase.ADMITTED)
    state, _ = step(state, StepDone(Step.SNAPSHOT, {"snapshot": "pre-m1"}))
    state, _ = step(state, StepDone(Step.PREPARE_DESTINATION, {"nbd_port": 10809}))
    assert state.facts == {"snapshot": "pre-m1", "nbd_port": 10809}


# ------------------------------------------------------------------------------------------------------- rollback


@pytest.mark.parametrize(("shared", "phase"), modes_and(PRE_COMMIT_STARTED[:-1]), ids=str)
def test_failure_before_commit_rolls_back_in_order(shared, phase):
    """A failure in any pre-commit phase: kill destination, scrub it, resume source, rollback hooks, ROLLED_BACK."""
    state, _ = drive(new(shared), phase)
    failing = state.pending
    state, commands = step(state, StepFailed(failing, "connection reset", retryable=True))
    assert state.phase is Phase.ROLLING_BACK and state.rollback_from is phase
    assert state.cause == f"{failing.value} failed: connection reset"
    assert commands == (KillDestination(),)
    state, rest = finish_rollback(state)
    assert list(commands) + rest == [*ROLLBACK_COMMANDS, Finish("rolled_back", disrupted=True)]
    assert state.phase is Phase.ROLLED_BACK and not state.committed
    assert rest[-1].attempt_outcome == "disrupted"


def test_commit_failure_rolls_back():
    """A commit the store refused (known not applied) is still before the commit point: it rolls back."""
    state, _ = drive(new(), Phase.SWITCHED_OVER)
    state, commands = step(state, StepFailed(Step.COMMIT, "generation changed", retryable=False))
    assert state.phase is Phase.ROLLING_BACK and commands == (KillDestination(),)


@pytest.mark.parametrize("phase", PRE_COMMIT_STARTED[:-1], ids=str)
def test_cancel_before_commit_rolls_back(phase):
    """Cancel in any phase from ADMITTED to TRANSFERRING rolls back and is not counted as a disruption."""
    state, _ = drive(new(), phase)
    state, commands = step(state, Cancel("operator changed their mind"))
    assert state.phase is Phase.ROLLING_BACK and state.cancel_requested
    assert state.cause == "cancelled: operator changed their mind"
    assert commands == (KillDestination(),)
    state, rest = finish_rollback(state)
    assert rest[-1] == Finish("rolled_back", disrupted=False)
    assert rest[-1].attempt_outcome == "rolled_back"


def test_pre_hook_veto_is_not_a_disruption_but_a_transient_hook_error_is():
    """A permanent pre-hook failure is a veto (rolled_back); a transient one counts as a disruption."""
    state, _ = drive(new(), Phase.DEST_PREPARED)
    vetoed, _ = step(state, StepFailed(Step.PRE_HOOKS, "tenant backup running", retryable=False))
    flaky, _ = step(state, StepFailed(Step.PRE_HOOKS, "hook timed out", retryable=True))
    assert not vetoed.disrupted and flaky.disrupted


def test_failure_before_commit_is_never_retried_inside_the_migration():
    """Even a retryable failure before the commit rolls back at once: a new attempt is the governor's decision."""
    state, _ = drive(new(max_retries=5), Phase.MIRRORING)
    state, commands = step(state, StepFailed(Step.TRANSFER, "blip", retryable=True))
    assert state.phase is Phase.ROLLING_BACK and Transfer() not in commands


def test_timeout_before_commit_rolls_back_as_a_disruption():
    """A step that times out before the commit rolls back, counted as disrupted."""
    state, _ = drive(new(), Phase.TRANSFERRING)
    state, commands = step(state, Timeout(Step.SWITCH_OVER))
    assert state.phase is Phase.ROLLING_BACK and state.disrupted and commands == (KillDestination(),)


def test_admission_failure_and_early_cancel_end_refused_without_touching_hosts():
    """Before admission nothing ran on a host: failure or cancel ends in REFUSED with no rollback command."""
    state, _ = step(new(), Start())
    refused, commands = step(state, StepFailed(Step.ADMIT, "breaker open", retryable=False))
    assert refused.phase is Phase.REFUSED and commands == (Finish("refused"),)
    cancelled, commands = step(new(), Cancel())
    assert cancelled.phase is Phase.REFUSED and cancelled.cancel_requested and commands == (Finish("refused"),)
    timed_out, _ = step(state, Timeout(Step.ADMIT))
    assert timed_out.phase is Phase.REFUSED


def test_rollback_step_failures_are_retried_then_stuck_with_an_alarm():
    """A rollback step retries up to max_retries, then STUCK with an alarm that says which way it was going."""
    state, _ = drive(new(max_retries=2), Phase.TRANSFERRING)
    state, _ = step(state, Cancel())
    state, _ = step(state, StepDone(Step.KILL_DESTINATION))
    for _ in range(2):
        state, commands = step(state, StepFailed(Step.SCRUB_DESTINATION, "disk busy", retryable=True))
        assert state.phase is Phase.ROLLING_BACK and commands == (Scrub("destination"),)
    state, commands = step(state, StepFailed(Step.SCRUB_DESTINATION, "disk busy", retryable=True))
    assert state.phase is Phase.STUCK and state.stuck_at is Phase.ROLLING_BACK and not state.committed
    alarm, finish = commands
    assert isinstance(alarm, RaiseAlarm) and alarm.kind == "migration_stuck_rolling_back"
    assert "m1" in alarm.message and "scrub_destination" in alarm.message
    assert finish == Finish("stuck", disrupted=True)


def test_permanent_rollback_failure_is_stuck_at_once():
    """Retrying a permanent error cannot help: a rollback step failing permanently is STUCK at once."""
    state, _ = drive(new(), Phase.SNAPSHOTTED)
    state, _ = step(state, Cancel())
    state, commands = step(state, StepFailed(Step.KILL_DESTINATION, "no such host", retryable=False))
    assert state.phase is Phase.STUCK and isinstance(commands[0], RaiseAlarm)


# --------------------------------------------------------------------------------------------------- after commit


@pytest.mark.parametrize("phase", AFTER_COMMIT, ids=str)
def test_cancel_after_commit_is_recorded_and_the_migration_goes_forward(phase):
    """After the commit a cancel is only recorded: the machine still reaches DONE and never rolls back."""
    state, _ = drive(new(), phase)
    cancelled, commands = step(state, Cancel())
    assert commands == () and cancelled.phase is phase and cancelled.cancel_requested
    assert step(cancelled, Cancel()) == (cancelled, ())
    done, rest = drive(cancelled, Phase.DONE)
    assert done.phase is Phase.DONE
    assert not any(isinstance(c, KillDestination | ResumeSource) for c in rest)


def test_cancel_while_commit_is_in_flight_lets_the_commit_decide():
    """At SWITCHED_OVER the commit is in flight: a cancel is recorded and the commit's outcome decides."""
    state, _ = drive(new(), Phase.SWITCHED_OVER)
    state, commands = step(state, Cancel())
    assert commands == () and state.phase is Phase.SWITCHED_OVER and state.cancel_requested
    committed, commands = step(state, StepDone(Step.COMMIT))
    assert committed.phase is Phase.COMMITTED and commands == (Activate(),)
    failed, commands = step(state, StepFailed(Step.COMMIT, "serialization failure", retryable=True))
    assert failed.phase is Phase.ROLLING_BACK and commands == (KillDestination(),)


def test_commit_timeout_is_ambiguous_and_ignored():
    """A timed-out commit may or may not have landed: the machine waits for the journal (Recover)."""
    state, _ = drive(new(), Phase.SWITCHED_OVER)
    assert step(state, Timeout(Step.COMMIT)) == (state, ())


@pytest.mark.parametrize("phase", AFTER_COMMIT, ids=str)
def test_retryable_failure_after_commit_retries_the_same_step_then_is_stuck(phase):
    """After the commit a retryable failure re-issues the same step max_retries times, then STUCK + alarm."""
    state, _ = drive(new(max_retries=3), phase)
    pending = state.pending
    for attempt in range(1, 4):
        state, commands = step(state, StepFailed(pending, "agent unreachable", retryable=True))
        assert state.phase is phase and state.retries == attempt and commands == (command_for(pending),)
    state, commands = step(state, StepFailed(pending, "agent unreachable", retryable=True))
    assert state.phase is Phase.STUCK and state.stuck_at is phase and state.committed
    assert isinstance(commands[0], RaiseAlarm) and commands[0].kind == "migration_stuck_rolling_forward"
    assert commands[1] == Finish("stuck", disrupted=True)


def test_retries_reset_when_a_step_succeeds():
    """Each step has its own retry budget."""
    state, _ = drive(new(max_retries=1), Phase.COMMITTED)
    state, _ = step(state, StepFailed(Step.ACTIVATE, "busy", retryable=True))
    state, _ = step(state, StepDone(Step.ACTIVATE))
    assert state.retries == 0
    state, commands = step(state, StepFailed(Step.RETIRE_SOURCE, "busy", retryable=True))
    assert state.phase is Phase.ACTIVATED and commands == (RetireSource(),)


def test_permanent_failure_after_commit_is_stuck_at_once():
    """A permanent error after the commit cannot be retried or undone: STUCK with an alarm."""
    state, _ = drive(new(), Phase.SCRUBBED)
    state, commands = step(state, StepFailed(Step.POST_HOOKS, "validation: canary missing", retryable=False))
    assert state.phase is Phase.STUCK and state.error == "validation: canary missing"
    assert "permanent error" in commands[0].message


def test_timeout_after_commit_is_retried():
    """A step that times out after the commit is retried like a transient failure."""
    state, _ = drive(new(), Phase.COMMITTED)
    state, commands = step(state, Timeout(Step.ACTIVATE))
    assert state.phase is Phase.COMMITTED and state.retries == 1 and commands == (Activate(),)


# ------------------------------------------------------------------------------------------------------- recovery


@pytest.mark.parametrize(("shared", "phase"), modes_and(PRE_COMMIT_STARTED), ids=str)
def test_recover_before_commit_rolls_back_from_the_first_step(shared, phase):
    """After a restart before the commit (SWITCHED_OVER included), recovery rolls back."""
    state, _ = drive(new(shared), phase)
    state, commands = step(state, Recover())
    assert state.phase is Phase.ROLLING_BACK and state.rollback_from is phase and state.recoveries == 1
    assert commands == (KillDestination(),) and not state.disrupted


@pytest.mark.parametrize(("shared", "phase"), modes_and(AFTER_COMMIT), ids=str)
def test_recover_after_commit_rolls_forward_by_reissuing_the_pending_step(shared, phase):
    """After a restart at or after COMMITTED, recovery re-issues the pending command and stays in the phase."""
    state, _ = drive(new(shared), phase)
    expected = next_command(state)
    recovered, commands = step(state, Recover())
    assert recovered.phase is phase and commands == (expected,)
    assert expected is not None and expected.leads_to is next_forward(phase, shared)


def test_recover_in_requested_reruns_admission():
    """Before admission nothing happened on a host: a restart simply asks for admission again."""
    for state in (new(), step(new(), Start())[0]):
        recovered, commands = step(state, Recover())
        assert recovered.phase is Phase.REQUESTED and commands == (Admit(),)


def test_recover_during_rollback_restarts_it_from_the_first_step():
    """A restart mid-rollback replays every (idempotent) rollback step from the start."""
    state, _ = drive(new(), Phase.TRANSFERRING)
    state, _ = step(state, StepFailed(Step.SWITCH_OVER, "peer gone", retryable=True))
    state, _ = step(state, StepDone(Step.KILL_DESTINATION))
    state, _ = step(state, StepDone(Step.SCRUB_DESTINATION))
    state, commands = step(state, Recover())
    assert state.rollback_done == 0 and commands == (KillDestination(),)
    assert state.cause == "switch_over failed: peer gone" and state.disrupted  # the original cause is kept
    state, rest = finish_rollback(state)
    assert state.phase is Phase.ROLLED_BACK and list(commands) + rest[:-1] == ROLLBACK_COMMANDS


def test_repeated_restarts_are_bounded():
    """Each restart counts; past max_recoveries the migration is STUCK (or REFUSED before admission)."""
    state, _ = drive(new(max_recoveries=2), Phase.ACTIVATED)
    for _ in range(2):
        state, commands = step(state, Recover())
        assert commands == (RetireSource(),)
    state, commands = step(state, Recover())
    assert state.phase is Phase.STUCK and "restarted 3 times" in commands[0].message
    early = new(max_recoveries=1)
    early, _ = step(early, Recover())
    early, commands = step(early, Recover())
    assert early.phase is Phase.REFUSED and commands == (Finish("refused"),)
    rolling, _ = drive(new(max_recoveries=1), Phase.SNAPSHOTTED)
    rolling, _ = step(rolling, Recover())
    rolling, commands = step(rolling, Recover())
    assert rolling.phase is Phase.STUCK and rolling.stuck_at is Phase.ROLLING_BACK


# ------------------------------------------------------------------------------------------- stale and impossible


def test_late_and_unrelated_events_are_ignored_without_a_change():
    """A late result of an old step, or an event for another step, returns the same state and no commands."""
    state, _ = drive(new(), Phase.DEST_PREPARED)
    for event in (
        StepDone(Step.SNAPSHOT),
        StepFailed(Step.ADMIT, "late", retryable=False),
        Timeout(Step.TRANSFER),
        StepDone(Step.COMMIT),
        Start(),
    ):
        assert step(state, event) == (state, ())
        assert step(state, event)[0] is state
    assert step(new(), StepDone(Step.ADMIT)) == (new(), ())  # nothing pending before Start


@pytest.mark.parametrize("terminal", sorted(TERMINAL), ids=str)
def test_terminal_states_ignore_every_event(terminal):
    """Nothing moves a terminal state; no event raises."""
    state = MigrationState("m1", "vm1", "a", "b", False, phase=terminal)
    for event in (Start(), StepDone(Step.FINISH), StepFailed(Step.ADMIT, "x", True), Cancel(), Recover()):
        assert step(state, event) == (state, ())


# ---------------------------------------------------------------------------------------------- table and record


def test_transition_table_shape():
    """Commit is a one-way door; REQUESTED never rolls back; terminal phases have no way out."""
    assert all(not is_terminal(a) for a, _ in TRANSITIONS)
    assert not any(a in COMMITTED_PHASES and b in {Phase.ROLLING_BACK, Phase.ROLLED_BACK} for a, b in TRANSITIONS)
    assert (Phase.REQUESTED, Phase.ROLLING_BACK) not in TRANSITIONS
    assert (Phase.PRE_HOOKS_PASSED, Phase.TRANSFERRING) in TRANSITIONS
    assert is_committed(Phase.COMMITTED) and not is_committed(Phase.SWITCHED_OVER)
    assert not is_committed(Phase.ROLLED_BACK) and not is_committed(Phase.STUCK)
    with pytest.raises(Conflict, match="committed → rolling_back"):
        check_transition(Phase.COMMITTED, Phase.ROLLING_BACK)
    with pytest.raises(Conflict, match="terminal"):
        check_transition(Phase.DONE, Phase.ACTIVATED)


def test_every_command_leads_to_the_phase_its_step_reaches():
    """Forward commands name the next phase; rollback commands stay in ROLLING_BACK until the last."""
    assert [command_for(s).leads_to for s in ROLLBACK_STEPS] == [Phase.ROLLING_BACK] * 3 + [Phase.ROLLED_BACK]
    assert Finish("refused").leads_to is Phase.REFUSED and Finish("refused").step is None
    assert RaiseAlarm("k", "m").step is None and RaiseAlarm("k", "m").leads_to is Phase.STUCK


def test_state_record_round_trips_through_json():
    """The journal record of a state reads back to an equal state."""
    state, _ = drive(new(), Phase.TRANSFERRING)
    state, _ = step(state, StepDone(Step.SWITCH_OVER, {"downtime_ms": 41}))
    state, _ = step(state, StepFailed(Step.COMMIT, "conflict", retryable=False))
    record = json.loads(json.dumps(state.to_record()))
    assert record["phase"] == "rolling_back" and record["pending"] == "kill_destination"
    assert MigrationState.from_record(record) == state


def test_bad_record_is_invalid_input():
    """A corrupt journal record is refused with a message naming the problem."""
    record = new().to_record()
    with pytest.raises(InvalidInput, match="unknown field"):
        MigrationState.from_record({**record, "colour": "red"})
    with pytest.raises(InvalidInput, match="bad migration record 'm1'"):
        MigrationState.from_record({**record, "phase": "teleported"})


def test_initial_refuses_a_same_host_migration():
    """Source and destination must differ."""
    with pytest.raises(InvalidInput, match="same host"):
        initial("m1", "vm1", "a", "a", False)


@pytest.mark.parametrize("phase", [Phase.TRANSFERRING, Phase.ACTIVATED], ids=str)
def test_an_adversary_failing_every_step_and_restarting_cannot_keep_the_machine_busy(phase):
    """Failing every pending step and restarting the controller in turn ends in a terminal phase within the bound."""
    state, _ = drive(new(max_retries=3, max_recoveries=3), phase)
    emitted = 0
    for n in range(10_000):
        if is_terminal(state.phase):
            break
        event: Event = Recover() if n % 3 == 2 else StepFailed(state.pending, "reset by peer", retryable=True)
        state, commands = step(state, event)
        emitted += len(commands)
    assert is_terminal(state.phase) and emitted <= max_commands(state)


# ------------------------------------------------------------------------------------------ stateful property test

STEPS = st.sampled_from(list(Step))
DISRUPTIONS = ["start", "stale_done", "failed", "stale_failed", "timeout", "cancel", "recover"]


class MigrationEvents(RuleBasedStateMachine):
    """Random event sequences, including stale, duplicated and impossible ones, against the protocol invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.state = new()
        self.emitted: list[Command] = []
        self.issued_this_run: collections.Counter[Step] = collections.Counter()
        self.commit_done = False  # the commit was reported applied
        self.commit_emitted = False
        self.commit_not_applied = False  # reported failed, or a restart found the journal before COMMITTED
        self.destination_dead = True  # no destination QEMU exists until PrepareDestination is issued

    @initialize(
        shared=st.booleans(),
        max_retries=st.integers(0, 3),
        max_recoveries=st.integers(0, 3),
        head_start=st.integers(-1, len(LOCAL_PATH) - 1),
    )
    def setup(self, shared: bool, max_retries: int, max_recoveries: int, head_start: int) -> None:
        """Begin unstarted (-1) or already driven ``head_start`` steps forward, so every phase gets explored."""
        self.state = new(shared, max_retries=max_retries, max_recoveries=max_recoveries)
        if head_start >= 0:
            self.apply(Start())
        for _ in range(head_start):
            if self.state.pending is not None:
                self.apply(StepDone(self.state.pending))

    def apply(self, event: Event) -> None:
        before = self.state
        after, commands = step(before, event)
        if after.phase is not before.phase:
            assert (before.phase, after.phase) in TRANSITIONS
            self.check_no_backwards(before, after)
        if is_terminal(before.phase):
            assert after is before and commands == ()
        if isinstance(event, Recover):
            self.issued_this_run.clear()
        if before.pending is Step.COMMIT and (
            (isinstance(event, StepFailed) and event.step is Step.COMMIT) or isinstance(event, Recover)
        ):
            self.commit_not_applied = True
        if isinstance(event, StepDone) and event.step is before.pending:
            self.commit_done |= event.step is Step.COMMIT
            self.destination_dead |= event.step is Step.KILL_DESTINATION
        for command in commands:
            self.check_command(command)
        if after.phase is Phase.COMMITTED:
            assert self.commit_done
        if after.phase is Phase.ROLLED_BACK:
            assert not self.commit_done
        self.emitted += commands
        self.state = after

    def check_command(self, command: Command) -> None:
        if command.step is not None:
            self.issued_this_run[command.step] += 1
            assert self.issued_this_run[command.step] <= self.state.max_retries + 1, f"{command} retried too often"
        if isinstance(command, Commit):
            assert not self.commit_emitted, "Commit emitted twice"
            self.commit_emitted = True
        if isinstance(command, KillDestination | ResumeSource):
            assert not self.commit_done, f"{command} after the commit"
            # After Commit was emitted, only a commit known to have failed, or a journal that still says
            # SWITCHED_OVER after a restart (the commit writes COMMITTED in its own transaction), allows it.
            assert not self.commit_emitted or self.commit_not_applied, f"{command} after an unresolved Commit"
        if isinstance(command, ResumeSource) or command == Scrub("destination"):
            assert self.destination_dead, f"{command} before the destination was confirmed dead"
        if isinstance(command, PrepareDestination | KillDestination):
            self.destination_dead = False  # alive, or not yet confirmed dead

    @staticmethod
    def check_no_backwards(before: MigrationState, after: MigrationState) -> None:
        path = LOCAL_PATH
        if before.phase in path and after.phase in path:
            assert path.index(after.phase) > path.index(before.phase), f"{before.phase} → {after.phase}"
        if after.phase in {Phase.ROLLING_BACK, Phase.ROLLED_BACK}:
            assert not before.committed

    @rule(times=st.integers(1, 14))
    def progress(self, times: int) -> None:
        for _ in range(times):
            if self.state.pending is not None:
                self.apply(StepDone(self.state.pending))

    @rule(kind=st.sampled_from(DISRUPTIONS), which=STEPS, retryable=st.booleans())
    def disrupt(self, kind: str, which: Step, retryable: bool) -> None:
        pending = self.state.pending or which
        events: dict[str, Event] = {
            "start": Start(),
            "stale_done": StepDone(which),
            "failed": StepFailed(pending, "boom", retryable),
            "stale_failed": StepFailed(which, "boom", retryable),
            "timeout": Timeout(pending),
            "cancel": Cancel(),
            "recover": Recover(),
        }
        self.apply(events[kind])

    @invariant()
    def pending_matches_phase(self) -> None:
        if is_terminal(self.state.phase):
            assert self.state.pending is None
        elif self.state.phase is not Phase.REQUESTED:
            assert self.state.pending is not None

    @invariant()
    def effort_is_bounded(self) -> None:
        assert len(self.emitted) <= max_commands(self.state)
        assert self.state.retries <= self.state.max_retries
        assert self.state.recoveries <= self.state.max_recoveries + 1

    @invariant()
    def committed_never_rolls_back(self) -> None:
        if self.commit_done:
            assert self.state.committed


MigrationEvents.TestCase.settings = settings(max_examples=800, stateful_step_count=50, deadline=None)
test_migration_event_sequences = MigrationEvents.TestCase
