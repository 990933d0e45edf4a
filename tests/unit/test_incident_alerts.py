"""Alerts in: Suricata EVE, Falco and generic events normalised, every malformed input refused by field, dedup keys."""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from ferryman.core.errors import InvalidInput
from ferryman.incidents.alerts import (
    MAX_EVENTS,
    MAX_RAW_BYTES,
    MAX_RULE,
    MAX_SUMMARY,
    Alert,
    IncidentSeverity,
    parse,
    parse_falco,
    parse_generic,
    parse_suricata,
    suricata_severity,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "alerts"
RECEIVED = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)


def load(name: str) -> Any:
    return json.loads((DATA / name).read_text())


def lines(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def suricata() -> dict[str, Any]:
    return load("suricata_alert.json")


def falco(index: int = 0) -> dict[str, Any]:
    return lines("falco_events.ndjson")[index]


def refusal(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(InvalidInput) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ----------------------------------------------------------------------------------------------------------- severity


def test_severities_order_by_rank_not_alphabet():
    """LOW < MEDIUM < HIGH < CRITICAL, although "critical" < "high" as strings."""
    low, medium, high, critical = IncidentSeverity
    assert low < medium < high < critical
    assert critical > high >= high and low <= low
    assert sorted([critical, low, high, medium]) == [low, medium, high, critical]
    assert max([high, critical, medium]) is critical
    assert IncidentSeverity.highest(medium, low, high) is high
    assert [s.rank for s in IncidentSeverity] == [0, 1, 2, 3]


def test_severity_refuses_comparison_with_plain_strings():
    """Ordering against a plain string raises TypeError instead of silently comparing letters."""
    with pytest.raises(TypeError):
        _ = IncidentSeverity.HIGH < "low"
    with pytest.raises(TypeError):
        _ = "low" < IncidentSeverity.HIGH  # noqa: SIM300 - the reflected comparison is the point
    assert IncidentSeverity.HIGH == "high"  # equality stays string equality (JSON round trips)


def test_severity_parse_is_case_insensitive_and_names_the_allowed_values():
    """parse accepts any case and refuses other words, listing the four severities."""
    assert IncidentSeverity.parse(" Critical ") is IncidentSeverity.CRITICAL
    message = refusal(IncidentSeverity.parse, "severe")
    assert "low, medium, high, critical" in message
    refusal(IncidentSeverity.parse, 3)
    refusal(IncidentSeverity.highest)


@pytest.mark.parametrize(
    ("priority", "declared", "expected"),
    [
        (1, (), "high"),
        (1, ("Major",), "high"),
        (1, ("critical",), "critical"),
        (2, ("Critical",), "medium"),
        (2, (), "medium"),
        (3, (), "low"),
        (4, (), "low"),
        (255, (), "low"),
    ],
)
def test_suricata_severity_mapping(priority, declared, expected):
    """1 → high (critical only if the rule also declares Critical), 2 → medium, 3 and above → low."""
    assert suricata_severity(priority, declared) == expected


# ----------------------------------------------------------------------------------------------------------- suricata


def test_suricata_alert_sample_is_normalised():
    """The sample EVE alert: signature, severity 2 → medium, UTC time, src then dest IP, lowercase MACs, no VM/host."""
    event = suricata()
    alert = parse_suricata(event)
    assert alert.source == "suricata"
    assert alert.rule == "ET SCAN Potential SSH Scan"
    assert alert.severity is IncidentSeverity.MEDIUM
    assert alert.time == dt.datetime(2026, 12, 6, 10, 0, 0, 123456, tzinfo=dt.UTC)
    assert alert.time.tzinfo is dt.UTC
    assert alert.ips == ("203.0.113.45", "10.50.1.10")
    assert alert.macs == ("02:42:ac:11:00:02", "52:54:00:12:34:56")
    assert alert.vm is None and alert.host is None
    assert alert.summary == (
        "[1:2001219:20] ET SCAN Potential SSH Scan [Attempted Information Leak] TCP "
        "203.0.113.45:51432 -> 10.50.1.10:22 (allowed)"
    )
    assert alert.raw == event
    assert alert.dedup_key.startswith("suricata:") and len(alert.dedup_key) == len("suricata:") + 64


def test_raw_is_a_copy_of_the_event():
    """Changing the event after parsing does not change the alert's raw copy."""
    event = suricata()
    alert = parse_suricata(event)
    event["alert"]["signature"] = "changed"
    event["src_ip"] = "192.0.2.1"
    assert alert.raw["alert"]["signature"] == "ET SCAN Potential SSH Scan"
    assert alert.raw["src_ip"] == "203.0.113.45"


def test_eve_stream_with_flow_and_dns_is_refused_whole_naming_the_first_non_alert():
    """A batch with a flow record is refused, naming its index and event_type (all or nothing)."""
    message = refusal(parse, "suricata", lines("suricata_eve.ndjson"))
    assert message == (
        "suricata event [1]: event_type: 'flow' is not an alert (only event_type \"alert\" records are taken)"
    )


@pytest.mark.parametrize("kind", ["flow", "dns", "http", "stats", "anomaly"])
def test_non_alert_event_types_are_refused(kind):
    """Only event_type alert is an alert."""
    event = suricata() | {"event_type": kind}
    assert "is not an alert" in refusal(parse_suricata, event)


def test_eve_alerts_of_the_stream_parse_with_their_severities():
    """The stream's alerts: medium scan, critical beacon, high log4j over IPv6 (compressed), low ICMP without ports."""
    events = [e for e in lines("suricata_eve.ndjson") if e["event_type"] == "alert"]
    alerts = parse("suricata", events)
    assert [a.severity.value for a in alerts] == ["medium", "critical", "high", "low"]
    beacon, log4j, ping = alerts[1], alerts[2], alerts[3]
    assert beacon.ips == ("10.50.1.11", "198.51.100.7")
    assert beacon.macs == ("52:54:00:ab:cd:ef", "52:54:00:00:00:01")
    assert log4j.ips == ("2001:db8::45", "2001:db8:50:1::a")
    assert log4j.macs == ()
    assert "(blocked)" in log4j.summary
    assert (
        ping.summary == "[1:2100366:8] GPL ICMP_INFO PING *NIX [Misc activity] ICMP 10.50.1.10 -> 10.50.1.1 (allowed)"
    )


def test_suricata_minimal_alert():
    """Only the required fields: gid defaults to 1 in the summary, no category, proto or ports."""
    event = {
        "timestamp": "2026-12-06T10:00:00Z",
        "event_type": "alert",
        "src_ip": "10.0.0.1",
        "dest_ip": "10.0.0.2",
        "alert": {"signature_id": 9000001, "signature": "LOCAL test", "severity": 3},
    }
    alert = parse_suricata(event)
    assert alert.summary == "[1:9000001] LOCAL test 10.0.0.1 -> 10.0.0.2"
    assert alert.severity is IncidentSeverity.LOW


@pytest.mark.parametrize(
    ("path", "label"),
    [
        (("timestamp",), "timestamp"),
        (("event_type",), "event_type"),
        (("src_ip",), "src_ip"),
        (("dest_ip",), "dest_ip"),
        (("alert",), "alert.signature_id"),
        (("alert", "signature_id"), "alert.signature_id"),
        (("alert", "signature"), "alert.signature"),
        (("alert", "severity"), "alert.severity"),
    ],
)
def test_suricata_missing_required_fields_are_named(path, label):
    """Each required field, when missing, is named in the refusal."""
    event = suricata()
    node = event
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    assert refusal(parse_suricata, event) == f"suricata event: {label}: missing"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"src_ip": "10.0.0.256"}, "src_ip: '10.0.0.256' is not an IP address"),
        ({"dest_ip": "web-1"}, "dest_ip: 'web-1' is not an IP address"),
        ({"src_ip": 167772161}, "src_ip: expected a string, got int"),
        ({"timestamp": "yesterday"}, "timestamp: 'yesterday' is not an ISO-8601 time"),
        ({"timestamp": "2026-13-06T10:00:00+0000"}, "is not an ISO-8601 time"),
        ({"timestamp": 1796551200}, "timestamp: expected a string, got int"),
        ({"src_port": 70000}, "src_port: 70000 is out of range (between 0 and 65535)"),
        ({"src_port": "22"}, "src_port: expected an integer, got str"),
        ({"src_port": 10**5000}, "src_port: the number is out of range (between 0 and 65535)"),
        ({"dest_port": -(10**17)}, "dest_port: -100000000000000000 is out of range"),
        ({"dest_port": True}, "dest_port: expected an integer, got bool"),
        ({"proto": 6}, "proto: expected a string, got int"),
        ({"alert": []}, "alert: expected a JSON object, got list"),
        ({"ether": "52:54:00:12:34:56"}, "ether: expected a JSON object, got str"),
        ({"ether": {"src_mac": "52:54:00:12:34"}}, "ether.src_mac: '52:54:00:12:34' is not a MAC address"),
        ({"ether": {"dest_mac": "52:54:00:12:34:zz"}}, "ether.dest_mac"),
        ({"event_type": None}, "event_type: missing"),
    ],
)
def test_suricata_malformed_fields_are_refused_by_name(change, expected):
    """Bad addresses, times, ports, types and shapes: one line naming the field."""
    assert expected in refusal(parse_suricata, suricata() | change)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"severity": "1"}, "alert.severity: expected an integer, got str"),
        ({"severity": 0}, "alert.severity: 0 is out of range (at least 1)"),
        ({"severity": 1.0}, "alert.severity: expected an integer, got float"),
        ({"signature_id": False}, "alert.signature_id: expected an integer, got bool"),
        ({"signature": ""}, "alert.signature: empty"),
        ({"signature": "\n\t"}, "alert.signature: empty"),
        ({"signature": ["ET SCAN"]}, "alert.signature: expected a string, got list"),
        ({"metadata": {"signature_severity": "Critical"}}, "alert.metadata.signature_severity: expected a list"),
        ({"metadata": ["x"]}, "alert.metadata: expected a JSON object, got list"),
        ({"gid": -1}, "alert.gid: -1 is out of range"),
    ],
)
def test_suricata_malformed_alert_section_is_refused_by_name(change, expected):
    """The alert section's types and ranges are checked field by field."""
    event = suricata()
    event["alert"] |= change
    assert expected in refusal(parse_suricata, event)


def test_suricata_times_are_normalised_to_utc():
    """An offset time becomes UTC; a time without offset is taken as UTC; excess fraction digits are dropped."""
    assert parse_suricata(suricata() | {"timestamp": "2026-12-06T11:00:00.5+0100"}).time == dt.datetime(
        2026, 12, 6, 10, 0, 0, 500000, tzinfo=dt.UTC
    )
    assert parse_suricata(suricata() | {"timestamp": "2009-11-24T21:27:09.534255"}).time == dt.datetime(
        2009, 11, 24, 21, 27, 9, 534255, tzinfo=dt.UTC
    )


def test_same_address_twice_is_listed_once():
    """An alert from an address to itself lists it once."""
    alert = parse_suricata(suricata() | {"dest_ip": "203.0.113.45"})
    assert alert.ips == ("203.0.113.45",)


# ------------------------------------------------------------------------------------------------------------- falco


def test_falco_samples_are_normalised():
    """The Falco samples: priorities mapped, hostname as host, vm.name / vm.id as vm, fd.cip then fd.sip as ips."""
    alerts = parse("falco", lines("falco_events.ndjson"))
    qemu, shadow, outbound, internal = alerts
    assert qemu.rule == "Unexpected process spawned by QEMU"
    assert qemu.severity is IncidentSeverity.CRITICAL
    assert (qemu.host, qemu.vm, qemu.ips) == ("host-b", "web-1", ())
    assert qemu.time == dt.datetime(2026, 12, 6, 10, 0, 1, 123456, tzinfo=dt.UTC)
    assert qemu.summary.startswith("10:00:01.123456789: Critical Unexpected process spawned by QEMU")
    assert shadow.severity is IncidentSeverity.MEDIUM and shadow.host == "host-a" and shadow.vm is None
    assert outbound.severity is IncidentSeverity.LOW
    assert outbound.ips == ("10.50.1.10", "198.51.100.7")
    assert outbound.vm == "4f1c2d3e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"  # canonical UUID form
    assert internal.severity is IncidentSeverity.LOW and internal.host == "host-c"
    assert {a.source for a in alerts} == {"falco"}


@pytest.mark.parametrize(
    ("priority", "expected"),
    [
        ("Emergency", "critical"),
        ("Alert", "critical"),
        ("Critical", "critical"),
        ("Error", "high"),
        ("Warning", "medium"),
        ("Notice", "low"),
        ("Informational", "low"),
        ("info", "low"),
        ("Debug", "low"),
        ("WARNING", "medium"),
    ],
)
def test_falco_priorities(priority, expected):
    """Emergency/Alert/Critical → critical, Error → high, Warning → medium, the rest → low (any case)."""
    assert parse_falco(falco() | {"priority": priority}).severity == expected


def test_falco_vm_id_wins_over_vm_name_and_na_fields_are_absent():
    """With both vm.id and vm.name, the id is taken; Falco's <NA> and null mean absent."""
    event = falco(2)
    event["output_fields"] |= {"vm.name": "web-2", "fd.sip": "<NA>", "fd.cip": None}
    alert = parse_falco(event)
    assert alert.vm == "4f1c2d3e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
    assert alert.ips == ()
    event["output_fields"]["vm.id"] = "<NA>"
    assert parse_falco(event).vm == "web-2"


def test_falco_without_output_uses_the_rule_and_fqdn_hostnames_are_lowercased():
    """No output: the summary is the rule; a hostname is lowercased and may be a FQDN."""
    event = falco(1)
    del event["output"]
    event["hostname"] = "Host-A.Example.NET."
    alert = parse_falco(event)
    assert alert.summary == "Read sensitive file untrusted"
    assert alert.host == "host-a.example.net"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"priority": "Severe"}, "priority: 'Severe' is not a Falco priority; allowed: Emergency, Alert"),
        ({"priority": 4}, "priority: expected a string, got int"),
        ({"time": "2026-12-06 at ten"}, "time: '2026-12-06 at ten' is not an ISO-8601 time"),
        ({"time": None}, "time: missing"),
        ({"rule": None}, "rule: missing"),
        ({"rule": "x" * (MAX_RULE + 1)}, f"rule: {MAX_RULE + 1} characters, at most {MAX_RULE}"),
        ({"hostname": "host b"}, "hostname: 'host b' is not a host name"),
        ({"hostname": "-host"}, "hostname: '-host' is not a host name"),
        ({"output_fields": ["vm.name"]}, "output_fields: expected a JSON object, got list"),
        ({"output_fields": {"vm.name": "Web_1"}}, "output_fields.vm.name: 'Web_1' is neither a VM name"),
        ({"output_fields": {"fd.sip": "10.0.0.1:80"}}, "output_fields.fd.sip: '10.0.0.1:80' is not an IP address"),
        ({"tags": "host"}, "tags: expected a list of strings, got str"),
        ({"tags": [1, 2]}, "tags: expected a list of strings, got list"),
        ({"source": 7}, "source: expected a string, got int"),
    ],
)
def test_falco_malformed_fields_are_refused_by_name(change, expected):
    """Falco fields are checked by type and value, one line naming the field."""
    assert expected in refusal(parse_falco, falco() | change)


def test_falco_naming_nothing_is_refused():
    """An event without hostname, VM or addresses identifies nothing and is refused."""
    event = falco(1)
    del event["hostname"]
    assert "names no VM, address or host" in refusal(parse_falco, event)


# ----------------------------------------------------------------------------------------------------------- generic


def test_generic_samples():
    """The generic samples: one per subject kind, severity any case, offsets to UTC, receive time as default."""
    vm, ip, host, mac = parse("generic", load("generic.json"), received=RECEIVED)
    assert (vm.vm, vm.severity, vm.time) == (
        "web-1",
        IncidentSeverity.HIGH,
        dt.datetime(2026, 12, 6, 10, 5, tzinfo=dt.UTC),
    )
    assert (ip.ips, ip.severity, ip.time) == (("10.50.1.12",), IncidentSeverity.MEDIUM, vm.time)
    assert (host.host, host.severity, host.time) == ("host-b", IncidentSeverity.CRITICAL, RECEIVED)
    assert (mac.macs, mac.summary) == (("52:54:00:ab:cd:ef",), "arp-anomaly")


def test_generic_without_time_needs_a_receive_time():
    """No time and no receive time: refused naming time; an aware receive time in another zone becomes UTC."""
    event = {"severity": "low", "rule": "r", "vm": "web-1"}
    assert refusal(parse_generic, event) == "generic event: time: missing (and no receive time to default to)"
    cet = dt.timezone(dt.timedelta(hours=1))
    alert = parse_generic(event, received=dt.datetime(2026, 12, 6, 13, 0, tzinfo=cet))
    assert alert.time == RECEIVED
    refusal(parse_generic, event, received=dt.datetime(2026, 12, 6, 12, 0))


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"severity": "high", "rule": "r"}, "names no VM, address or host: give at least one of vm, ip, mac, host"),
        ({"severity": "severe", "rule": "r", "vm": "web-1"}, "severity: 'severe' is not a severity; allowed: low"),
        ({"severity": 3, "rule": "r", "vm": "web-1"}, "severity: expected a string, got int"),
        ({"rule": "r", "vm": "web-1"}, "severity: missing"),
        ({"severity": "low", "vm": "web-1"}, "rule: missing"),
        (
            {"severity": "low", "rule": "r", "vm_name": "web-1"},
            "generic event: unknown field 'vm_name'; allowed: severity, rule",
        ),
        ({"severity": "low", "rule": "r", "vm": "Web 1"}, "vm: 'Web 1' is neither a VM name"),
        ({"severity": "low", "rule": "r", "ip": "10.50.1"}, "ip: '10.50.1' is not an IP address"),
        ({"severity": "low", "rule": "r", "ip": ""}, "ip: '' is not an IP address"),
        ({"severity": "low", "rule": "r", "mac": "5254.0012.3456"}, "mac: '5254.0012.3456' is not a MAC address"),
        ({"severity": "low", "rule": "r", "host": "host_b"}, "host: 'host_b' is not a host name"),
        ({"severity": "low", "rule": "r", "vm": "web-1", "time": "12/06/2026"}, "time: '12/06/2026' is not an ISO"),
        ({"severity": "low", "rule": "r", "vm": "web-1", "summary": 5}, "summary: expected a string, got int"),
        ({"severity": "low", "rule": "r", "mac": "52:54:00:12:34:56:78"}, "is not a MAC address"),
    ],
)
def test_generic_malformed_events_are_refused_by_name(event, expected):
    """The generic form is strict: required fields, syntax of each reference, and no unknown fields."""
    assert expected in refusal(parse_generic, event, received=RECEIVED)


# ------------------------------------------------------------------------------------------------------------- parse


def test_parse_accepts_one_object_or_a_list():
    """One object gives one alert; a list gives one per event, in order; an empty list gives none."""
    assert len(parse("suricata", suricata())) == 1
    assert [a.rule for a in parse("falco", [falco(1), falco(0)])] == [
        "Read sensitive file untrusted",
        "Unexpected process spawned by QEMU",
    ]
    assert parse("falco", []) == []


def test_parse_refuses_unknown_sources_and_bodies_of_the_wrong_shape():
    """Unknown source, a string body, or a list item that is not an object: one-line refusals."""
    assert refusal(parse, "snort", {}) == "unknown alert source 'snort'; allowed: suricata, falco, generic"
    assert refusal(parse, "suricata", "alert") == "suricata alerts: expected a JSON object or a list of them, got str"
    assert refusal(parse, "falco", [falco(), 3]) == "falco event [1]: expected a JSON object, got int"
    assert "got NoneType" in refusal(parse_suricata, None)


def test_parse_bounds_the_batch():
    """MAX_EVENTS events are taken; one more refuses the batch, saying how many, before reading any."""
    batch = [suricata()] * MAX_EVENTS
    assert len(parse("suricata", batch)) == MAX_EVENTS
    message = refusal(parse, "suricata", [*batch, {"not": "read"}])
    assert message == f"suricata alerts: {MAX_EVENTS + 1} events in one request, at most {MAX_EVENTS}"


def test_refusals_never_echo_huge_values():
    """A megabyte of garbage in a field is quoted cut to a few dozen characters."""
    huge = "1" * 1_000_000
    for bad, call in (
        (suricata() | {"src_ip": huge}, parse_suricata),
        (suricata() | {"timestamp": huge}, parse_suricata),
        (falco() | {"priority": huge}, parse_falco),
        ({huge: 1, "severity": "low", "rule": "r", "vm": "web-1"}, parse_generic),
    ):
        assert len(refusal(call, bad)) < 200


def test_raw_is_bounded_and_free_text_is_cut_and_cleaned():
    """A huge event keeps only its top-level scalars in raw; the summary is cut and loses control characters."""
    event = falco() | {"output": "x\x1b[31m\ny" + "z" * 100_000, "blob": {"data": "A" * 100_000}}
    alert = parse_falco(event)
    assert alert.raw["_truncated"] is True and alert.raw["_bytes"] > MAX_RAW_BYTES
    assert "blob" not in alert.raw and alert.raw["rule"] == event["rule"]
    assert len(json.dumps(alert.raw)) < MAX_RAW_BYTES
    assert len(alert.summary) == MAX_SUMMARY
    assert alert.summary.startswith("x [31m y") and alert.summary.endswith("…")


def test_non_json_values_and_deep_nesting_are_refused():
    """NaN, a non-JSON value or nesting past the interpreter's limit is refused, not raised as something else."""
    assert "not plain JSON" in refusal(parse_suricata, suricata() | {"pcap_cnt": float("nan")})
    assert "not plain JSON" in refusal(parse_suricata, suricata() | {"extra": {1, 2}})
    assert "not plain JSON" in refusal(parse_suricata, suricata() | {"payload": "\ud800"})
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(100_000):
        node["a"] = {}
        node = node["a"]
    assert "nested too deeply" in refusal(parse_suricata, suricata() | {"extra": deep})


# ------------------------------------------------------------------------------------------------------------- dedup


def test_dedup_key_is_stable_across_repeats_of_one_attack():
    """New source port, flow id and time, or the reply direction: the same key."""
    first = parse_suricata(suricata())
    again = suricata() | {"src_port": 51999, "flow_id": 7, "timestamp": "2026-12-06T10:07:00+0000"}
    reply = suricata() | {"src_ip": "10.50.1.10", "dest_ip": "203.0.113.45", "src_port": 22, "dest_port": 51432}
    reply["ether"] = {"src_mac": "52:54:00:12:34:56", "dest_mac": "02:42:ac:11:00:02"}
    assert parse_suricata(again).dedup_key == first.dedup_key
    assert parse_suricata(reply).dedup_key == first.dedup_key


def test_dedup_key_is_pinned():
    """The key of the sample is a fixed value: keys stored by one controller version match the next one's."""
    assert parse_suricata(suricata()).dedup_key == (
        "suricata:9bd9163bd81b2d5a1ad96abab45e13c7309660acfbc012a9b7c8a9142ce7d864"
    )


def test_dedup_key_differs_for_a_different_attack():
    """Another signature, victim, attacker, severity or source: another key."""
    base = parse_suricata(suricata()).dedup_key
    other_rule = suricata()
    other_rule["alert"] |= {"signature": "ET SCAN Other", "signature_id": 2001220}
    other_severity = suricata()
    other_severity["alert"]["severity"] = 1
    keys = {
        parse_suricata(other_rule).dedup_key,
        parse_suricata(suricata() | {"dest_ip": "10.50.1.11"}).dedup_key,
        parse_suricata(suricata() | {"src_ip": "203.0.113.46"}).dedup_key,
        parse_suricata(other_severity).dedup_key,
    }
    assert base not in keys and len(keys) == 4
    generic = parse_generic({"severity": "low", "rule": "r", "vm": "web-1"}, received=RECEIVED)
    same_from_falco = parse_falco(
        {"rule": "r", "priority": "Debug", "time": "2026-12-06T10:00:00Z", "output_fields": {"vm.name": "web-1"}}
    )
    assert generic.dedup_key.removeprefix("generic:") == same_from_falco.dedup_key.removeprefix("falco:")
    assert generic.dedup_key != same_from_falco.dedup_key


def test_alert_built_in_code_gets_its_key_and_an_aware_utc_time():
    """Alert computes dedup_key itself, normalises an aware time to UTC and refuses a naive one."""
    cet = dt.timezone(dt.timedelta(hours=1))
    alert = Alert("generic", "r", IncidentSeverity.LOW, "s", dt.datetime(2026, 12, 6, 11, 0, tzinfo=cet), vm="web-1")
    assert alert.time == dt.datetime(2026, 12, 6, 10, 0, tzinfo=dt.UTC)
    same = parse_generic({"severity": "low", "rule": "r", "summary": "other", "vm": "web-1"}, received=RECEIVED)
    assert alert.dedup_key == same.dedup_key  # the summary and the time are no part of the key
    assert hash(alert) == hash(copy.copy(alert))
    refusal(Alert, "generic", "r", IncidentSeverity.LOW, "s", dt.datetime(2026, 12, 6, 11, 0))
    refusal(Alert, "snort", "r", IncidentSeverity.LOW, "s", RECEIVED)
    with pytest.raises(TypeError):
        Alert("generic", "r", IncidentSeverity.LOW, "s", RECEIVED, dedup_key="forged")  # type: ignore[call-arg]


# ------------------------------------------------------------------------------------------------------- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)

SURICATA_PATHS = [
    ("timestamp",),
    ("event_type",),
    ("src_ip",),
    ("dest_ip",),
    ("src_port",),
    ("dest_port",),
    ("proto",),
    ("ether",),
    ("ether", "src_mac"),
    ("alert",),
    ("alert", "signature_id"),
    ("alert", "signature"),
    ("alert", "severity"),
    ("alert", "gid"),
    ("alert", "metadata"),
    ("alert", "metadata", "signature_severity"),
]
FALCO_PATHS = [
    ("rule",),
    ("priority",),
    ("time",),
    ("output",),
    ("hostname",),
    ("tags",),
    ("output_fields",),
    ("output_fields", "vm.name"),
    ("output_fields", "vm.id"),
    ("output_fields", "fd.sip"),
]
GENERIC_PATHS = [("severity",), ("rule",), ("summary",), ("vm",), ("ip",), ("mac",), ("host",), ("time",)]


def mutate(event: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    event = copy.deepcopy(event)
    node = event
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return event


@settings(max_examples=300, deadline=None)
@given(
    source=st.sampled_from(["suricata", "falco", "generic"]),
    index=st.integers(min_value=0, max_value=100),
    value=json_values,
)
def test_any_field_value_gives_an_alert_or_a_one_line_invalid_input(source, index, value):
    """Whatever JSON value replaces a field, parse returns normalised alerts or raises InvalidInput, nothing else."""
    base, paths = {
        "suricata": (suricata(), SURICATA_PATHS),
        "falco": (falco(2), FALCO_PATHS),
        "generic": ({"severity": "high", "rule": "r", "vm": "web-1"}, GENERIC_PATHS),
    }[source]
    mutated = mutate(base, paths[index % len(paths)], value)
    try:
        alerts = parse(source, mutated, received=RECEIVED)
    except InvalidInput as err:
        assert "\n" not in str(err) and len(str(err)) < 400
        event("refused")
        return
    event("accepted")
    (alert,) = alerts
    assert alert.time.tzinfo is dt.UTC
    assert alert.identifies
    assert len(alert.summary) <= MAX_SUMMARY and len(alert.rule) <= MAX_RULE
