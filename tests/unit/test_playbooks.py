"""Incident playbooks: the default, parsing, canonical digests, and every validation error with its file and line."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferryman.core.errors import InvalidInput
from ferryman.incidents.alerts import IncidentSeverity
from ferryman.incidents.playbooks import (
    DEFAULT_PLAYBOOK,
    DEFAULT_PLAYBOOK_YAML,
    MAX_TEXT,
    CaptureOptions,
    Playbook,
    PlaybookErrors,
    PlaybookProblem,
    Step,
    StepKind,
    check_playbook,
    parse_playbook,
)

R, C, M, ISO, Q, P = (
    StepKind.RECORD,
    StepKind.CAPTURE,
    StepKind.IMPACT,
    StepKind.ISOLATE,
    StepKind.QUARANTINE,
    StepKind.PAUSE,
)

GOOD = """\
name: acme-incidents
version: 4
description: "acme's response"
quarantine_role: quarantine-eu
reserve: 2
severities:
  low: [record]
  medium:
    - capture: {memory: true, disks: false}
    - impact
  high: [capture, isolate, quarantine, impact]
  critical:
    - capture
    - pause
    - isolate
    - impact
"""


def kinds(playbook: Playbook, severity: str) -> list[StepKind]:
    return [step.kind for step in playbook.steps_for(IncidentSeverity(severity))]


def problems(text: str, file: str = "pb.yaml") -> list[str]:
    return [str(p) for p in check_playbook(text, file)]


def with_severities(**lists: str) -> str:
    body = {"low": "[record]", "medium": "[capture, impact]", "high": "[capture, isolate, quarantine]"}
    body |= {"critical": "[capture, pause]"} | lists
    return "name: p\nseverities:\n" + "".join(f"  {k}: {v}\n" for k, v in body.items())


# ---------------------------------------------------------------------------------------------------------- default


def test_default_playbook_matches_the_issue():
    """low: record; medium: capture, impact; high: capture, isolate, quarantine, impact; critical: capture, pause."""
    d = DEFAULT_PLAYBOOK
    assert kinds(d, "low") == [R]
    assert kinds(d, "medium") == [C, M]
    assert kinds(d, "high") == [C, ISO, Q, M]
    assert kinds(d, "critical") == [C, P, ISO, M]
    assert (d.name, d.quarantine_role, d.reserve, d.version) == ("default", "quarantine", 1, None)
    assert d.uses(StepKind.QUARANTINE) and d.uses(StepKind.PAUSE)
    assert parse_playbook(DEFAULT_PLAYBOOK_YAML, "default.yaml") == d


def test_steps_for_accepts_every_severity():
    """steps_for answers for each severity, as the enum or its value."""
    for severity in IncidentSeverity:
        assert DEFAULT_PLAYBOOK.steps_for(severity)
    assert DEFAULT_PLAYBOOK.steps_for("high") == DEFAULT_PLAYBOOK.steps_for(IncidentSeverity.HIGH)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------- parsing


def test_good_playbook_parses_with_options():
    """Fields, step order and capture options are read as written."""
    pb = parse_playbook(GOOD, "acme.yaml")
    assert (pb.name, pb.version, pb.description, pb.quarantine_role, pb.reserve) == (
        "acme-incidents",
        4,
        "acme's response",
        "quarantine-eu",
        2,
    )
    assert pb.medium[0] == Step(StepKind.CAPTURE, CaptureOptions(memory=True, disks=False))
    assert pb.high[0].capture == CaptureOptions(memory=True, disks=True)
    assert pb.high[1].capture is None
    assert kinds(pb, "critical") == [C, P, ISO, M]
    assert check_playbook(GOOD, "acme.yaml") == []


def test_optional_fields_default():
    """version, description, quarantine_role and reserve may be left out."""
    pb = parse_playbook(with_severities(), "p.yaml")
    assert (pb.version, pb.description, pb.quarantine_role, pb.reserve) == (None, "", "quarantine", 1)


def test_capture_options_may_be_partial_or_null():
    """{capture: {disks: false}} keeps memory; {capture: null} and {capture: {}} are the defaults."""
    pb = parse_playbook(
        with_severities(low="[{capture: {disks: false}}]", medium="[{capture: null}, impact]", high="[{capture: {}}]"),
        "p.yaml",
    )
    assert pb.low[0].capture == CaptureOptions(memory=True, disks=False)
    assert pb.medium[0].capture == CaptureOptions()
    assert pb.high[0].capture == CaptureOptions()


# ----------------------------------------------------------------------------------------------------------- digest


def test_digest_is_canonical():
    """Comments, key order, flow or block style and default capture options written out do not change the digest."""
    a = with_severities(high="[capture, isolate, quarantine]")
    b = (
        "# reordered, commented, block style\n"
        "severities:\n"
        "  critical:\n    - {capture: {memory: true, disks: true}}\n    - pause\n"
        "  high: [{capture: {disks: true}}, isolate, quarantine]\n"
        "  medium: [capture, impact]\n"
        "  low: [record]\n"
        "name: p\n"
        "reserve: 1\n"
        "quarantine_role: quarantine\n"
    )
    pa, pb = parse_playbook(a, "a.yaml"), parse_playbook(b, "b.yaml")
    assert pa == pb
    assert pa.digest == pb.digest
    assert pa.digest.startswith("sha256:") and len(pa.digest) == len("sha256:") + 64


@pytest.mark.parametrize(
    "change",
    [
        {"high": "[isolate, capture, quarantine]"},
        {"high": "[{capture: {disks: false}}, isolate, quarantine]"},
        {"low": "[record, impact]"},
        {"critical": "[capture, pause, isolate]"},
    ],
)
def test_digest_changes_with_any_step_option_or_order(change):
    """Reordering, an option, an added step: another digest."""
    assert parse_playbook(with_severities(**change), "x").digest != parse_playbook(with_severities(), "x").digest


def test_digest_covers_the_other_fields_and_is_pinned():
    """name, version, reserve and role are part of the digest; the canonical form of a fixed playbook is pinned."""
    base = parse_playbook(with_severities(), "x")
    for extra in ("version: 2\n", "reserve: 3\n", "quarantine_role: q2\n", "description: d\n"):
        assert parse_playbook(with_severities() + extra, "x").digest != base.digest
    assert base.to_document() == {
        "name": "p",
        "quarantine_role": "quarantine",
        "reserve": 1,
        "severities": {
            "low": ["record"],
            "medium": ["capture", "impact"],
            "high": ["capture", "isolate", "quarantine"],
            "critical": ["capture", "pause"],
        },
    }
    assert (
        base.digest
        == "sha256:"
        + __import__("hashlib")
        .sha256(
            b'{"name":"p","quarantine_role":"quarantine","reserve":1,"severities":{"critical":["capture","pause"],'
            b'"high":["capture","isolate","quarantine"],"low":["record"],"medium":["capture","impact"]}}'
        )
        .hexdigest()
    )


def test_yaml_round_trip_keeps_the_digest():
    """to_yaml parsed back gives an equal playbook with the same digest."""
    pb = parse_playbook(GOOD, "acme.yaml")
    again = parse_playbook(pb.to_yaml(), "again.yaml")
    assert again == pb and again.digest == pb.digest


# ----------------------------------------------------------------------------------------------------------- errors


def test_every_mistake_is_listed_with_its_line():
    """One file with a mistake on most lines: all reported at once, in line order, as file:line: field: problem."""
    text = """\
name: Prod
version: 0
reserv: 2
quarantine_role: compute
severities:
  low: []
  medium: [capture, impact, capture]
  high:
    - capture: {memory: false, disks: false}
    - quarantine
    - isolte
  critical: [pause, capture, {isolate: {now: true}}, {capture: {memry: true}}]
  severe: [record]
"""
    with pytest.raises(PlaybookErrors) as info:
        parse_playbook(text, "pb.yaml")
    err = info.value
    assert isinstance(err, InvalidInput)
    assert [str(p) for p in err.problems] == [
        "pb.yaml:1: name: 'Prod' is not a name; allowed: 1-63 lowercase letters, digits and '-', alphanumeric at "
        "both ends",
        "pb.yaml:2: version: 0 is not a version; allowed: an integer >= 1",
        "pb.yaml:3: reserv: unknown field 'reserv' (did you mean reserve?); allowed: name, version, description, "
        "quarantine_role, reserve, severities",
        "pb.yaml:4: quarantine_role: compute hosts take normal placements; allowed: a role kept free for "
        "quarantine, such as quarantine",
        "pb.yaml:6: severities.low: no steps; allowed: a non-empty list (give [record] to do nothing more than record)",
        "pb.yaml:7: severities.medium[2]: step capture repeated (first as item 0)",
        "pb.yaml:9: severities.high[0].capture: captures nothing; allowed: memory, disks or both true",
        "pb.yaml:10: severities.high[1]: quarantine must come after isolate in the same list: a VM is isolated "
        "before it is quarantine-migrated",
        "pb.yaml:11: severities.high[2]: unknown step 'isolte' (did you mean isolate?); allowed: record, capture, "
        "impact, isolate, quarantine, pause",
        "pb.yaml:12: severities.critical[0]: pause must come after capture in the same list: evidence of the "
        "running guest is captured before it is paused",
        "pb.yaml:12: severities.critical[2].isolate: step isolate takes no options; only capture does (memory, disks)",
        "pb.yaml:12: severities.critical[3].capture.memry: unknown capture option 'memry' (did you mean memory?); "
        "allowed: memory, disks",
        "pb.yaml:13: severities.severe: unknown severity 'severe'; allowed: low, medium, high, critical",
    ]
    assert str(err).startswith("13 errors in the playbook:\npb.yaml:1: name:")
    assert err.problems[1] == PlaybookProblem("pb.yaml", 2, "version", "0 is not a version; allowed: an integer >= 1")
    assert err.problems[1].as_dict()["line"] == 2


@pytest.mark.parametrize(
    ("lists", "expected"),
    [
        (
            {"high": "[capture, quarantine, isolate]"},
            "pb.yaml:5: severities.high[1]: quarantine must come after isolate",
        ),
        ({"high": "[quarantine]"}, "pb.yaml:5: severities.high[0]: quarantine must come after isolate"),
        ({"critical": "[pause]"}, "pb.yaml:6: severities.critical[0]: pause must come after capture"),
        ({"critical": "[isolate, pause, capture]"}, "pb.yaml:6: severities.critical[1]: pause must come after capture"),
        ({"low": "[record, record]"}, "pb.yaml:3: severities.low[1]: step record repeated (first as item 0)"),
        ({"low": "[Record]"}, "pb.yaml:3: severities.low[0]: unknown step 'Record' (did you mean record?)"),
        ({"low": "[snapshot]"}, "allowed: record, capture, impact, isolate, quarantine, pause"),
        ({"low": "record"}, "pb.yaml:3: severities.low: expected a list of steps such as [record], got a string"),
        ({"low": "~"}, "pb.yaml:3: severities.low: expected a list of steps such as [record], got nothing"),
        ({"low": "[[record]]"}, "pb.yaml:3: severities.low[0]: expected a step name or a one-key mapping"),
        ({"low": "[{record: null, impact: null}]"}, "severities.low[0]: expected a step name or a one-key mapping"),
        ({"low": "[{pause: now}]"}, "severities.low[0].pause: step pause takes no options"),
        ({"low": "[{capture: [memory]}]"}, "severities.low[0].capture: expected a mapping of capture options"),
        ({"low": "[{capture: {memory: yes please}}]"}, "low[0].capture.memory: expected true or false, got 'yes"),
        ({"low": "[{capture: {disks: 1}}]"}, "low[0].capture.disks: expected true or false, got 1"),
        ({"low": "[{snapshot: {}}]"}, "severities.low[0]: unknown step 'snapshot'"),
        ({"low": "[7]"}, "severities.low[0]: expected a step name or a one-key mapping"),
    ],
)
def test_step_rules(lists, expected):
    """Unknown steps, wrong shapes, options on the wrong step, and the ordering rules, each at its line."""
    found = problems(with_severities(**lists))
    assert any(expected in p for p in found), found


def test_missing_severities_are_each_named_at_the_severities_line():
    """Every missing severity is its own problem, at the line of severities."""
    text = "name: p\nseverities:\n  low: [record]\n  high: [capture]\n"
    assert problems(text) == [
        "pb.yaml:2: severities.medium: required severity missing (every severity needs its steps)",
        "pb.yaml:2: severities.critical: required severity missing (every severity needs its steps)",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("severities: {}\n", ["pb.yaml:1: name: required field missing"]),
        ("name: p\n", ["pb.yaml:1: severities: required field missing; give steps for each of low, medium, high"]),
        (
            "name: p\nseverities: [low]\n",
            ["pb.yaml:2: severities: expected a mapping of severity to steps, got a list"],
        ),
        ("name: 7\n", ["pb.yaml:1: name: 7 is not a name"]),
        ("name: p\nversion: true\n", ["pb.yaml:2: version: True is not a version"]),
        ("name: p\nversion: '3'\n", ["pb.yaml:2: version: '3' is not a version"]),
        ("name: p\nreserve: -1\n", ["pb.yaml:2: reserve: -1 is not a reserve; allowed: an integer from 0 to 1000"]),
        ("name: p\nreserve: 1001\n", ["pb.yaml:2: reserve: 1001 is not a reserve"]),
        ("name: p\nreserve: 1.5\n", ["pb.yaml:2: reserve: 1.5 is not a reserve"]),
        ("name: p\nquarantine_role: Quarantine\n", ["pb.yaml:2: quarantine_role: 'Quarantine' is not a host role"]),
        ("name: p\ndescription: [x]\n", ["pb.yaml:2: description: expected a string, got a list"]),
    ],
)
def test_top_level_fields(text, expected):
    """Required fields, types and ranges of the document's own fields, at their lines."""
    found = problems(text)
    for wanted in expected:
        assert any(p.startswith(wanted) for p in found), found


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "pb.yaml: empty file: a playbook is a mapping with name and severities"),
        ("# only a comment\n", "pb.yaml: empty file"),
        ("name: p\nseverities: [\n", "pb.yaml:3: YAML syntax error:"),
        ("name: p\n  bad: indent\n", "pb.yaml:2: YAML syntax error:"),
        ("name: a\n---\nname: b\n", "pb.yaml:2: YAML syntax error: expected a single document in the stream"),
        ("- record\n", "pb.yaml:1: a playbook is a mapping with name, version, description"),
        ("just text\n", "pb.yaml:1: a playbook is a mapping with name, version, description, quarantine_role, reserve"),
        ("name: a\nname: b\n", "pb.yaml:2: name: duplicate key"),
        ("name: p\nseverities:\n  low: [record]\n  low: [impact]\n", "pb.yaml:4: severities.low: duplicate key"),
        ("name: p\nx: \x1f\n", "pb.yaml:2: YAML syntax error: unacceptable character #x001f"),
        (
            "name: p\nx: !!python/object:os.system {}\n",
            "pb.yaml:2: YAML syntax error: could not determine a constructor",
        ),
    ],
)
def test_documents_that_cannot_be_read(text, expected):
    """Empty files, YAML syntax errors, control characters, several documents, a non-mapping, duplicate keys, tags."""
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found


def test_an_alias_bomb_and_a_huge_file_are_refused_before_construction():
    """A document expanding through aliases past the node limit, or a file past MAX_TEXT, is refused."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for name, prev in zip("bcdef", "abcde", strict=True):
        bomb += f"{name}: &{name} [{', '.join(['*' + prev] * 10)}]\n"
    assert problems(bomb) == ["pb.yaml:1: expands to more than 10,000 YAML nodes (aliases?)"]
    assert problems("#" * (MAX_TEXT + 1)) == [f"pb.yaml: {MAX_TEXT + 1:,} characters, at most {MAX_TEXT:,}"]


def test_parse_raises_and_check_returns_the_same_problems():
    """parse_playbook raises PlaybookErrors holding exactly what check_playbook returns."""
    text = with_severities(low="[snapshot]")
    with pytest.raises(PlaybookErrors) as info:
        parse_playbook(text, "pb.yaml")
    assert list(info.value.problems) == check_playbook(text, "pb.yaml")
    assert str(info.value).startswith("1 error in the playbook:\n")


# ------------------------------------------------------------------------------------------------- built in code


def test_steps_and_playbooks_built_in_code_obey_the_same_rules():
    """Step and Playbook constructors refuse what the parser refuses (without lines)."""
    assert Step(StepKind.CAPTURE).capture == CaptureOptions()
    assert Step("isolate").kind is StepKind.ISOLATE  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="takes no capture options"):
        Step(StepKind.ISOLATE, CaptureOptions())
    with pytest.raises(InvalidInput, match="must take the memory, the disks or both"):
        CaptureOptions(memory=False, disks=False)
    steps = {s: (Step(R),) for s in ("low", "medium", "high")}
    with pytest.raises(InvalidInput, match=r"severities\.critical\[0\]: pause must come after capture"):
        Playbook(name="p", critical=(Step(P), Step(C)), **steps)
    with pytest.raises(InvalidInput, match=r"severities\.critical: no steps"):
        Playbook(name="p", critical=(), **steps)
    with pytest.raises(InvalidInput, match="quarantine_role: compute hosts"):
        Playbook(name="p", critical=(Step(R),), quarantine_role="compute", **steps)
    built = Playbook(name="p", critical=[Step(C), Step(P)], **steps)  # type: ignore[arg-type]
    assert built.critical == (Step(C), Step(P))
    assert hash(built) == hash(parse_playbook(built.to_yaml(), "x"))


@settings(max_examples=300, deadline=None)
@given(line=st.integers(min_value=0, max_value=20), replacement=st.text(max_size=40))
def test_any_edit_of_a_line_gives_a_playbook_or_problems(line, replacement):
    """Replacing any line of a good playbook with any text gives a playbook or PlaybookErrors, never another error."""
    lines = GOOD.splitlines()
    lines[line % len(lines)] = replacement
    text = "\n".join(lines) + "\n"
    try:
        playbook = parse_playbook(text, "fuzz.yaml")
    except PlaybookErrors as err:
        assert err.problems and all(str(p).startswith("fuzz.yaml") for p in err.problems)
        return
    assert parse_playbook(playbook.to_yaml(), "again.yaml").digest == playbook.digest
