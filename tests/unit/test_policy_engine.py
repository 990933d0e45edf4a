"""The policy engine on hand-worked fleets: one or more cases per rule kind, the symmetric neighbour rules,
capacity and schedulability, scores and tie-breaks, explanations, and incremental updates."""

from __future__ import annotations

import dataclasses

import pytest

from ferryman.core.errors import Conflict, NotFound
from ferryman.policy import (
    FleetIndex,
    HostFacts,
    MigrationRules,
    Reason,
    VMFacts,
    compile_policies,
    parse_policies,
)


def host(name: str, **labels) -> HostFacts:
    values = {
        "site": "paris-1",
        "site_security_level": 3,
        "zone": "z1",
        "subnet": "10.0.1.0/24",
        "virt_type": "kvm",
        "hypervisor": "qemu",
        "hypervisor_version": "8.0.0",
        "patch_level": 5,
        "memory_mb": 8192,
    }
    values.update(labels)
    return HostFacts(name=name, **values)


def vm(vm_id: str, tenant: str = "acme", host_name: str | None = None, memory_mb: int = 1024, **profile) -> VMFacts:
    return VMFacts(vm_id, vm_id, tenant, profile, memory_mb, host_name)


def index_of(policies: str, hosts: list[HostFacts], vms: list[VMFacts] = ()) -> FleetIndex:
    return FleetIndex(compile_policies(parse_policies({"policies.yaml": policies})), hosts, list(vms))


def rules(reasons: list[Reason]) -> set[tuple[str, str]]:
    return {(r.policy, r.rule) for r in reasons}


def require(rule_yaml: str, select: str = "{tenants: [acme]}", name: str = "acme-rules") -> str:
    return f"name: {name}\nselect: {select}\nrequire: {rule_yaml}\n"


# ---------------------------------------------------------------------------------------------------- location


def test_site_security_level_floor():
    """A host whose site is below the floor is refused with the levels in the message; placement avoids it."""
    index = index_of(
        require("{min_site_security_level: 3}"),
        [host("h1", site="lyon-2", site_security_level=2), host("h2", site_security_level=3)],
    )
    [reason] = index.admit(vm("a"), "h1")
    assert reason == Reason(
        "acme-rules", "min_site_security_level", "site lyon-2 has security level 2 < 3 required by acme-rules"
    )
    assert index.admit(vm("a"), "h2") == []
    assert index.place(vm("a")).host == "h2"


def test_allowed_and_forbidden_sites():
    """sites lists where a VM may run; forbidden_sites where it may not."""
    index = index_of(
        require("{sites: [paris-1, lyon-1], forbidden_sites: [lyon-1]}"),
        [host("h1", site="paris-1"), host("h2", site="lyon-1"), host("h3", site="nice-1")],
    )
    assert index.admit(vm("a"), "h1") == []
    assert rules(index.admit(vm("a"), "h2")) == {("acme-rules", "forbidden_sites")}
    assert rules(index.admit(vm("a"), "h3")) == {("acme-rules", "sites")}
    assert "site nice-1 is not among the sites acme-rules allows" in index.admit(vm("a"), "h3")[0].message


def test_other_tenants_are_not_governed():
    """A policy selecting acme says nothing about globex's VMs."""
    index = index_of(require("{min_site_security_level: 4}"), [host("h1")])
    assert index.admit(vm("g", tenant="globex"), "h1") == []


# ------------------------------------------------------------------------------------------------ neighbourhood


def test_max_vms_per_host_counts_the_vm_itself():
    """max_vms_per_host 2: a host with one VM takes the VM, a host with two does not."""
    index = index_of(
        require("{max_vms_per_host: 2}"),
        [host("h1"), host("h2")],
        [vm("x", "globex", "h1"), vm("y", "globex", "h2"), vm("z", "globex", "h2")],
    )
    assert index.admit(vm("a"), "h1") == []
    [reason] = index.admit(vm("a"), "h2")
    assert (reason.rule, reason.message) == (
        "max_vms_per_host",
        "host h2 already runs 2 VMs; acme-rules allows at most 2 per host, this VM included",
    )


def test_max_vms_per_host_is_symmetric():
    """A VM capped at 2 per host keeps any other VM off its host once it has a neighbour."""
    index = index_of(require("{max_vms_per_host: 2}"), [host("h1")], [vm("a", host_name="h1")])
    assert index.admit(vm("g", "globex"), "h1") == []
    index.add_vm(vm("g", "globex", "h1"))
    assert rules(index.admit(vm("k", "initech"), "h1")) == {("acme-rules", "max_vms_per_host")}
    assert "a under acme-rules allow at most 2" in index.admit(vm("k", "initech"), "h1")[0].message


NO_TEST = require(
    "{forbidden_neighbours: [{other_tenant: true, profile: {environment: test}}]}",
    select="{tenants: [acme], profile: {environment: production}}",
    name="acme-production",
)


def test_forbidden_neighbours_other_tenant():
    """Production of acme never next to another tenant's test VM; acme's own test VMs are fine."""
    index = index_of(
        NO_TEST,
        [host("h1"), host("h2")],
        [vm("t", "globex", "h1", environment="test"), vm("own", "acme", "h2", environment="test")],
    )
    prod = vm("p", environment="production")
    [reason] = index.admit(prod, "h1")
    assert reason.rule == "forbidden_neighbours[0]"
    assert reason.message == (
        "host h1 runs t (globex), which acme-production forbids as neighbours (another tenant's VM, environment=test)"
    )
    assert index.admit(prod, "h2") == []


def test_forbidden_neighbours_is_symmetric():
    """Another tenant's test VM may not join a host running acme production: the production VM's rule refuses it."""
    index = index_of(NO_TEST, [host("h1"), host("h2")], [vm("p", "acme", "h1", environment="production")])
    test = vm("t", "globex", environment="test")
    [reason] = index.admit(test, "h1")
    assert (reason.policy, reason.rule) == ("acme-production", "forbidden_neighbours[0]")
    assert "runs p, whose policy acme-production forbids neighbours like this VM" in reason.message
    assert index.place(test).host == "h2"
    assert index.admit(vm("t2", "globex", environment="staging"), "h1") == []


def test_forbidden_neighbours_by_tenant_and_name():
    """Selectors may name tenants and VM names; all given fields must match."""
    policy = require("{forbidden_neighbours: [{tenants: [globex], vms: [db-1]}]}")
    index = index_of(policy, [host("h1"), host("h2")], [vm("db-1", "globex", "h1"), vm("db-2", "globex", "h2")])
    assert rules(index.admit(vm("a"), "h1")) == {("acme-rules", "forbidden_neighbours[0]")}
    assert index.admit(vm("a"), "h2") == []


def test_dedicated_host_both_ways():
    """A dedicated VM refuses hosts with other tenants, and keeps other tenants off its own host."""
    index = index_of(
        require("{dedicated_host: true}"),
        [host("h1"), host("h2"), host("h3")],
        [vm("g", "globex", "h1"), vm("a1", "acme", "h2")],
    )
    assert rules(index.admit(vm("a2"), "h1")) == {("acme-rules", "dedicated_host")}
    assert index.admit(vm("a2"), "h2") == []  # same tenant
    [reason] = index.admit(vm("k", "initech"), "h2")
    assert (reason.rule, reason.policy) == ("dedicated_host", "acme-rules")
    assert "requires a host of their tenant alone" in reason.message
    assert index.admit(vm("k", "initech"), "h3") == []


def test_min_neighbour_security_level_both_ways():
    """A VM demanding level ≥ 2 neighbours refuses a public neighbour, and a public VM may not join it."""
    index = index_of(
        require("{min_neighbour_security_level: 2}", select="{profile: {sensitivity: secret}}", name="secret"),
        [host("h1"), host("h2"), host("h3")],
        [vm("pub", "globex", "h1", sensitivity="public"), vm("s1", "acme", "h2", sensitivity="secret")],
    )
    secret = vm("s2", sensitivity="secret")
    [reason] = index.admit(secret, "h1")
    assert reason.message == "host h1 runs pub (level 0), below security level 2 required of neighbours by secret"
    assert index.admit(secret, "h2") == []
    assert rules(index.admit(vm("p2", "globex", sensitivity="public"), "h2")) == {
        ("secret", "min_neighbour_security_level")
    }
    assert index.admit(vm("c", "globex", sensitivity="confidential"), "h2") == []
    assert index.admit(vm("p3", "globex", security_level="2"), "h2") == []


# --------------------------------------------------------------------------------------------- network, virt, hv


def test_zones_subnets_virt_types_hypervisors():
    """Each label rule refuses hosts whose label is not listed, naming the label."""
    policy = require("{zones: [z1], subnets: [10.0.1.0/24], virt_types: [kvm-sev], hypervisors: [qemu]}")
    index = index_of(
        policy,
        [
            host("ok", virt_type="kvm-sev"),
            host("zone", zone="z2", virt_type="kvm-sev"),
            host("net", subnet="10.0.2.0/24", virt_type="kvm-sev"),
            host("virt"),
            host("hv", hypervisor="cloud-hypervisor", virt_type="kvm-sev"),
        ],
    )
    assert index.admit(vm("a"), "ok") == []
    assert rules(index.admit(vm("a"), "zone")) == {("acme-rules", "zones")}
    assert rules(index.admit(vm("a"), "net")) == {("acme-rules", "subnets")}
    assert rules(index.admit(vm("a"), "virt")) == {("acme-rules", "virt_types")}
    assert rules(index.admit(vm("a"), "hv")) == {("acme-rules", "hypervisors")}
    [reason] = index.admit(vm("a"), "virt")
    assert "virt type kvm is not among the virt types acme-rules allows (kvm-sev)" in reason.message


def test_hypervisor_version_orders_numerically():
    """A 7.9 floor admits 7.10 and a Debian 1:7.2 (epoch 1), refuses 7.8.9 and an unreadable version."""
    index = index_of(
        require('{min_hypervisor_version: "7.9"}'),
        [
            host("h710", hypervisor_version="7.10.0"),
            host("h789", hypervisor_version="7.8.9"),
            host("deb", hypervisor_version="1:7.2+dfsg-7+deb12u6"),
            host("junk", hypervisor_version="unknown"),
        ],
    )
    assert index.admit(vm("a"), "h710") == []
    assert index.admit(vm("a"), "deb") == []
    assert index.admit(vm("a"), "h789")[0].message == "hypervisor version 7.8.9 < 7.9 required by acme-rules"
    assert "cannot be read" in index.admit(vm("a"), "junk")[0].message
    assert index.eligible_hosts(vm("a")) == ["deb", "h710"]


def test_patch_level_floor():
    """A host below min_patch_level is refused with both numbers."""
    index = index_of(require("{min_patch_level: 4}"), [host("h1", patch_level=3), host("h2", patch_level=4)])
    assert index.admit(vm("a"), "h1")[0].message == "patch level 3 < 4 required by acme-rules"
    assert index.admit(vm("a"), "h2") == []


# ----------------------------------------------------------------------------------------------- image baselines

BASELINE = require('{min_image_version: {debian: "12.8", ubuntu: "22.04.4"}}')


def imaged(vm_id: str, image: str | None, os: str | None = None, version: str | None = None, **kw) -> VMFacts:
    """A VM booting ``image``, whose registry baseline is ``os`` ``version`` (None: unknown to the registry)."""
    return dataclasses.replace(vm(vm_id, **kw), image=image, image_os=os, image_version=version)


def test_image_below_the_minimum_violates_at_and_above_do_not():
    """debian 12.7 is below a 12.8 floor; 12.8 meets it and 12.10 is above it (versions order numerically)."""
    vms = [
        imaged("old", "deb-12-7", "debian", "12.7", host_name="h1"),
        imaged("at", "deb-12-8", "debian", "12.8", host_name="h1"),
        imaged("new", "deb-12-10", "debian", "12.10", host_name="h1"),
        imaged("lts", "jammy-4", "ubuntu", "22.04.4", host_name="h1"),
        imaged("jammy", "jammy-3", "ubuntu", "22.04.3", host_name="h1"),
    ]
    index = index_of(BASELINE, [host("h1")], vms)
    violations = index.violations()
    assert [v.key for v in violations] == [
        ("jammy", "acme-rules", "min_image_version"),
        ("old", "acme-rules", "min_image_version"),
    ]
    assert violations[1].message == (
        "image deb-12-7 is debian 12.7, below the minimum debian version 12.8 required by acme-rules"
    )
    assert violations[1].host == "h1" and violations[1].neighbours == ()
    assert index.violations(["at", "new", "lts"]) == []


def test_image_unknown_to_the_registry_violates_the_baseline():
    """A VM whose image the registry does not know (or that names none) cannot show its baseline: a violation."""
    vms = [imaged("lab", "lab", host_name="h1"), imaged("bare", None, host_name="h1")]
    index = index_of(BASELINE, [host("h1")], vms)
    found = {v.vm_id: v for v in index.violations()}
    assert set(found) == {"lab", "bare"} and {v.rule for v in found.values()} == {"min_image_version"}
    assert found["lab"].message.startswith("image baseline unknown: image lab is not in the image registry")
    assert "(debian 12.8, ubuntu 22.04.4)" in found["lab"].message
    assert found["bare"].message.startswith("image baseline unknown: the VM names no image")


def test_image_of_an_os_the_rule_does_not_name_is_not_constrained():
    """An alpine image is free under a rule naming debian and ubuntu; other tenants' images are not governed."""
    vms = [
        imaged("a", "alpine-3", "alpine", "3.1", host_name="h1"),
        imaged("g", "lab", tenant="globex", host_name="h1"),
    ]
    index = index_of(BASELINE, [host("h1")], vms)
    assert index.violations() == []
    assert index.admit(vms[0], "h1") == [] and index.admit(vms[1], "h1") == []


def test_below_the_baseline_is_refused_on_every_host_with_the_reason():
    """Creation and migration of a VM below the baseline are refused on every host, each time with the reason."""
    hosts = [host("h1"), host("h2"), host("h3", patch_level=1)]
    index = index_of(BASELINE, hosts)
    new = imaged("new", "deb-12-7", "debian", "12.7")
    expected = Reason(
        "acme-rules",
        "min_image_version",
        "image deb-12-7 is debian 12.7, below the minimum debian version 12.8 required by acme-rules",
    )
    for h in hosts:
        assert index.admit(new, h.name) == [expected]
    decision = index.place(new)
    assert decision.host is None and decision.allowed == 0
    assert {name: reasons for name, reasons in decision.rejections.items()} == {h.name: [expected] for h in hosts}
    assert "acme-rules min_image_version rejects 3" in decision.summary()

    placed = imaged("placed", "lab", host_name="h1")
    index.add_vm(placed)
    for h in ("h2", "h3"):
        assert rules(index.admit(placed, h)) == {("acme-rules", "min_image_version")}
        assert "image baseline unknown" in index.admit(placed, h)[0].message
    assert index.place(placed).host is None
    assert index.place(imaged("fine", "deb-12-8", "debian", "12.8")).host == "h2"  # h1 runs a VM already


def test_new_image_facts_resolve_the_violation():
    """A VM whose facts change to an image at the baseline no longer violates it."""
    index = index_of(BASELINE, [host("h1")], [imaged("a", "lab", host_name="h1")])
    assert [v.vm_id for v in index.violations()] == ["a"]
    assert index.update_vm(imaged("a", "deb-12-9", "debian", "12.9", host_name="h1")) == {"a"}
    assert index.violations() == [] and index.violations(["a"]) == []


# ------------------------------------------------------------------------------------------ built-in hard rules


def test_capacity_is_a_hard_rule():
    """A VM needs its memory free on the host (sum of the VMs there plus itself within the host's memory)."""
    index = index_of(require("{min_patch_level: 0}"), [host("h1", memory_mb=2048)], [vm("x", "globex", "h1", 1536)])
    [reason] = index.admit(vm("a", memory_mb=1024), "h1")
    assert reason == Reason("", "capacity", "host h1 has 512 MiB free, the VM needs 1024 MiB")
    assert index.admit(vm("b", memory_mb=512), "h1") == []


def test_unschedulable_and_quarantined_hosts_are_never_targets_but_still_checked():
    """A down or quarantined host takes no VM; the VMs already there are still audited."""
    index = index_of(
        require("{min_patch_level: 4}"),
        [host("down", schedulable=False), host("jail", role="quarantine", patch_level=1), host("up")],
        [vm("a", host_name="jail")],
    )
    assert rules(index.admit(vm("b"), "down")) == {("", "schedulable")}
    assert "in quarantine" in index.admit(vm("b"), "jail")[0].message
    assert index.place(vm("b")).host == "up"
    assert [v.key for v in index.violations()] == [("a", "acme-rules", "min_patch_level")]
    assert rules(index.admit(vm("a", host_name="jail"), "jail")) == {("acme-rules", "min_patch_level")}


def test_allowed_targets_restrict_migrations_only():
    """migration.allowed_targets limits where a placed VM may move, not where a new VM may start or stay."""
    policy = "name: pinned\nselect: {tenants: [acme]}\nmigration: {allowed_targets: [h2]}\n"
    index = index_of(policy, [host("h1"), host("h2"), host("h3")], [vm("a", host_name="h1")])
    placed = index.vm("a")
    assert rules(index.admit(placed, "h3")) == {("pinned", "migration.allowed_targets")}
    assert index.admit(placed, "h2") == [] and index.admit(placed, "h1") == []
    assert index.admit(vm("new"), "h3") == []
    decision = index.place(placed)
    assert decision.host == "h2"
    assert ("", "current_host") in rules(decision.rejections["h1"])


def test_unknown_host_is_refused():
    """Admission to a host the index does not know is a reason, not an exception."""
    index = index_of(require("{min_patch_level: 0}"), [host("h1")])
    assert rules(index.admit(vm("a"), "nowhere")) == {("", "unknown_host")}


# ------------------------------------------------------------------------------------------------------- scores


def test_prefer_weights_choose_the_host():
    """The host satisfying the heaviest preferences wins; ranked lists the next ones with their scores."""
    policy = """
name: acme
select: {tenants: [acme]}
prefer:
  - {weight: 10, sites: [paris-1]}
  - {weight: 3, min_patch_level: 7}
  - {weight: 4, zones: [z2]}
"""
    hosts = [
        host("a-lyon-patched", site="lyon-1", patch_level=9, zone="z2"),
        host("b-paris", site="paris-1"),
        host("c-paris-patched", site="paris-1", patch_level=8),
        host("d-lyon", site="lyon-1"),
    ]
    decision = index_of(policy, hosts).place(vm("a"))
    assert (decision.host, decision.score) == ("c-paris-patched", 13)
    assert decision.ranked == [("c-paris-patched", 13), ("b-paris", 10), ("a-lyon-patched", 7), ("d-lyon", 0)]


def test_neighbour_preferences_score_too():
    """A soft dedicated_host prefers a host without other tenants but does not require one."""
    policy = "name: acme\nselect: {tenants: [acme]}\nprefer: [{weight: 5, dedicated_host: true}]\n"
    index = index_of(policy, [host("h1"), host("h2")], [vm("g", "globex", "h1"), vm("a0", "acme", "h2")])
    assert index.place(vm("a")).ranked == [("h2", 5), ("h1", 0)]


def test_ties_go_to_the_fewest_vms_then_the_first_name():
    """Equal scores: the emptiest host wins, then alphabetical order, also for hosts added later."""
    index = index_of(require("{min_patch_level: 0}"), [host("h2"), host("h3"), host("h4")], [vm("x", "globex", "h2")])
    assert index.place(vm("a")).ranked == [("h3", 0), ("h4", 0), ("h2", 0)]
    index.update_host(host("h1"))  # added after the index was built, sorts first by name
    index.update_host(host("h0", schedulable=False))
    assert index.place(vm("a")).ranked == [("h1", 0), ("h3", 0), ("h4", 0), ("h2", 0)]


def test_ties_on_crowded_hosts_still_prefer_the_fewest_vms():
    """Beyond the VM counts kept as bitsets (64), ties still go to the host with fewer VMs."""
    hosts = [host("h1", memory_mb=1 << 20), host("h2", memory_mb=1 << 20)]
    vms = [vm(f"x{i}", "globex", "h1", 16) for i in range(70)] + [vm(f"y{i}", "globex", "h2", 16) for i in range(66)]
    index = index_of(require("{min_patch_level: 0}"), hosts, vms)
    assert index.place(vm("a")).ranked == [("h2", 0), ("h1", 0)]


def test_exclude_rules_hosts_out_with_a_reason():
    """Hosts the caller excludes are rejected as excluded."""
    index = index_of(require("{min_patch_level: 0}"), [host("h1"), host("h2")])
    decision = index.place(vm("a"), exclude=["h1"])
    assert decision.host == "h2" and rules(decision.rejections["h1"]) == {("", "excluded")}


def test_conflicts_are_pairwise_and_symmetric():
    """conflicts() names the neighbour rules two VMs break together, in both directions, and ignores counts."""
    policies = NO_TEST + "---\n" + require("{max_vms_per_host: 1}", select="{tenants: [initech]}", name="alone")
    index = index_of(policies, [host("h1")])
    prod, test = vm("p", environment="production"), vm("t", "globex", environment="test")
    assert rules(index.conflicts(prod, test)) == {("acme-production", "forbidden_neighbours[0]")}
    assert rules(index.conflicts(test, prod)) == {("acme-production", "forbidden_neighbours[0]")}
    assert index.conflicts(prod, vm("s", "globex", environment="staging")) == []
    assert index.conflicts(vm("i", "initech"), vm("j", "initech")) == []


# ------------------------------------------------------------------------------------------------- explanations


def test_every_rejected_host_is_explained():
    """Every host not allowed has at least one reason, and counts per rule add up."""
    policy = require("{min_site_security_level: 3, zones: [z1], min_patch_level: 2}")
    hosts = [
        host(f"h{i}", site_security_level=i % 5, zone=f"z{i % 3}", patch_level=i % 4, memory_mb=1024 + 512 * (i % 3))
        for i in range(60)
    ]
    index = index_of(policy, hosts, [vm(f"x{i}", "globex", f"h{i}", 1024) for i in range(0, 60, 7)])
    decision = index.place(vm("a", memory_mb=1024))
    allowed = {
        h.name
        for h in hosts
        if h.site_security_level >= 3
        and h.zone == "z1"
        and h.patch_level >= 2
        and (not index.vms_on(h.name) or h.memory_mb >= 2048)
    }
    assert decision.allowed == len(allowed)
    assert set(decision.rejections) == {h.name for h in hosts} - allowed
    assert all(decision.rejections[name] for name in decision.rejections)
    counts = decision.rejections.counts()
    assert counts[("acme-rules", "min_site_security_level")] == sum(1 for h in hosts if h.site_security_level < 3)
    assert "hosts rejected" in decision.summary()


def test_no_host_allowed_summary_names_the_rules():
    """When nothing is allowed, the summary says so and names the rules that reject the most hosts."""
    index = index_of(require("{min_site_security_level: 5}"), [host("h1"), host("h2")])
    decision = index.place(vm("a"))
    assert decision.host is None and decision.ranked == []
    assert decision.summary() == "no host allowed; 2 hosts rejected: acme-rules min_site_security_level rejects 2"


# ---------------------------------------------------------------------------------------------------- compliance


def test_violation_of_a_symmetric_rule_belongs_to_the_rule_owner():
    """A test VM next to acme production: the production VM is in violation, naming the test VM."""
    index = index_of(
        NO_TEST,
        [host("h1")],
        [vm("p", "acme", "h1", environment="production"), vm("t", "globex", "h1", environment="test")],
    )
    [violation] = index.violations()
    assert violation.key == ("p", "acme-production", "forbidden_neighbours[0]")
    assert (violation.host, violation.neighbours, violation.tenant) == ("h1", ("t",), "acme")
    assert index.violations(["t"]) == []
    assert index.violations(["p", "unknown"]) == [violation]


def test_violations_of_every_neighbour_rule():
    """Count, dedicated and neighbour-level rules are reported with the offending neighbours."""
    policy = require(
        "{max_vms_per_host: 2, dedicated_host: true, min_neighbour_security_level: 1}",
        select="{tenants: [acme], profile: {sensitivity: secret}}",
    )
    index = index_of(
        policy,
        [host("h1")],
        [vm("s", "acme", "h1", sensitivity="secret"), vm("o", "acme", "h1"), vm("g", "globex", "h1")],
    )
    found = {v.rule: v.neighbours for v in index.violations()}
    assert found == {
        "max_vms_per_host": ("g", "o"),
        "dedicated_host": ("g",),
        "min_neighbour_security_level": ("g", "o"),
    }


def test_incremental_updates_match_a_fresh_index():
    """After moves, host changes, removals and additions the index reports what a new index would."""
    policy = NO_TEST + "---\n" + require("{min_patch_level: 3, max_vms_per_host: 3}", name="patched")
    hosts = [host("h1"), host("h2"), host("h3")]
    vms = [
        vm("p", "acme", "h1", environment="production"),
        vm("t", "globex", "h2", environment="test"),
        vm("a", "acme", "h3"),
    ]
    index = index_of(policy, hosts, vms)
    assert index.violations() == []
    assert index.move_vm("t", "h1") == {"t", "p"}
    index.update_host(host("h3", patch_level=1))
    assert index.add_vm(vm("b", "acme", "h3")) == {"b", "a"}
    index.add_vm(vm("c", "acme", "h3"))
    index.add_vm(vm("d", "acme", "h3"))
    assert index.remove_vm("d") == {"d", "a", "b", "c"}
    fleet = [index.vm(v) for v in index.vm_ids()]
    fresh = FleetIndex(index.compiled, [host("h1"), host("h2"), host("h3", patch_level=1)], fleet)
    assert index.violations() == fresh.violations()
    assert {v.key for v in index.violations()} == {
        ("p", "acme-production", "forbidden_neighbours[0]"),
        ("a", "patched", "min_patch_level"),
        ("b", "patched", "min_patch_level"),
        ("c", "patched", "min_patch_level"),
    }


def test_change_results_name_the_vms_to_recheck():
    """A move names the VM and its old and new neighbours; a host change names the VMs on it."""
    index = index_of(
        require("{min_patch_level: 1}"),
        [host("h1"), host("h2")],
        [vm("a", host_name="h1"), vm("b", host_name="h1"), vm("c", host_name="h2")],
    )
    assert index.move_vm("a", "h2") == {"a", "b", "c"}
    assert index.update_host(host("h2", patch_level=0)) == {"a", "c"}
    assert index.update_host(host("h2", patch_level=0)) == frozenset()
    assert index.move_vm("a", None) == {"a", "c"}
    assert index.vm("a").host is None and index.violations(["a"]) == []


def test_update_vm_reclassifies():
    """A VM whose profile changes is governed by the policies that now select it."""
    vms = [vm("p", "acme", "h1", environment="staging"), vm("t", "globex", "h1", environment="test")]
    index = index_of(NO_TEST, [host("h1")], vms)
    assert index.violations() == []
    index.update_vm(vm("p", "acme", "h1", environment="production"))
    assert index.policies_of("p") == ("acme-production",)
    assert [v.vm_id for v in index.violations()] == ["p"]


def test_hosts_come_and_go():
    """A new host is a target at once; a host with VMs cannot be removed; an empty one can."""
    index = index_of(require("{min_patch_level: 0}"), [host("h1")], [vm("a", host_name="h1")])
    index.update_host(host("h9"))
    assert index.place(vm("b")).host == "h9"
    with pytest.raises(Conflict):
        index.remove_host("h1")
    index.remove_host("h9")
    assert index.place(vm("b")).host == "h1"
    with pytest.raises(NotFound):
        index.remove_host("h9")
    with pytest.raises(NotFound):
        index.add_vm(vm("c", host_name="h9"))
    with pytest.raises(Conflict):
        index.add_vm(vm("a", host_name="h1"))


def test_migration_rules_combine_over_policies():
    """Targets intersect, the longest cooldown wins, and auto_balance false from any policy wins."""
    policies = """
name: one
select: {tenants: [acme]}
migration: {allowed_targets: [h1, h2, h3], cooldown: 5m}
---
name: two
select: {profile: {environment: production}}
migration: {allowed_targets: [h2, h3, h4], cooldown: 1h, auto_balance: false}
"""
    vms = [vm("a", host_name="h1", environment="production"), vm("b", host_name="h1")]
    index = index_of(policies, [host("h1")], vms)
    assert index.migration_rules("a") == MigrationRules(
        frozenset({"h2", "h3"}), 3600.0, False, target_policies=("one", "two"), manual_only_policies=("two",)
    )
    assert index.migration_rules("b") == MigrationRules(frozenset({"h1", "h2", "h3"}), 300.0, True, ("one",), ())


def test_recompile_audits_under_a_new_policy_set():
    """A policy-set change builds a new index over the same fleet."""
    index = index_of(require("{min_patch_level: 0}"), [host("h1", patch_level=2)], [vm("a", host_name="h1")])
    stricter = index.recompile(compile_policies(parse_policies({"p.yaml": require("{min_patch_level: 3}")})))
    assert [v.key for v in stricter.violations()] == [("a", "acme-rules", "min_patch_level")]
    assert index.violations() == []


def test_host_load_report():
    """The load report lists VMs and memory per host."""
    hosts = [host("h1"), host("h2", schedulable=False)]
    index = index_of(require("{min_patch_level: 0}"), hosts, [vm("a", host_name="h1")])
    report = {h.name: (h.vms, h.memory_used_mb, h.placeable) for h in index.hosts_report()}
    assert report == {"h1": (1, 1024, True), "h2": (0, 0, False)}
    assert dataclasses.asdict(index.host_load("h1"))["memory_mb"] == 8192
