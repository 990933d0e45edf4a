"""Placement policies as YAML documents: the schema, the parser and every error it can report.

Why it exists: operators write policies by hand, so a mistake must be reported where it is (file, line, field)
together with what is allowed there, and all mistakes of a policy set at once, so ``policy validate`` can list them
in one go. The schema is a set of pydantic models (``extra="forbid"``: a misspelt field is an error, never
silently ignored); line numbers come from the YAML node marks, recorded per mapping key and list item.

What it must not do: read files, know hosts or VMs. :func:`parse_policies` takes file names and texts and returns an
immutable :class:`PolicySet`; checking a set against a fleet is :func:`ferryman.policy.hostrules.unsatisfiable`.

A document (one file may hold several, separated by ``---``)::

    name: acme-production            # [a-z0-9][a-z0-9-]*, unique across the set
    description: "..."
    select: {tenants: [acme], profile: {environment: production}, vms: [web-1]}   # AND of the given fields
                                     # (VM names are per tenant: vms matches them in every tenant selected)
    require: {<rules>}               # hard: a VM violating one is in violation and refused at admission
    prefer: [{weight: 10, <rules>}]  # soft: a host scores the weights of the entries it satisfies
    migration: {allowed_targets: [host-a], cooldown: 10m, auto_balance: false}

Rules: ``min_site_security_level``, ``sites``, ``forbidden_sites``, ``max_vms_per_host``, ``forbidden_neighbours``
(selectors with ``tenants``, ``other_tenant``, ``profile``, ``vms``), ``dedicated_host``,
``min_neighbour_security_level``, ``zones``, ``subnets``, ``virt_types``, ``hypervisors``,
``min_hypervisor_version``, ``min_patch_level``, and ``min_image_version`` (a mapping OS name -> minimum version,
``{debian: "12.8"}``: a VM whose image is of a listed OS must be at least that version, and a VM whose image the
registry does not know breaks it too; it reads the VM alone, so it is allowed under ``require`` only).

Errors::

    InvalidInput
     ├── PolicyError    one mistake: file, line, field (dotted path), problem, allowed
     └── PolicyErrors   all the mistakes of a set (``.errors``), raised by parse_policies
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ferryman.core.errors import InvalidInput
from ferryman.core.models import NAME_RE
from ferryman.policy.versions import Version, VersionError

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]*$"

Loc = tuple[str | int, ...]  # a location in a document: keys and list indices
MAX_NODES = 100_000
"""A policy document expanding to more YAML nodes than this is refused (an alias bomb is a denial of service)."""


# ------------------------------------------------------------------------------------------------------------ errors


class PolicyError(InvalidInput):
    """One mistake in a policy set. ``line`` is 1-based (None when the mistake has no place, e.g. an empty set);
    ``field`` is a dotted path such as ``require.max_vms_per_host`` or ``prefer[0].sites`` ("" for the document)."""

    def __init__(self, file: str, line: int | None, field: str, problem: str, allowed: str) -> None:
        where = f"{file}:{line}" if line is not None else file
        what = f"{field}: " if field else ""
        super().__init__(f"{where}: {what}{problem}; allowed: {allowed}")
        self.file = file
        self.line = line
        self.field = field
        self.problem = problem
        self.allowed = allowed

    def as_dict(self) -> dict[str, Any]:
        """The error as the API and ``policy validate --json`` show it."""
        return {
            "file": self.file,
            "line": self.line,
            "field": self.field,
            "problem": self.problem,
            "allowed": self.allowed,
            "message": str(self),
        }

    def _key(self) -> tuple[str, int | None, str, str, str]:
        return (self.file, self.line, self.field, self.problem, self.allowed)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PolicyError) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


class PolicyErrors(InvalidInput):
    """All the mistakes of a policy set, in file order; ``errors`` is never empty."""

    def __init__(self, errors: Sequence[PolicyError]) -> None:
        count = len(errors)
        lines = "\n".join(str(e) for e in errors)
        super().__init__(f"{count} error{'s' if count != 1 else ''} in the policy set:\n{lines}")
        self.errors: tuple[PolicyError, ...] = tuple(errors)


# ------------------------------------------------------------------------------------------------- value validators


def _fail(text: str) -> PydanticCustomError:
    # The text goes in as a context value so braces in user input are never read as placeholders.
    return PydanticCustomError("policy", "{text}", {"text": text})


def _label(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _fail(f"{value!r} is not a name (quote it if it is one)")
    text = str(value)
    if not text.strip():
        raise _fail("empty name")
    return text


def _profile_values(value: object) -> tuple[str, ...]:
    values = value if isinstance(value, list | tuple) else [value]
    if not values:
        raise _fail("empty list of values")
    return tuple(_label(v) for v in values)


def _os_name(value: object) -> str:
    if isinstance(value, str) and NAME_RE.fullmatch(value):  # the image registry checks an image's OS so
        return value
    hint = " (quote it if it is one)" if not isinstance(value, str) else ""
    raise _fail(f"{value!r} is not an OS name as the image registry spells them{hint}")


def _image_floors(value: object) -> object:
    if not isinstance(value, dict):
        raise _fail(f"{value!r} is not a mapping of OS name to minimum version")
    if not value:
        raise _fail("empty mapping: name at least one OS and its minimum version")
    return value


def _version_text(value: object) -> str:
    if not isinstance(value, str):
        raise _fail(
            f"{value!r} is a {type(value).__name__}, not a version string (YAML reads 7.10 as the number 7.1: quote it)"
        )
    try:
        Version(value)
    except VersionError as err:
        raise _fail(err.message) from None
    return value


_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smh]?)\s*$")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> float:
    """Seconds from ``600``, ``"90s"``, ``"10m"`` or ``"2h"``; raises a pydantic custom error otherwise."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0:
            raise _fail(f"negative duration {value!r}")
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise _fail(f"{value!r} is not a duration")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=63)]
Label = Annotated[str, BeforeValidator(_label)]
Labels = Annotated[tuple[Label, ...], Field(min_length=1)]
ProfileValues = Annotated[tuple[str, ...], BeforeValidator(_profile_values)]
ProfileMatch = Annotated[dict[Label, ProfileValues], Field(min_length=1)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]
Level = Annotated[StrictInt, Field(ge=0)]
VersionText = Annotated[str, BeforeValidator(_version_text)]
OSName = Annotated[str, BeforeValidator(_os_name)]
ImageFloors = Annotated[dict[OSName, VersionText], BeforeValidator(_image_floors)]
Duration = Annotated[float, BeforeValidator(parse_duration)]

_MODEL = ConfigDict(extra="forbid", frozen=True)


# ------------------------------------------------------------------------------------------------------------ models


class VMSelector(BaseModel):
    """Which VMs a policy governs: every given field must match (AND)."""

    model_config = _MODEL

    tenants: Labels | None = None
    profile: ProfileMatch | None = None
    vms: Labels | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> VMSelector:
        if self.tenants is None and self.profile is None and self.vms is None:
            raise _fail("a selector needs at least one field")
        return self


class NeighbourSelector(VMSelector):
    """Which neighbours a ``forbidden_neighbours`` entry forbids; ``other_tenant``: the neighbour's tenant differs
    from the governed VM's."""

    other_tenant: StrictBool = False

    @model_validator(mode="after")
    def _not_empty(self) -> NeighbourSelector:
        if self.tenants is None and self.profile is None and self.vms is None and not self.other_tenant:
            raise _fail("a selector needs at least one field")
        return self


VM_RULE_FIELDS: tuple[str, ...] = ("min_image_version",)
"""Rules that depend on the VM alone (its image), never on the host: allowed under ``require`` only."""


class Rules(BaseModel):
    """The rule vocabulary of ``require`` and of each ``prefer`` entry."""

    model_config = _MODEL

    min_site_security_level: Level | None = None
    sites: Labels | None = None
    forbidden_sites: Labels | None = None
    max_vms_per_host: PositiveInt | None = None
    forbidden_neighbours: Annotated[tuple[NeighbourSelector, ...], Field(min_length=1)] | None = None
    dedicated_host: StrictBool = False
    min_neighbour_security_level: Level | None = None
    zones: Labels | None = None
    subnets: Labels | None = None
    virt_types: Labels | None = None
    hypervisors: Labels | None = None
    min_hypervisor_version: VersionText | None = None
    min_patch_level: Level | None = None
    min_image_version: ImageFloors | None = None

    def is_empty(self) -> bool:
        """Whether no rule is set (``dedicated_host: false`` sets nothing)."""
        return all(getattr(self, name) is None or getattr(self, name) is False for name in RULE_FIELDS)


class Preference(Rules):
    """A soft rule: hosts satisfying every rule of the entry score ``weight``."""

    weight: PositiveInt

    @field_validator(*VM_RULE_FIELDS, mode="before")
    @classmethod
    def _hard_only(cls, value: object) -> object:
        # These rules read the VM alone: every host would score the entry's weight, or none would.
        raise _fail("a rule on the VM alone, which cannot rank hosts: give it under require")

    @model_validator(mode="after")
    def _has_rules(self) -> Preference:
        if self.is_empty():
            raise _fail("a prefer entry needs at least one rule besides weight")
        return self


class MigrationSpec(BaseModel):
    """How VMs a policy governs may be moved."""

    model_config = _MODEL

    allowed_targets: Labels | None = None
    cooldown: Duration = 0.0
    auto_balance: StrictBool = True


class Policy(BaseModel):
    """One policy document."""

    model_config = _MODEL

    name: Name
    description: str = ""
    select: VMSelector
    require: Rules = Rules()
    prefer: tuple[Preference, ...] = ()
    migration: MigrationSpec = MigrationSpec()

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # "require:" with nothing under it is an empty section, not a type error.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (k in _SECTIONS and v is None)}
        return data

    @model_validator(mode="after")
    def _says_something(self) -> Policy:
        if self.require.is_empty() and not self.prefer and self.migration == MigrationSpec():
            raise _fail("the policy sets no rule: give require, prefer or migration")
        return self


_SECTIONS = frozenset({"require", "prefer", "migration"})
RULE_FIELDS: tuple[str, ...] = tuple(Rules.model_fields)
HOST_RULE_FIELDS: tuple[str, ...] = (
    "min_site_security_level",
    "sites",
    "forbidden_sites",
    "zones",
    "subnets",
    "virt_types",
    "hypervisors",
    "min_hypervisor_version",
    "min_patch_level",
)
"""Rules that depend on the host's labels only (the others depend on the VMs on the host)."""

_MODEL_OF_KEY: dict[str, type[BaseModel]] = {
    "select": VMSelector,
    "require": Rules,
    "prefer": Preference,
    "migration": MigrationSpec,
    "forbidden_neighbours": NeighbourSelector,
}

_NAMES = "a non-empty list of {} names"
ALLOWED: dict[str, str] = {
    "name": "lowercase letters, digits and '-', starting with a letter or digit, at most 63 characters",
    "description": "a string",
    "select": "a mapping with tenants, profile and/or vms",
    "tenants": _NAMES.format("tenant"),
    "profile": "a mapping of profile label to a value or a list of values",
    "vms": _NAMES.format("VM"),
    "other_tenant": "true or false",
    "min_site_security_level": "an integer ≥ 0",
    "sites": _NAMES.format("site"),
    "forbidden_sites": _NAMES.format("site"),
    "max_vms_per_host": "an integer ≥ 1",
    "forbidden_neighbours": "a non-empty list of selectors with tenants, other_tenant, profile and/or vms",
    "dedicated_host": "true or false",
    "min_neighbour_security_level": "an integer ≥ 0",
    "zones": _NAMES.format("zone"),
    "subnets": _NAMES.format("subnet"),
    "virt_types": _NAMES.format("virtualisation type"),
    "hypervisors": _NAMES.format("hypervisor"),
    "min_hypervisor_version": 'a quoted version string such as "7.2.0" or "1:7.2+dfsg-7+deb12u6"',
    "min_patch_level": "an integer ≥ 0",
    "min_image_version": 'a non-empty mapping of OS name to quoted minimum version, such as {debian: "12.8"}',
    "weight": "an integer ≥ 1",
    "require": "a mapping of rules: " + ", ".join(RULE_FIELDS),
    "prefer": "a list of mappings, each with a weight and rules: "
    + ", ".join(f for f in RULE_FIELDS if f not in VM_RULE_FIELDS),
    "migration": "a mapping with " + ", ".join(MigrationSpec.model_fields),
    "allowed_targets": _NAMES.format("host"),
    "cooldown": "a duration: whole seconds, or a number with an s, m or h suffix (90s, 10m, 2h)",
    "auto_balance": "true or false",
}


# --------------------------------------------------------------------------------------------------------- the set


@dataclass(frozen=True)
class PolicySource:
    """Where a policy was written: its file, the line of its document and the line of each field (dotted path)."""

    file: str
    line: int
    lines: Mapping[str, int] = field(default_factory=dict)

    def line_of(self, field_path: str) -> int:
        """The line of ``field_path``, or of its closest written ancestor."""
        path = field_path
        while path:
            if path in self.lines:
                return self.lines[path]
            path = _LAST_PART.sub("", path)
        return self.line


_LAST_PART = re.compile(r"(\.[^.\[]+|\[[0-9]+\]|^[^.\[]+)$")


class PolicySet:
    """An immutable, validated set of policies with unique names, in the order they were written."""

    def __init__(self, policies: Sequence[Policy], sources: Mapping[str, PolicySource] | None = None) -> None:
        names = [p.name for p in policies]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise InvalidInput(f"duplicate policy names: {', '.join(dup)}")
        self._policies = tuple(policies)
        self._by_name = {p.name: p for p in self._policies}
        self._sources = dict(sources or {})

    @property
    def policies(self) -> tuple[Policy, ...]:
        return self._policies

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    def __getitem__(self, name: str) -> Policy:
        return self._by_name[name]

    def get(self, name: str) -> Policy | None:
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Policy]:
        return iter(self._policies)

    def __len__(self) -> int:
        return len(self._policies)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PolicySet) and self._policies == other._policies

    def __hash__(self) -> int:
        return hash(self._policies)

    def __repr__(self) -> str:
        return f"PolicySet({', '.join(self._by_name)})"

    def source(self, name: str) -> PolicySource:
        """Where policy ``name`` was written (``<memory>`` line 1 for policies built in code)."""
        self._by_name[name]  # KeyError for an unknown name
        return self._sources.get(name, PolicySource("<memory>", 1))

    def to_documents(self) -> list[dict[str, Any]]:
        """Plain JSON-able documents (defaults left out), for storage and ``policy show``; parsing their YAML gives
        back an equal set."""
        return [p.model_dump(mode="json", exclude_defaults=True) for p in self._policies]

    def to_yaml(self) -> str:
        """All documents as one multi-document YAML text."""
        return yaml.safe_dump_all(self.to_documents(), sort_keys=False, allow_unicode=True)


def parse_policies(texts: Mapping[str, str]) -> PolicySet:
    """Parse and validate policy files (file name → YAML text). Raises :class:`PolicyErrors` with every mistake.
    No files, or files without documents, give an empty set (no policy governs any VM)."""
    policies, sources, errors = _parse(texts)
    if errors:
        raise PolicyErrors(errors)
    return PolicySet(policies, sources)


def check_policies(texts: Mapping[str, str]) -> list[PolicyError]:
    """Every mistake of a policy set (empty: valid), for ``policy validate``."""
    return _parse(texts)[2]


# ---------------------------------------------------------------------------------------------------------- parsing


def _parse(texts: Mapping[str, str]) -> tuple[list[Policy], dict[str, PolicySource], list[PolicyError]]:
    policies: list[Policy] = []
    sources: dict[str, PolicySource] = {}
    errors: list[PolicyError] = []
    seen: dict[str, PolicySource] = {}
    for file, text in texts.items():
        for data, lines, doc_errors in _documents(file, text):
            errors.extend(doc_errors)
            if data is None:
                continue
            source = PolicySource(file, lines[()], {_dotted(p): n for p, n in lines.items() if p})
            name = data.get("name")
            if isinstance(name, str) and name in seen:
                first = seen[name]
                errors.append(
                    PolicyError(
                        file,
                        source.line_of("name"),
                        "name",
                        f"duplicate policy name {name!r}",
                        f"a name not used by another policy (first defined at {first.file}:{first.line})",
                    )
                )
                continue
            if isinstance(name, str):
                seen[name] = source
            policy = _validate(file, data, lines, errors)
            if policy is None:
                continue
            errors.extend(_contradictions(policy, source))
            policies.append(policy)
            sources[policy.name] = source
    return policies, sources, errors


def _documents(file: str, text: str) -> Iterator[tuple[Any, dict[Loc, int], list[PolicyError]]]:
    """Each non-empty YAML document of ``text`` with its line map; a syntax error ends the file."""
    try:
        loader = yaml.SafeLoader(text)  # the reader refuses control characters here already
    except yaml.reader.ReaderError as err:
        at_line = text.count("\n", 0, err.position) + 1
        problem = f"YAML syntax error: {str(err).splitlines()[0]}"
        yield None, {}, [PolicyError(file, at_line, "", problem, "valid YAML")]
        return
    try:
        while True:
            try:
                if not loader.check_node():
                    return
                node = loader.get_node()
                if node is None:
                    continue
                if _expanded_size(node, {}) > MAX_NODES:
                    problem = f"the document expands to more than {MAX_NODES:,} YAML nodes (through aliases?)"
                    yield None, {}, [PolicyError(file, node.start_mark.line + 1, "", problem, "a smaller document")]
                    continue
                lines: dict[Loc, int] = {}
                dups: list[PolicyError] = []
                _record_lines(file, node, (), lines, dups)
                data = loader.construct_document(node)
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
                problem = getattr(err, "problem", None) or str(err)
                line = mark.line + 1 if mark is not None else None
                yield None, {}, [PolicyError(file, line, "", f"YAML syntax error: {problem}", "valid YAML")]
                return
            except RecursionError:
                yield None, {}, [PolicyError(file, None, "", "YAML nested too deeply", "a policy document")]
                return
            if data is None:
                continue
            if not isinstance(data, dict):
                error = PolicyError(
                    file, lines[()], "", f"a policy document must be a mapping, got {type(data).__name__}", "a mapping"
                )
                yield None, lines, [*dups, error]
                continue
            yield data, lines, dups
    finally:
        loader.dispose()


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


def _record_lines(file: str, node: yaml.Node, path: Loc, lines: dict[Loc, int], dups: list[PolicyError]) -> None:
    """Record the 1-based line of every mapping key and list item under ``node``; report duplicate keys."""
    if not path:
        lines[()] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str | int] = set()
        for key_node, value_node in node.value:
            key: str | int = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            child = (*path, key)
            if key in seen:
                dups.append(
                    PolicyError(file, key_node.start_mark.line + 1, _dotted(child), "duplicate key", "each key once")
                )
            seen.add(key)
            lines[child] = key_node.start_mark.line + 1
            _record_lines(file, value_node, child, lines, dups)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*path, index)
            lines[child] = item.start_mark.line + 1
            _record_lines(file, item, child, lines, dups)


def _validate(file: str, data: dict[str, Any], lines: Mapping[Loc, int], errors: list[PolicyError]) -> Policy | None:
    try:
        return Policy.model_validate(data)
    except ValidationError as err:
        for item in err.errors(include_url=False):
            loc: Loc = tuple(item["loc"])
            errors.append(_error_of(file, item, loc, lines))
        return None


def _error_of(file: str, item: Any, loc: Loc, lines: Mapping[Loc, int]) -> PolicyError:
    kind = item["type"]
    if len(loc) >= 2 and loc[-1] == "[key]":  # a mapping key is wrong: point at the key (as YAML spells it)
        loc = (*loc[:-2], str(loc[-2]))
    line = _line_of(loc, lines)
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed_fields = [f for f in model.model_fields if not (model is Preference and f in VM_RULE_FIELDS)]
        close = difflib.get_close_matches(str(loc[-1]), allowed_fields, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return PolicyError(file, line, _dotted(loc), f"unknown field{hint}", ", ".join(allowed_fields))
    if kind == "missing":
        return PolicyError(file, line, _dotted(loc), "required field missing", _allowed_at(loc))
    if kind == "policy":
        return PolicyError(file, line, _dotted(loc), str(item["msg"]), _allowed_at(loc))
    message = str(item["msg"])
    problem = f"invalid value {item.get('input')!r} ({message[:1].lower()}{message[1:]})"
    return PolicyError(file, line, _dotted(loc), problem, _allowed_at(loc))


def _line_of(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _model_at(path: Loc) -> type[BaseModel]:
    for part in reversed(path):
        if isinstance(part, str) and part in _MODEL_OF_KEY:
            return _MODEL_OF_KEY[part]
    return Policy


def _allowed_at(loc: Loc) -> str:
    keys = [part for part in loc if isinstance(part, str)]
    if len(keys) >= 2 and keys[-2] == "profile":
        return "a profile value (a string) or a non-empty list of them"
    if len(keys) >= 2 and keys[-2] == "min_image_version":
        return 'an OS name (lowercase letters, digits and "-") and a quoted version such as "12.8"'
    if keys and keys[-1] in VM_RULE_FIELDS and "prefer" in keys:
        return "rules that depend on the host: " + ", ".join(f for f in RULE_FIELDS if f not in VM_RULE_FIELDS)
    if keys and keys[-1] in ALLOWED:
        return ALLOWED[keys[-1]]
    if not keys:
        return "a policy document with " + ", ".join(Policy.model_fields)
    return "see the policy reference"


def _dotted(path: Loc) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


# ---------------------------------------------------------------------------------------------------- contradictions

_LISTED = ("sites", "zones", "subnets", "virt_types", "hypervisors")


def _contradictions(policy: Policy, source: PolicySource) -> list[PolicyError]:
    """Rules of one policy that cannot all hold, or can never matter, whatever the fleet."""
    found: list[tuple[str, str, str]] = []
    sections: list[tuple[str, Rules]] = [("require", policy.require)]
    sections += [(f"prefer[{i}]", entry) for i, entry in enumerate(policy.prefer)]
    for where, rules in sections:
        found += _inner_contradictions(policy, where, rules)
    for i, entry in enumerate(policy.prefer):
        found += _preference_against_requirement(f"prefer[{i}]", entry, policy.require)
    return [
        PolicyError(source.file, source.line_of(field_path), field_path, problem, allowed)
        for field_path, problem, allowed in found
    ]


def _inner_contradictions(policy: Policy, where: str, rules: Rules) -> list[tuple[str, str, str]]:
    found: list[tuple[str, str, str]] = []
    if rules.sites is not None and rules.forbidden_sites is not None:
        left = set(rules.sites) - set(rules.forbidden_sites)
        if not left:
            found.append(
                (
                    f"{where}.forbidden_sites",
                    f"forbids every site listed in sites ({', '.join(rules.sites)}): no site is left",
                    "sites not listed in sites, or fewer forbidden sites",
                )
            )
    own = set(policy.select.tenants or ())
    for i, selector in enumerate(rules.forbidden_neighbours or ()):
        path = f"{where}.forbidden_neighbours[{i}]"
        tenants = set(selector.tenants or ())
        if selector.other_tenant and own and len(own) == 1 and tenants and tenants <= own:
            found.append(
                (
                    path,
                    f"can never match: other_tenant excludes {', '.join(sorted(own))}, the only tenant it lists",
                    "a selector that some other tenant's VM can match",
                )
            )
        only_tenants = selector.profile is None and selector.vms is None and not selector.other_tenant
        if rules.dedicated_host and own and only_tenants and own <= tenants:
            found.append(
                (
                    path,
                    "dedicated_host admits only neighbours of the VM's own tenant and this entry forbids them too",
                    "max_vms_per_host: 1 to ask for a host of its own",
                )
            )
    return found


def _preference_against_requirement(where: str, entry: Preference, require: Rules) -> list[tuple[str, str, str]]:
    found: list[tuple[str, str, str]] = []
    for name in _LISTED:
        preferred, required = getattr(entry, name), getattr(require, name)
        if preferred is not None and required is not None and not set(preferred) & set(required):
            found.append(
                (
                    f"{where}.{name}",
                    f"can never be satisfied: require.{name} allows only {', '.join(required)}",
                    f"values among require.{name}",
                )
            )
    forbidden = set(require.forbidden_sites or ())
    if entry.sites is not None and forbidden and set(entry.sites) <= forbidden:
        found.append(
            (
                f"{where}.sites",
                "can never be satisfied: every site it prefers is in require.forbidden_sites",
                "sites that require.forbidden_sites does not list",
            )
        )
    return found
