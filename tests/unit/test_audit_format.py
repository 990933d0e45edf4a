"""The audit chain's pure parts: the canonical entry and its hash, the walk, and the CEF and JSONL export formats
(ferryman.cmdb.audit_chain)."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferryman.cmdb.audit_chain import (
    GENESIS,
    Anchor,
    ChainWalker,
    Entry,
    canonical,
    cef_header,
    cef_line,
    cef_value,
    entry_from_jsonl,
    jsonl_line,
    link_hash,
    plain,
    verify_entries,
)

T0 = dt.datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=dt.UTC)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def entry(i: int = 42, **fields: Any) -> Entry:
    values: dict[str, Any] = {
        "id": i,
        "time": T0,
        "kind": "vm.migrated",
        "severity": "warning",
        "principal": "token:admin",
        "vm": "id-web",
        "host": None,
        "message": "moved a|b=c\\d\nnext",
        "data": {"k": "v=1"},
        "prev_hash": GENESIS,
        "hash": "ab" * 32,
    }
    return Entry(**(values | fields))


def chain(count: int) -> list[Entry]:
    entries, prev = [], GENESIS
    for i in range(1, count + 1):
        unlinked = entry(i, message=f"entry {i}", prev_hash=prev)
        entries.append(unlinked._replace(hash=link_hash(prev, unlinked)))
        prev = entries[-1].hash
    return entries


# -- the canonical entry and its hash -----------------------------------------------------------------------------


def test_the_hash_covers_the_previous_hash_and_every_field() -> None:
    """Changing the previous hash or any one field changes the link hash; the stored hashes are not hashed."""
    base = entry()
    digest = link_hash(GENESIS, base)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert link_hash("1" * 64, base) != digest
    changes = {
        "id": 43,
        "time": T0 + dt.timedelta(microseconds=1),
        "kind": "vm.moved",
        "severity": "alarm",
        "principal": "token:x",
        "vm": None,
        "host": "h1",
        "message": "moved",
        "data": {"k": "v=2"},
    }
    for name, value in changes.items():
        assert link_hash(GENESIS, base._replace(**{name: value})) != digest, name
    assert link_hash(GENESIS, base._replace(prev_hash="x", hash="y")) == digest


def test_the_canonical_form_does_not_depend_on_representation() -> None:
    """Key order, the time zone of an aware time, and float-vs-integer spellings PostgreSQL normalises hash alike."""
    base = entry(data={"a": 1, "b": [2, {"c": 3}], "big": 10**300, "e16": 10**16, "zero": 0})
    same = entry(
        time=T0.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30))),
        data={"zero": -0.0, "e16": 1e16, "big": 1e300, "b": [2.0, {"c": 3.0}], "a": 1.0},
    )
    assert link_hash(GENESIS, base) == link_hash(GENESIS, same)
    assert link_hash(GENESIS, entry(time=T0.replace(tzinfo=None))) == link_hash(GENESIS, entry())  # naive is UTC
    assert link_hash(GENESIS, entry(data={"x": 0.5})) != link_hash(GENESIS, entry(data={"x": 0.25}))


@settings(max_examples=200)
@given(
    data=st.dictionaries(st.text(max_size=8), json_values, max_size=5),
    text=st.text(),
    vm=st.none() | st.text(max_size=10),
    ident=st.integers(min_value=1, max_value=2**62),
)
def test_the_canonical_entry_is_sorted_compact_ascii_json(
    data: dict[str, Any], text: str, vm: str | None, ident: int
) -> None:
    """The hand-spelled canonical bytes are exactly json.dumps of the fields, keys sorted, compact, ASCII."""
    item = entry(ident, data=data, message=text, principal=text, vm=vm)
    fields = item._asdict() | {"time": "2026-11-23T10:00:00.123456Z", "data": plain(data)}
    del fields["prev_hash"], fields["hash"]
    assert canonical(item) == json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# -- the walk -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 2, 5, 100])
def test_the_walk_gives_the_same_answer_in_any_batch_size(batch: int) -> None:
    """An intact chain, and one missing entry 4, fed in batches: the same outcome whatever the batch size."""
    entries = chain(9)
    for rows, expected in [(entries, None), ([e for e in entries if e.id != 4], 5)]:
        walker = ChainWalker()
        for start in range(0, len(rows), batch):
            if not walker.feed(rows[start : start + batch]):
                break
        result = walker.finish()
        assert (result.first_broken.id if result.first_broken else None) == expected
        assert result.checked == (9 if expected is None else 3)


def test_anchors_pin_the_chain() -> None:
    """An anchor's entry must be there with its hash and a good signature; one beyond the end means truncation."""
    entries = chain(6)
    good = Anchor("checkpoint 1", 4, entries[3].hash)
    assert verify_entries(entries, anchors=[good]).ok
    wrong = verify_entries(entries, anchors=[Anchor("checkpoint 1", 4, "f" * 64)])
    assert wrong.first_broken is not None and wrong.first_broken.reason.startswith("rewritten")
    unsigned = verify_entries(entries, anchors=[Anchor("checkpoint 1", 4, entries[3].hash, signature_ok=False)])
    assert unsigned.first_broken is not None and "signature" in unsigned.first_broken.reason
    truncated = verify_entries(entries[:3], anchors=[good])
    assert truncated.first_broken is not None and truncated.first_broken.id == 4
    assert truncated.head == (3, entries[2].hash)


def test_a_walk_from_the_middle_links_to_the_entry_before() -> None:
    """Walking from entry 4 needs entry 3's (id, hash) and checks entry 4's link to it."""
    entries = chain(6)
    assert verify_entries(entries[3:], prev=(3, entries[2].hash)).checked == 3
    result = verify_entries(entries[3:], prev=(3, "0" * 64))
    assert result.first_broken is not None and result.first_broken.id == 4


# -- CEF ------------------------------------------------------------------------------------------------------------


def test_cef_header_escapes_pipes_and_backslashes_and_keeps_one_line() -> None:
    """Header fields: ``|`` and ``\\`` escaped, ``=`` left alone, line breaks become spaces (headers are one line)."""
    assert cef_header("a|b\\c=d") == "a\\|b\\\\c=d"
    assert cef_header("one\ntwo\r\nthree\rfour") == "one two three four"


def test_cef_extension_values_escape_equals_backslashes_and_line_breaks() -> None:
    """Extension values: ``\\`` and ``=`` escaped, CR and LF written as ``\\r`` and ``\\n``, ``|`` left alone."""
    assert cef_value("a=b\\c|d\ne\rf") == "a\\=b\\\\c|d\\ne\\rf"
    assert cef_value("\\n") == "\\\\n"  # a literal backslash-n stays distinguishable from a newline


def test_a_cef_line() -> None:
    """One entry as CEF:0, exactly."""
    assert cef_line(entry(), version="0.1.0") == (
        "CEF:0|Ferryman|controller|0.1.0|vm.migrated|moved a\\|b=c\\\\d next|6|"
        "rt=1795428000123 externalId=42 suser=token:admin cs1Label=vm cs1=id-web msg=moved a|b\\=c\\\\d\\nnext "
        'cs2Label=data cs2={"k":"v\\=1"} cs3Label=prevHash cs3=' + "0" * 64 + " cs4Label=hash cs4=" + "ab" * 32 + "\n"
    )


def _cef_fields(line: str) -> tuple[list[str], dict[str, str]]:
    """A minimal CEF reader: the seven header fields end at unescaped pipes, the extension splits before ``key=``."""
    assert line.endswith("\n") and "\n" not in line[:-1] and "\r" not in line
    header, field, i = [], "", 0
    while len(header) < 7:
        char = line[i]
        if char == "\\":
            field, i = field + line[i + 1], i + 2
            continue
        if char == "|":
            header.append(field)
            field = ""
        else:
            field += char
        i += 1
    pairs = re.findall(r"(\w+)=((?:[^\\=]|\\.)*?)(?= \w+=|$)", line[i:-1])
    unescape = {"\\\\": "\\", "\\=": "=", "\\n": "\n", "\\r": "\r"}
    return header, {k: re.sub(r"\\[\\=nr]", lambda m: unescape[m.group()], v) for k, v in pairs}


@settings(max_examples=200)
@given(message=st.text(), principal=st.text(min_size=1), kind=st.text(min_size=1, max_size=40))
def test_cef_values_round_trip_through_a_reader(message: str, principal: str, kind: str) -> None:
    """Whatever the text, a CEF line is one line of seven header fields, and the extension gives the values back."""
    header, extension = _cef_fields(cef_line(entry(message=message, principal=principal, kind=kind), version="1"))
    one_line = [re.sub("\r\n|\r|\n", " ", text) for text in (kind, message[:512])]
    assert header == ["CEF:0", "Ferryman", "controller", "1", *one_line, "6"]
    assert (extension["msg"], extension["suser"], extension["externalId"]) == (message, principal, "42")


# -- JSONL ----------------------------------------------------------------------------------------------------------


@settings(max_examples=200)
@given(data=st.dictionaries(st.text(max_size=8), json_values, max_size=5), message=st.text())
def test_jsonl_round_trip(data: dict[str, Any], message: str) -> None:
    """A JSONL line gives back the same entry, which hashes the same: an export can be re-verified on its own."""
    original = entry(data=data, message=message)
    line = jsonl_line(original)
    assert line.endswith("\n") and line.count("\n") == 1
    parsed = entry_from_jsonl(line)
    assert parsed == original
    assert link_hash(GENESIS, parsed) == link_hash(GENESIS, original)


def test_jsonl_lines_of_a_chain_verify() -> None:
    """The lines of an exported chain verify; one edited line is named."""
    lines = [jsonl_line(e) for e in chain(5)]
    assert verify_entries(entry_from_jsonl(line) for line in lines).ok
    lines[2] = lines[2].replace("entry 3", "entry three")
    result = verify_entries(entry_from_jsonl(line) for line in lines)
    assert result.first_broken is not None and result.first_broken.id == 3


@pytest.mark.parametrize(
    "line", ["[]", '{"id": 1}', "not json", jsonl_line(entry()).replace("123456Z", "123456+01:00")]
)
def test_a_line_that_is_not_an_entry_is_refused(line: str) -> None:
    """entry_from_jsonl raises ValueError for anything but an exported entry."""
    with pytest.raises(ValueError):
        entry_from_jsonl(line)
