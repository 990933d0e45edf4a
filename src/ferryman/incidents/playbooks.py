"""Incident playbooks: what happens to a VM per incident severity, written in YAML and versioned like policies.

Why it exists: the response to an incident (record it, capture evidence, analyse the impact, isolate the network,
quarantine-migrate, pause) is an operator's decision made in advance, reviewed like code, and applied the same way
every time. A playbook is parsed once into an immutable :class:`Playbook` whose :attr:`Playbook.digest` (SHA-256 of
its canonical form) names exactly what ran, for the incident timeline and the audit log. Mistakes are reported where
they are written, all at once: ``file:line: field: problem`` (:class:`PlaybookErrors`).

What it must not do: read files, run steps or know VMs. Running steps, persisting each before its side effect and
resuming after a restart belongs to the controller; the CMDB stores playbook versions as it stores policy versions.

A document (one per file)::

    name: default                 # lowercase letters, digits and '-'
    version: 3                    # optional: the operator's own number (an integer >= 1)
    description: "..."            # optional
    quarantine_role: quarantine   # optional (default quarantine): the host role quarantine migrates to
    reserve: 1                    # optional (default 1): quarantines that must always fit (capacity kept free)
    severities:                   # all four, each a non-empty list of steps, run in order
      low: [record]
      medium: [capture, impact]
      high: [capture, isolate, quarantine, impact]
      critical: [{capture: {memory: true, disks: true}}, pause, isolate, impact]

Steps: ``record`` (open or update the incident, nothing else), ``capture`` (forensic capture from the hypervisor;
options ``memory`` and ``disks``, both true by default, at least one true), ``impact`` (present and past neighbours),
``isolate`` (network isolation), ``quarantine`` (secure migration to a ``quarantine_role`` host), ``pause``. A step
is a bare name, or a one-key mapping ``{capture: {...}}`` for options (only capture takes any).

Rules, each reported with its line:

* every severity is present (no silent default: a playbook that forgets ``critical`` is a mistake) and no list is
  empty (``[record]`` is the explicit "do nothing more");
* a step at most once per severity;
* ``quarantine`` only after ``isolate`` in the same list: the VM is cut off before it moves, so it cannot act during
  the migration;
* ``pause`` only after ``capture``: evidence of the running guest is taken before it is stopped (a pause without a
  capture is containment that destroys nothing but also records nothing);
* ``quarantine_role`` is a role name other than ``compute`` (quarantine hosts must be kept free of normal placements),
  ``reserve`` an integer from 0 to :data:`MAX_RESERVE`.

The canonical form (:meth:`Playbook.to_document`) writes a capture with default options as the bare name, omits
unset optional fields and sorts keys, so ``capture`` and ``{capture: {memory: true, disks: true}}`` have one digest,
and a change in any step, option or order gives another.
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from ferryman.core.errors import InvalidInput
from ferryman.core.models import NAME_RE
from ferryman.incidents.alerts import IncidentSeverity

__all__ = [
    "DEFAULT_PLAYBOOK",
    "DEFAULT_PLAYBOOK_YAML",
    "MAX_RESERVE",
    "CaptureOptions",
    "Playbook",
    "PlaybookErrors",
    "PlaybookProblem",
    "Step",
    "StepKind",
    "check_playbook",
    "parse_playbook",
]

MAX_TEXT = 256 * 1024
"""A playbook file larger than this is refused before it is parsed."""
MAX_NODES = 10_000
"""A document expanding to more YAML nodes than this (through aliases) is refused."""
MAX_RESERVE = 1000

Loc = tuple[str | int, ...]
_MISSING: Any = object()


class StepKind(enum.StrEnum):
    RECORD = "record"
    CAPTURE = "capture"
    IMPACT = "impact"
    ISOLATE = "isolate"
    QUARANTINE = "quarantine"
    PAUSE = "pause"


STEP_NAMES: tuple[str, ...] = tuple(k.value for k in StepKind)
_REQUIRES_EARLIER: dict[StepKind, tuple[StepKind, str]] = {
    StepKind.QUARANTINE: (StepKind.ISOLATE, "a VM is isolated before it is quarantine-migrated"),
    StepKind.PAUSE: (StepKind.CAPTURE, "evidence of the running guest is captured before it is paused"),
}
_FIELDS = ("name", "version", "description", "quarantine_role", "reserve", "severities")
_SEVERITIES: tuple[str, ...] = tuple(s.value for s in IncidentSeverity)
_CAPTURE_OPTIONS = ("memory", "disks")


@dataclass(frozen=True)
class CaptureOptions:
    """What a ``capture`` step takes: the memory (``dump-guest-memory``) and/or a snapshot of every disk."""

    memory: bool = True
    disks: bool = True

    def __post_init__(self) -> None:
        if not (self.memory or self.disks):
            raise InvalidInput("a capture must take the memory, the disks or both")


@dataclass(frozen=True)
class Step:
    """One step of a playbook. ``capture`` is set for (and only for) a capture step; it defaults to both."""

    kind: StepKind
    capture: CaptureOptions | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", StepKind(self.kind))
        if self.kind is StepKind.CAPTURE and self.capture is None:
            object.__setattr__(self, "capture", CaptureOptions())
        elif self.kind is not StepKind.CAPTURE and self.capture is not None:
            raise InvalidInput(f"step {self.kind.value} takes no capture options")

    def to_document(self) -> str | dict[str, Any]:
        """The canonical YAML form: the bare name unless a capture has non-default options."""
        if self.capture is None or self.capture == CaptureOptions():
            return self.kind.value
        return {self.kind.value: {"memory": self.capture.memory, "disks": self.capture.disks}}


def _order_problems(steps: Sequence[StepKind]) -> list[tuple[int, str]]:
    """(index, problem) for each step of one severity's list that breaks an ordering rule or repeats."""
    found: list[tuple[int, str]] = []
    first: dict[StepKind, int] = {}
    for index, kind in enumerate(steps):
        if kind in first:
            found.append((index, f"step {kind.value} repeated (first as item {first[kind]})"))
            continue
        first[kind] = index
        needed = _REQUIRES_EARLIER.get(kind)
        if needed is not None and needed[0] not in first:
            found.append((index, f"{kind.value} must come after {needed[0].value} in the same list: {needed[1]}"))
    return found


@dataclass(frozen=True)
class Playbook:
    """A validated playbook. Building one in code applies the same rules as parsing (InvalidInput, no lines)."""

    name: str
    low: tuple[Step, ...]
    medium: tuple[Step, ...]
    high: tuple[Step, ...]
    critical: tuple[Step, ...]
    version: int | None = None
    description: str = ""
    quarantine_role: str = "quarantine"
    reserve: int = 1
    digest: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        problems = [f"name: {p}" for p in _name_problems(self.name)]
        problems += [f"version: {p}" for p in _version_problems(self.version)]
        problems += [f"quarantine_role: {p}" for p in _role_problems(self.quarantine_role)]
        problems += [f"reserve: {p}" for p in _reserve_problems(self.reserve)]
        for severity in IncidentSeverity:
            steps = tuple(getattr(self, severity.value))
            object.__setattr__(self, severity.value, steps)
            if not steps:
                problems.append(f"severities.{severity.value}: no steps (give at least record)")
            kinds = [s.kind for s in steps]
            problems += [f"severities.{severity.value}[{i}]: {p}" for i, p in _order_problems(kinds)]
        if problems:
            raise InvalidInput(f"invalid playbook {self.name!r}: " + "; ".join(problems))
        canonical = json.dumps(self.to_document(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        object.__setattr__(self, "digest", "sha256:" + hashlib.sha256(canonical.encode()).hexdigest())

    def steps_for(self, severity: IncidentSeverity) -> tuple[Step, ...]:
        """The steps to run, in order, for an incident of ``severity``."""
        steps: tuple[Step, ...] = getattr(self, IncidentSeverity(severity).value)
        return steps

    def uses(self, kind: StepKind) -> bool:
        """Whether any severity runs a step of ``kind`` (e.g. whether quarantine capacity matters)."""
        return any(step.kind is kind for severity in IncidentSeverity for step in self.steps_for(severity))

    def to_document(self) -> dict[str, Any]:
        """The canonical plain document; parsing its YAML gives back an equal playbook with the same digest."""
        document: dict[str, Any] = {"name": self.name}
        if self.version is not None:
            document["version"] = self.version
        if self.description:
            document["description"] = self.description
        document["quarantine_role"] = self.quarantine_role
        document["reserve"] = self.reserve
        document["severities"] = {
            severity.value: [step.to_document() for step in self.steps_for(severity)] for severity in IncidentSeverity
        }
        return document

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_document(), sort_keys=False, allow_unicode=True)


# ------------------------------------------------------------------------------------------------------------ errors


@dataclass(frozen=True)
class PlaybookProblem:
    """One mistake: ``line`` is 1-based (None when it has no place, e.g. an empty file); ``field`` a dotted path
    such as ``severities.high[2]`` ("" for the document)."""

    file: str
    line: int | None
    field: str
    problem: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.field}: {self.problem}" if self.field else f"{where}: {self.problem}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "field": self.field,
            "problem": self.problem,
            "message": str(self),
        }


class PlaybookErrors(InvalidInput):
    """Every mistake of a playbook file, in line order; ``problems`` is never empty."""

    def __init__(self, problems: Sequence[PlaybookProblem]) -> None:
        count = len(problems)
        lines = "\n".join(str(p) for p in problems)
        super().__init__(f"{count} error{'s' if count != 1 else ''} in the playbook:\n{lines}")
        self.problems: tuple[PlaybookProblem, ...] = tuple(problems)


# ------------------------------------------------------------------------------------------------- field validation


def _name_problems(value: object) -> list[str]:
    if isinstance(value, str) and NAME_RE.fullmatch(value):
        return []
    return [f"{_show(value)} is not a name; allowed: 1-63 lowercase letters, digits and '-', alphanumeric at both ends"]


def _version_problems(value: object) -> list[str]:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return []
    return [f"{_show(value)} is not a version; allowed: an integer >= 1"]


def _role_problems(value: object) -> list[str]:
    if not (isinstance(value, str) and NAME_RE.fullmatch(value)):
        return [f"{_show(value)} is not a host role; allowed: lowercase letters, digits and '-'"]
    if value == "compute":
        return ["compute hosts take normal placements; allowed: a role kept free for quarantine, such as quarantine"]
    return []


def _reserve_problems(value: object) -> list[str]:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_RESERVE:
        return []
    return [f"{_show(value)} is not a reserve; allowed: an integer from 0 to {MAX_RESERVE}"]


def _show(value: object) -> str:
    text = repr(value) if isinstance(value, str | int | float | bool) or value is None else type(value).__name__
    return text if len(text) <= 40 else text[:39] + "…"


def _unknown(value: str, allowed: Sequence[str], what: str) -> str:
    close = difflib.get_close_matches(value, allowed, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown {what} {_show(value)}{hint}; allowed: {', '.join(allowed)}"


# ----------------------------------------------------------------------------------------------------------- parsing


def parse_playbook(text: str, filename: str) -> Playbook:
    """The playbook written in ``text`` (read from ``filename``, named in errors); :class:`PlaybookErrors` listing
    every mistake otherwise."""
    playbook, problems = _parse(text, filename)
    if problems or playbook is None:
        raise PlaybookErrors(problems or [PlaybookProblem(filename, None, "", "not a playbook")])
    return playbook


def check_playbook(text: str, filename: str) -> list[PlaybookProblem]:
    """Every mistake of a playbook file (empty: valid)."""
    return _parse(text, filename)[1]


class _Problems:
    def __init__(self, file: str, lines: Mapping[Loc, int]) -> None:
        self.file = file
        self.lines = lines
        self._found: list[tuple[tuple[int, tuple[int, ...]], PlaybookProblem]] = []

    def add(self, loc: Loc, problem: str, line: int | None = None) -> None:
        line = line if line is not None else _line_of(loc, self.lines)
        # file order: by line, then by list index (flow-style items share a line), then as found (a stable sort)
        order = (line or 0, tuple(p if isinstance(p, int) else -1 for p in loc))
        self._found.append((order, PlaybookProblem(self.file, line, _dotted(loc), problem)))

    @property
    def found(self) -> list[PlaybookProblem]:
        return [problem for _, problem in sorted(self._found, key=lambda item: item[0])]


def _parse(text: str, file: str) -> tuple[Playbook | None, list[PlaybookProblem]]:
    loaded = _load(text, file)
    if isinstance(loaded, list):
        return None, loaded
    data, lines, duplicates = loaded
    out = _Problems(file, lines)
    for loc, line in duplicates:
        out.add(loc, "duplicate key", line)
    if not isinstance(data, dict):
        out.add((), f"a playbook is a mapping with {', '.join(_FIELDS)}, got {_kind(data)}")
        return None, out.found
    for key in data:
        if key not in _FIELDS:
            out.add((str(key),), _unknown(str(key), _FIELDS, "field"))
    for name, check, default in (
        ("name", _name_problems, _MISSING),
        ("version", _version_problems, None),
        ("quarantine_role", _role_problems, "quarantine"),
        ("reserve", _reserve_problems, 1),
    ):
        value = data.get(name, default)
        if value is _MISSING:
            out.add((name,), "required field missing")
            continue
        for problem in check(value):
            out.add((name,), problem)
    description = data.get("description", "")
    if not isinstance(description, str):
        out.add(("description",), f"expected a string, got {_kind(description)}")
    plan = _severities(data.get("severities", _MISSING), out)
    if out.found or plan is None:
        return None, out.found
    return Playbook(
        name=data["name"],
        version=data.get("version"),
        description=description,
        quarantine_role=data.get("quarantine_role", "quarantine"),
        reserve=data.get("reserve", 1),
        **plan,
    ), []


def _severities(value: object, out: _Problems) -> dict[str, tuple[Step, ...]] | None:
    if value is _MISSING:
        out.add(("severities",), f"required field missing; give steps for each of {', '.join(_SEVERITIES)}")
        return None
    if not isinstance(value, dict):
        out.add(("severities",), f"expected a mapping of severity to steps, got {_kind(value)}")
        return None
    for key in value:
        if key not in _SEVERITIES:
            out.add(("severities", str(key)), _unknown(str(key), _SEVERITIES, "severity"))
    plan: dict[str, tuple[Step, ...]] = {}
    for severity in _SEVERITIES:
        loc: Loc = ("severities", severity)
        if severity not in value:
            out.add(loc, "required severity missing (every severity needs its steps)")
            continue
        items = value[severity]
        if not isinstance(items, list):
            out.add(loc, f"expected a list of steps such as [record], got {_kind(items)}")
            continue
        if not items:
            out.add(loc, "no steps; allowed: a non-empty list (give [record] to do nothing more than record)")
            continue
        steps = [_step(item, (*loc, index), out) for index, item in enumerate(items)]
        kinds = [(i, s.kind) for i, s in enumerate(steps) if s is not None]
        for position, problem in _order_problems([kind for _, kind in kinds]):
            out.add((*loc, kinds[position][0]), problem)
        plan[severity] = tuple(s for s in steps if s is not None)
    return plan if len(plan) == len(_SEVERITIES) else None


def _step(item: object, loc: Loc, out: _Problems) -> Step | None:
    if isinstance(item, str):
        if item not in STEP_NAMES:
            out.add(loc, _unknown(item, STEP_NAMES, "step"))
            return None
        return Step(StepKind(item))
    if isinstance(item, dict) and len(item) == 1:
        ((name, options),) = item.items()
        if not isinstance(name, str) or name not in STEP_NAMES:
            out.add(loc, _unknown(str(name), STEP_NAMES, "step"))
            return None
        kind = StepKind(name)
        if kind is not StepKind.CAPTURE:
            if options not in (None, {}):
                out.add(
                    (*loc, name), f"step {name} takes no options; only capture does ({', '.join(_CAPTURE_OPTIONS)})"
                )
                return None
            return Step(kind)
        return _capture((*loc, name), options, out)
    allowed = "a step name or a one-key mapping such as {capture: {memory: true, disks: true}}"
    out.add(loc, f"expected {allowed}, got {_kind(item)}")
    return None


def _capture(loc: Loc, options: object, out: _Problems) -> Step | None:
    if options is None:
        return Step(StepKind.CAPTURE)
    if not isinstance(options, dict):
        out.add(loc, f"expected a mapping of capture options ({', '.join(_CAPTURE_OPTIONS)}), got {_kind(options)}")
        return None
    ok = True
    for key, value in options.items():
        if key not in _CAPTURE_OPTIONS:
            out.add((*loc, str(key)), _unknown(str(key), _CAPTURE_OPTIONS, "capture option"))
            ok = False
        elif not isinstance(value, bool):
            out.add((*loc, key), f"expected true or false, got {_show(value)}")
            ok = False
    if not ok:
        return None
    memory, disks = options.get("memory", True), options.get("disks", True)
    if not (memory or disks):
        out.add(loc, "captures nothing; allowed: memory, disks or both true")
        return None
    return Step(StepKind.CAPTURE, CaptureOptions(memory=memory, disks=disks))


def _kind(value: object) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}
    return "nothing" if value is None else names.get(type(value), type(value).__name__)


# -------------------------------------------------------------------------------------------------------- YAML lines


def _load(text: str, file: str) -> tuple[object, dict[Loc, int], list[tuple[Loc, int]]] | list[PlaybookProblem]:
    """The document of ``text``, the line of every key and list item, and where keys are repeated; or the problems
    that kept it from being read at all."""
    if len(text) > MAX_TEXT:
        return [PlaybookProblem(file, None, "", f"{len(text):,} characters, at most {MAX_TEXT:,}")]
    try:
        loader = yaml.SafeLoader(text)  # the reader refuses control characters here already
    except yaml.reader.ReaderError as err:
        line = text.count("\n", 0, err.position) + 1
        return [PlaybookProblem(file, line, "", f"YAML syntax error: {str(err).splitlines()[0]}")]
    try:
        node = loader.get_single_node()
        if node is None:
            return [PlaybookProblem(file, None, "", "empty file: a playbook is a mapping with name and severities")]
        if _expanded_size(node, {}) > MAX_NODES:
            line = node.start_mark.line + 1
            return [PlaybookProblem(file, line, "", f"expands to more than {MAX_NODES:,} YAML nodes (aliases?)")]
        lines: dict[Loc, int] = {(): node.start_mark.line + 1}
        dups: list[tuple[Loc, int]] = []
        for loc, line, duplicate in _walk(node, ()):
            if duplicate:
                dups.append((loc, line))
            else:
                lines[loc] = line
        data = loader.construct_document(node)
    except yaml.YAMLError as err:
        return [_yaml_problem(file, err)]
    except RecursionError:
        return [PlaybookProblem(file, None, "", "YAML nested too deeply")]
    finally:
        loader.dispose()
    return data, lines, dups


def _yaml_problem(file: str, err: yaml.YAMLError) -> PlaybookProblem:
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    parts = [getattr(err, "context", None), getattr(err, "problem", None)]
    problem = " ".join(p for p in parts if p) or str(err).splitlines()[0]
    line = mark.line + 1 if mark is not None else None
    return PlaybookProblem(file, line, "", f"YAML syntax error: {problem}")


def _walk(node: yaml.Node, path: Loc) -> Iterator[tuple[Loc, int, bool]]:
    """(location, 1-based line, is a duplicate key) of every mapping key and list item under ``node``."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            child = (*path, key)
            yield child, key_node.start_mark.line + 1, key in seen
            seen.add(key)
            yield from _walk(value_node, child)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            yield child, item.start_mark.line + 1, False
            yield from _walk(item, child)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many nodes ``node`` stands for once aliases are expanded (each shared node counted once per use)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    size = 1
    if isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, sizes) for item in node.value)
    sizes[id(node)] = size
    return size


def _line_of(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _dotted(path: Loc) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


# ----------------------------------------------------------------------------------------------------------- default

DEFAULT_PLAYBOOK_YAML = """\
# The playbook in force when an operator has set none (issue 12).
name: default
description: "low: record; medium: capture and impact; high: also isolate and quarantine; critical: capture, pause"
quarantine_role: quarantine
reserve: 1
severities:
  low: [record]
  medium: [capture, impact]
  high: [capture, isolate, quarantine, impact]
  critical: [capture, pause, isolate, impact]
"""

DEFAULT_PLAYBOOK: Playbook = parse_playbook(DEFAULT_PLAYBOOK_YAML, "<default>")
