"""The policy language: parsing, every kind of error with its file, line, field and what is allowed, versions,
durations, contradictions and the apply-time check against a fleet."""

from __future__ import annotations

import pytest

from ferryman.core.errors import InvalidInput
from ferryman.policy import (
    HostFacts,
    PolicyError,
    PolicyErrors,
    PolicySet,
    Version,
    VersionError,
    check_policies,
    parse_policies,
    profile_security_level,
    unsatisfiable,
)
from ferryman.policy.schema import parse_duration

GOOD = """\
name: acme-production
description: "production VMs of acme"
select:
  tenants: [acme]
  profile: {environment: production}
require:
  min_site_security_level: 3
  max_vms_per_host: 4
prefer:
  - weight: 10
    sites: [paris-1]
migration:
  cooldown: 10m
  auto_balance: false
"""


def errors_of(texts: dict[str, str]) -> list[PolicyError]:
    with pytest.raises(PolicyErrors) as raised:
        parse_policies(texts)
    assert list(raised.value.errors) == check_policies(texts)
    return list(raised.value.errors)


def only_error(texts: dict[str, str]) -> PolicyError:
    errors = errors_of(texts)
    assert len(errors) == 1, errors
    return errors[0]


def host(name: str, **labels) -> HostFacts:
    values = {
        "site": "paris-1",
        "site_security_level": 2,
        "zone": "z1",
        "subnet": "n1",
        "virt_type": "kvm",
        "hypervisor": "qemu",
        "hypervisor_version": "8.0.0",
        "patch_level": 5,
    }
    values.update(labels)
    return HostFacts(name=name, **values)


def test_a_valid_policy_parses_into_typed_fields():
    """Every section of a valid document ends up in the model, durations in seconds."""
    policies = parse_policies({"policies/acme.yaml": GOOD})
    policy = policies["acme-production"]
    assert policy.select.tenants == ("acme",)
    assert policy.select.profile == {"environment": ("production",)}
    assert policy.require.min_site_security_level == 3 and policy.require.max_vms_per_host == 4
    assert policy.prefer[0].weight == 10 and policy.prefer[0].sites == ("paris-1",)
    assert policy.migration.cooldown == 600.0 and policy.migration.auto_balance is False
    assert policies.source("acme-production").file == "policies/acme.yaml"
    assert policies.source("acme-production").line_of("require.max_vms_per_host") == 8


def test_unknown_field_names_file_line_field_and_the_known_fields():
    """A misspelt rule is an error at its line, with a suggestion and the list of rules that exist."""
    text = GOOD.replace("max_vms_per_host: 4", "max_vm_per_host: 4")
    error = only_error({"policies/acme.yaml": text})
    assert (error.file, error.line, error.field) == ("policies/acme.yaml", 8, "require.max_vm_per_host")
    assert "max_vms_per_host" in error.allowed.split(", ")
    assert str(error).startswith("policies/acme.yaml:8: require.max_vm_per_host: unknown field")
    assert "did you mean max_vms_per_host?" in str(error)
    assert "; allowed: min_site_security_level, sites, forbidden_sites, max_vms_per_host" in str(error)


def test_out_of_range_value_says_what_is_allowed():
    """max_vms_per_host: 0 is refused at its line; allowed says an integer ≥ 1."""
    error = only_error({"p.yaml": GOOD.replace("max_vms_per_host: 4", "max_vms_per_host: 0")})
    assert (error.line, error.field, error.allowed) == (8, "require.max_vms_per_host", "an integer ≥ 1")


def test_wrong_type_is_not_coerced():
    """A string where an integer is expected, or an integer where true/false is, is an error (no silent coercion)."""
    errors = errors_of({"p.yaml": GOOD.replace("max_vms_per_host: 4", 'max_vms_per_host: "4"').replace("false", "0")})
    assert [(e.line, e.field) for e in errors] == [(8, "require.max_vms_per_host"), (14, "migration.auto_balance")]
    assert errors[1].allowed == "true or false"


def test_unquoted_version_is_refused_because_yaml_reads_a_number():
    """min_hypervisor_version: 7.10 is the float 7.1 in YAML; the error says to quote it."""
    text = GOOD.replace("max_vms_per_host: 4", "min_hypervisor_version: 7.10")
    error = only_error({"p.yaml": text})
    assert error.field == "require.min_hypervisor_version" and error.line == 8
    assert "quote it" in error.problem and "7.2.0" in error.allowed


def test_unparseable_version_is_refused():
    """A version string that is not a version is an error naming the field."""
    error = only_error({"p.yaml": GOOD.replace("max_vms_per_host: 4", 'min_hypervisor_version: "latest"')})
    assert error.field == "require.min_hypervisor_version" and "not a version" in error.problem


BASELINE = """\
name: baseline
select: {tenants: [acme]}
require:
  min_image_version:
    debian: "12.8"
    ubuntu: "22.04.4"
"""


def test_min_image_version_parses_into_os_and_minimum():
    """min_image_version maps OS names to quoted versions, and round-trips through to_yaml."""
    policies = parse_policies({"b.yaml": BASELINE})
    assert policies["baseline"].require.min_image_version == {"debian": "12.8", "ubuntu": "22.04.4"}
    assert policies.source("baseline").line_of("require.min_image_version.ubuntu") == 6
    assert parse_policies({"stored.yaml": policies.to_yaml()}) == policies


@pytest.mark.parametrize(
    ("rule", "line", "field", "problem"),
    [
        ("min_image_version: {}", 4, "require.min_image_version", "empty mapping"),
        ("min_image_version: [debian]", 4, "require.min_image_version", "not a mapping of OS name"),
        ("min_image_version:\n    debian: 12.8", 5, "require.min_image_version.debian", "quote it"),
        ('min_image_version:\n    debian: "latest"', 5, "require.min_image_version.debian", "not a version"),
        ('min_image_version:\n    debian: "12.8"\n    Debian: "12"', 6, "require.min_image_version.Debian", "OS name"),
        ('min_image_version:\n    debian: "12.8"\n    12: "1.0"', 6, "require.min_image_version.12", "quote it"),
        ('min_image_versions: {debian: "12.8"}', 4, "require.min_image_versions", "did you mean min_image_version?"),
    ],
)
def test_min_image_version_errors_name_file_line_and_field(rule, line, field, problem):
    """An empty mapping, a bad OS name, an unquoted or bad version, or a misspelt rule is an error at its line."""
    text = f"name: baseline\nselect: {{tenants: [acme]}}\nrequire:\n  {rule}\n"
    error = only_error({"b.yaml": text})
    assert (error.file, error.line, error.field) == ("b.yaml", line, field)
    assert problem in error.problem
    assert str(error).startswith(f"b.yaml:{line}: {field}: ")


def test_min_image_version_is_a_hard_rule_only():
    """A prefer entry cannot rank hosts by the VM's image: min_image_version there is an error at its line."""
    text = 'name: p\nselect: {tenants: [acme]}\nprefer:\n  - weight: 3\n    min_image_version: {debian: "12.8"}\n'
    error = only_error({"p.yaml": text})
    assert (error.line, error.field) == (5, "prefer[0].min_image_version")
    assert "under require" in error.problem and "min_image_version" not in error.allowed


def test_missing_select_is_reported_at_the_document():
    """A document without select names the missing field and the document's first line."""
    text = "---\nname: orphan\nrequire: {min_patch_level: 2}\n"
    error = only_error({"p.yaml": text})
    assert (error.line, error.field, error.problem) == (2, "select", "required field missing")


def test_empty_selector_and_rule_less_policy_are_refused():
    """select: {} selects nothing on purpose; a policy without any rule says nothing; both are errors."""
    texts = {
        "a.yaml": "name: a\nselect: {}\nrequire: {min_patch_level: 1}\n",
        "b.yaml": "name: b\nselect: {tenants: [x]}\n",
    }
    errors = errors_of(texts)
    assert [(e.file, e.field) for e in errors] == [("a.yaml", "select"), ("b.yaml", "")]
    assert "at least one field" in errors[0].problem and "no rule" in errors[1].problem


def test_bad_name_is_refused():
    """Policy names are lowercase letters, digits and dashes."""
    error = only_error({"p.yaml": GOOD.replace("name: acme-production", "name: Acme_Prod")})
    assert error.field == "name" and error.line == 1 and "lowercase" in error.allowed


def test_yaml_syntax_error_has_a_line():
    """Broken YAML is reported with the line the parser stopped at."""
    error = only_error({"p.yaml": "name: a\nselect: {tenants: [a\nrequire: {}\n"})
    assert error.file == "p.yaml" and error.line == 3 and "YAML syntax error" in error.problem


def test_alias_bombs_and_deep_nesting_are_refused():
    """A document whose aliases expand past the node limit, or nested past recursion, is an error, not a hang."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for level in "bcdefg":
        previous = chr(ord(level) - 1)
        bomb += f"{level}: &{level} [{', '.join(['*' + previous] * 10)}]\n"
    text = "name: bomb\nselect: {tenants: [x]}\nx: {" + bomb.replace("\n", ", ")[:-2] + "}\n"
    assert "expands to more than 100,000 YAML nodes" in only_error({"bomb.yaml": text}).problem
    error = only_error({"deep.yaml": "name: deep\nselect: " + "[" * 1000 + "]" * 1000 + "\n"})
    assert error.problem == "YAML nested too deeply"


def test_document_that_is_not_a_mapping_is_refused():
    """A list or a scalar document is an error."""
    error = only_error({"p.yaml": "- name: a\n"})
    assert error.line == 1 and "must be a mapping" in error.problem


def test_duplicate_key_in_a_mapping_is_refused():
    """YAML silently keeps the last of two equal keys; the parser reports the second one."""
    text = GOOD.replace("  max_vms_per_host: 4\n", "  max_vms_per_host: 4\n  max_vms_per_host: 5\n")
    error = only_error({"p.yaml": text})
    assert (error.line, error.field, error.problem) == (9, "require.max_vms_per_host", "duplicate key")


def test_several_documents_per_file_with_their_own_lines():
    """Documents separated by --- are separate policies; an error in the second names a line in the second."""
    text = GOOD + "---\nname: second\nselect: {tenants: [globex]}\nrequire:\n  zones: []\n"
    error = only_error({"p.yaml": text})
    assert (error.line, error.field) == (19, "require.zones")
    ok = parse_policies({"p.yaml": GOOD + "---\nname: second\nselect: {tenants: [globex]}\nrequire: {zones: [z1]}\n"})
    assert ok.names == ("acme-production", "second")
    assert ok.source("second").line == 16


def test_all_errors_of_a_set_are_collected():
    """Errors in several documents and files are all reported, in file order."""
    texts = {
        "a.yaml": GOOD.replace("max_vms_per_host: 4", "max_vms_per_host: -1").replace("cooldown: 10m", "cooldown: 10d"),
        "b.yaml": "name: b\nselect: {tenants: [b]}\nrequire: {sites: [x], forbidden_sites: [x]}\n---\nname: c\n",
    }
    errors = errors_of(texts)
    assert [(e.file, e.field) for e in errors] == [
        ("a.yaml", "require.max_vms_per_host"),
        ("a.yaml", "migration.cooldown"),
        ("b.yaml", "require.forbidden_sites"),
        ("b.yaml", "select"),
    ]
    assert str(PolicyErrors(errors)).startswith("4 errors in the policy set:\na.yaml:8:")


def test_duplicate_names_across_files_name_both_places():
    """A name used twice is an error at the second place, pointing at the first."""
    error = only_error({"a.yaml": GOOD, "b.yaml": "\n" + GOOD})
    assert (error.file, error.line, error.field) == ("b.yaml", 2, "name")
    assert "first defined at a.yaml:1" in error.allowed


@pytest.mark.parametrize(
    ("value", "seconds"), [(45, 45.0), ("90s", 90.0), ("10m", 600.0), ("2h", 7200.0), ("1.5h", 5400.0), ("30", 30.0)]
)
def test_durations(value, seconds):
    """Cooldowns are whole seconds or a number with an s, m or h suffix."""
    assert parse_duration(value) == seconds
    text = GOOD.replace("cooldown: 10m", f"cooldown: {value}")
    assert parse_policies({"p.yaml": text})["acme-production"].migration.cooldown == seconds


@pytest.mark.parametrize("value", ["10 minutes", "-5", "5d", "true", "[1]"])
def test_bad_durations_are_refused(value):
    """Anything else is an error at the cooldown line with the accepted forms."""
    error = only_error({"p.yaml": GOOD.replace("cooldown: 10m", f"cooldown: {value}")})
    assert (error.line, error.field) == (13, "migration.cooldown") and "90s, 10m, 2h" in error.allowed


def test_contradiction_sites_all_forbidden():
    """Forbidding every allowed site leaves no site: an error at forbidden_sites."""
    text = GOOD.replace("max_vms_per_host: 4", "sites: [a, b]\n  forbidden_sites: [b, a]")
    error, also = errors_of({"p.yaml": text})
    assert (error.line, error.field) == (9, "require.forbidden_sites") and "no site is left" in error.problem
    assert also.field == "prefer[0].sites"  # paris-1 is not among the required sites either


def test_contradiction_dedicated_host_forbidding_its_own_tenant():
    """dedicated_host keeps only the own tenant as neighbours; forbidding that tenant too is a contradiction."""
    text = GOOD.replace("max_vms_per_host: 4", "dedicated_host: true\n  forbidden_neighbours: [{tenants: [acme]}]")
    error = only_error({"p.yaml": text})
    assert error.field == "require.forbidden_neighbours[0]" and "max_vms_per_host: 1" in error.allowed


def test_contradiction_other_tenant_selector_that_can_never_match():
    """other_tenant with the governed tenant as the only listed tenant can never match anything."""
    text = GOOD.replace("max_vms_per_host: 4", "forbidden_neighbours: [{other_tenant: true, tenants: [acme]}]")
    error = only_error({"p.yaml": text})
    assert error.field == "require.forbidden_neighbours[0]" and "can never match" in error.problem


def test_contradiction_preference_outside_the_requirement():
    """A prefer entry that asks for values require excludes can never score."""
    text = GOOD.replace("max_vms_per_host: 4", "sites: [lyon-2]")
    error = only_error({"p.yaml": text})
    assert (error.field, error.line) == ("prefer[0].sites", 11)


def test_policy_errors_are_invalid_input():
    """Policy and version errors derive from InvalidInput, so the API maps them to a client error."""
    assert issubclass(PolicyError, InvalidInput) and issubclass(PolicyErrors, InvalidInput)
    assert issubclass(VersionError, InvalidInput)
    with pytest.raises(InvalidInput):
        parse_policies({"p.yaml": "name: [unclosed\n"})


def test_an_empty_set_is_valid():
    """No files, or empty documents, give an empty policy set (nothing is governed)."""
    assert len(parse_policies({})) == 0
    assert parse_policies({"p.yaml": "---\n# nothing yet\n---\n"}).names == ()


def test_documents_round_trip_and_lookup():
    """to_documents/to_yaml give back an equal set; policies are looked up by name."""
    policies = parse_policies({"p.yaml": GOOD})
    assert parse_policies({"stored.yaml": policies.to_yaml()}) == policies
    assert policies.to_documents()[0]["migration"] == {"cooldown": 600.0, "auto_balance": False}
    assert "acme-production" in policies and policies.get("nope") is None and len(policies) == 1
    with pytest.raises(InvalidInput):
        PolicySet([policies["acme-production"], policies["acme-production"]])


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("7.2.1", "7.10.0"),
        ("7.9", "7.10"),
        ("7.2", "7.2.0"),
        ("7.2~rc1", "7.2"),
        ("7.2+dfsg-7+deb12u6", "7.2+dfsg-7+deb12u10"),
        ("9.9.9", "1:7.0"),
        ("1:7.2+dfsg-7+deb12u6", "1:8.2.2+ds-0ubuntu1"),
    ],
)
def test_versions_compare_as_ordered_values(low, high):
    """Versions order numerically per run, with epochs and Debian revisions; never as strings."""
    assert Version(low) < Version(high) and Version(high) > Version(low)


def test_versions_equal_and_hashable():
    """Equal versions are equal whatever their spelling of a missing revision; bad text raises VersionError."""
    assert Version("1.0") == Version("1.0-0") and hash(Version("7.02")) == hash(Version("7.2"))
    assert sorted(map(Version, ["7.10", "7.9", "7.2.1"])) == [Version("7.2.1"), Version("7.9"), Version("7.10")]
    for bad in ["", "latest", "a:7.2", "7.2-", "7 2"]:
        with pytest.raises(VersionError):
            Version(bad)


def test_profile_security_level():
    """An explicit security_level wins, then sensitivity, then 0."""
    assert profile_security_level({"security_level": "4", "sensitivity": "public"}) == 4
    assert profile_security_level({"sensitivity": "secret"}) == 3
    assert profile_security_level({"sensitivity": "confidential"}) == 2
    assert profile_security_level({"security_level": "high", "sensitivity": "internal"}) == 1
    assert profile_security_level({}) == 0


def test_unsatisfiable_host_rule_names_the_rule_and_the_fleet():
    """A site-level floor above every site of the fleet is reported at its line with the highest level there is."""
    policies = parse_policies({"p.yaml": GOOD})
    [error] = unsatisfiable(policies, [host("h1"), host("h2", site_security_level=1)])
    assert (error.file, error.line, error.field) == ("p.yaml", 7, "require.min_site_security_level")
    assert "≤ 2" in error.allowed


def test_unsatisfiable_combination_and_targets():
    """Rules each satisfiable but never together are reported on require; targets that satisfy nothing too."""
    text = (
        "name: a\nselect: {tenants: [a]}\nrequire: {zones: [z1], min_patch_level: 5}\n"
        "---\nname: b\nselect: {tenants: [b]}\nrequire: {zones: [z2]}\nmigration: {allowed_targets: [h1, h9]}\n"
    )
    hosts = [host("h1", zone="z1", patch_level=1), host("h2", zone="z2", patch_level=7)]
    errors = unsatisfiable(parse_policies({"p.yaml": text}), hosts)
    assert [(e.field, e.line) for e in errors] == [("require", 3), ("migration.allowed_targets", 8)]
    assert "zones alone 1" in errors[0].problem and "h2" in errors[1].allowed


def test_satisfiable_set_and_empty_fleet_report_nothing():
    """A set some host satisfies, or any set before hosts exist, is not reported."""
    policies = parse_policies({"p.yaml": GOOD})
    assert unsatisfiable(policies, [host("h1", site_security_level=3)]) == []
    assert unsatisfiable(policies, []) == []
