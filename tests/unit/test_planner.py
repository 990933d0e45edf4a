"""The remediation planner on hand-worked fleets: who moves, where, in which order, and what is left and why."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferryman.core.errors import InvalidInput
from ferryman.policy import FleetIndex, HostFacts, VMFacts, compile_policies, parse_policies
from ferryman.scheduler.planner import Plan, lower_bound, plan_remediation
from ferryman.testing import policy_reference as ref

NO_TEST_NEIGHBOURS = """
name: acme-production
select: {tenants: [acme], profile: {environment: production}}
require:
  forbidden_neighbours: [{other_tenant: true, profile: {environment: test}}]
"""

PATCHED = """
name: patched
select: {tenants: [acme]}
require: {min_patch_level: 3}
"""


def host(name: str, **labels) -> HostFacts:
    values = {
        "site": "par1",
        "site_security_level": 2,
        "zone": "z1",
        "subnet": "n1",
        "virt_type": "kvm",
        "hypervisor": "qemu",
        "hypervisor_version": "8.0.0",
        "patch_level": 5,
        "memory_mb": 8192,
    }
    values.update(labels)
    return HostFacts(name=name, **values)


def vm(vm_id: str, tenant: str, host_name: str | None, memory_mb: int = 1024, **profile: str) -> VMFacts:
    return VMFacts(vm_id, vm_id, tenant, profile, memory_mb, host_name)


def index_of(policies: str, hosts: list[HostFacts], vms: list[VMFacts]) -> FleetIndex:
    return FleetIndex(compile_policies(parse_policies({"policies.yaml": policies})), hosts, vms)


def plan(index: FleetIndex, *, max_moves=None, max_out=2, max_in=2, frozen=None) -> Plan:
    return plan_remediation(
        index, max_moves=max_moves, max_out_per_host=max_out, max_in_per_host=max_in, frozen_vms=frozen or {}
    )


def applied(index: FleetIndex, result: Plan) -> FleetIndex:
    """A fresh index of the fleet after every move of the plan."""
    vms = {v: index.vm(v) for v in index.vm_ids()}
    for move in result.moves:
        assert vms[move.vm_id].host == move.source
        vms[move.vm_id] = dataclasses.replace(vms[move.vm_id], host=move.target)
    return FleetIndex(index.compiled, index.hosts(), list(vms.values()))


def test_nothing_to_fix_gives_an_empty_plan():
    """A compliant fleet needs no move and no solver."""
    index = index_of(PATCHED, [host("h1")], [vm("a", "acme", "h1")])
    result = plan(index)
    assert result == Plan([], [], "none", 0)


def test_one_move_fixes_a_host_rule_violation():
    """A VM on a host below its patch floor moves to a host that meets it; the move names the key it fixes."""
    hosts = [host("h1", patch_level=1), host("h2"), host("h3", patch_level=2)]
    index = index_of(PATCHED, hosts, [vm("a", "acme", "h1")])
    result = plan(index)
    assert [(m.vm_id, m.source, m.target) for m in result.moves] == [("a", "h1", "h2")]
    assert result.moves[0].fixes == (("a", "patched", "min_patch_level"),)
    assert result.unresolved == [] and result.solver == "greedy" and result.lower_bound == 1
    assert applied(index, result).violations() == []


def test_the_index_is_left_as_it_was():
    """Planning simulates moves on the index and puts every VM back."""
    index = index_of(PATCHED, [host("h1", patch_level=1), host("h2")], [vm("a", "acme", "h1"), vm("b", "acme", "h2")])
    plan(index)
    assert index.vm("a").host == "h1" and index.vms_on("h2") == ("b",)
    assert [v.key for v in index.violations()] == [("a", "patched", "min_patch_level")]


def test_neighbour_moves_when_the_violating_vm_may_not():
    """A production VM frozen next to another tenant's test VM stays; the test VM moves away instead."""
    hosts = [host("h1"), host("h2")]
    vms = [vm("prod", "acme", "h1", environment="production"), vm("test", "globex", "h1", environment="test")]
    index = index_of(NO_TEST_NEIGHBOURS, hosts, vms)
    result = plan(index, frozen={"prod": "cooldown: 240 s left"})
    assert [(m.vm_id, m.target) for m in result.moves] == [("test", "h2")]
    assert result.moves[0].fixes == (("prod", "acme-production", "forbidden_neighbours[0]"),)
    assert applied(index, result).violations() == []


def test_auto_balance_false_counts_as_frozen():
    """A VM whose policy sets auto_balance: false is never moved by the planner."""
    policies = NO_TEST_NEIGHBOURS + "migration: {auto_balance: false}\n"
    hosts = [host("h1"), host("h2")]
    vms = [vm("prod", "acme", "h1", environment="production"), vm("test", "globex", "h1", environment="test")]
    result = plan(index_of(policies, hosts, vms))
    assert [m.vm_id for m in result.moves] == ["test"]


def test_frozen_vm_with_a_host_rule_violation_is_unresolved_with_the_reason():
    """Only the VM itself can fix a host-rule violation; frozen, it stays and the plan says why."""
    index = index_of(PATCHED, [host("h1", patch_level=1), host("h2")], [vm("a", "acme", "h1")])
    result = plan(index, frozen={"a": "operator freeze until the audit"})
    assert result.moves == []
    [(violation, why)] = result.unresolved
    assert violation.key == ("a", "patched", "min_patch_level")
    assert "operator freeze until the audit" in why


def test_outbound_throttle_leaves_violations_with_the_limit_named():
    """With max_out_per_host 1, only one of two VMs on the same host may leave in this wave."""
    hosts = [host("h1", patch_level=1), host("h2"), host("h3")]
    index = index_of(PATCHED, hosts, [vm("a", "acme", "h1"), vm("b", "acme", "h1")])
    result = plan(index, max_out=1)
    assert len(result.moves) == 1
    [(_, why)] = result.unresolved
    assert "max_out_per_host=1" in why


def test_inbound_throttle_spreads_or_refuses():
    """With max_in_per_host 1 and one good host, the second VM cannot follow the first; the reason says so."""
    hosts = [host("h1", patch_level=1), host("h2", patch_level=1), host("h3")]
    index = index_of(PATCHED, hosts, [vm("a", "acme", "h1"), vm("b", "acme", "h2")])
    result = plan(index, max_in=1)
    assert [(m.vm_id, m.target) for m in result.moves] == [("a", "h3")]
    [(violation, why)] = result.unresolved
    assert violation.vm_id == "b" and "max_in_per_host=1" in why


def test_max_moves_caps_the_plan():
    """A plan never has more moves than max_moves; what is left says the cap was reached."""
    hosts = [host("h1", patch_level=1), host("h2", patch_level=1), host("h3")]
    index = index_of(PATCHED, hosts, [vm("a", "acme", "h1"), vm("b", "acme", "h2")])
    result = plan(index, max_moves=1)
    assert len(result.moves) == 1
    assert "max_moves=1" in result.unresolved[0][1]


def test_cp_sat_moves_the_shared_culprit_once_where_greedy_moves_each_victim():
    """Two production VMs next to one foreign test VM: greedy moves both, CP-SAT moves the test VM alone."""
    hosts = [host("h1"), host("h2"), host("h3")]
    vms = [
        vm("p1", "acme", "h1", environment="production"),
        vm("p2", "acme", "h1", environment="production"),
        vm("t", "globex", "h1", environment="test"),
    ]
    index = index_of(NO_TEST_NEIGHBOURS, hosts, vms)
    result = plan(index)
    assert result.solver == "cp-sat" and result.lower_bound == 1
    assert [(m.vm_id, m.source) for m in result.moves] == [("t", "h1")]
    assert set(result.moves[0].fixes) == {
        ("p1", "acme-production", "forbidden_neighbours[0]"),
        ("p2", "acme-production", "forbidden_neighbours[0]"),
    }
    assert applied(index, result).violations() == []


def test_plans_are_deterministic():
    """The same fleet gives the same plan, solver included."""
    hosts = [host("h1"), host("h2"), host("h3")]
    vms = [
        vm("p1", "acme", "h1", environment="production"),
        vm("p2", "acme", "h1", environment="production"),
        vm("t", "globex", "h1", environment="test"),
    ]
    index = index_of(NO_TEST_NEIGHBOURS, hosts, vms)
    assert plan(index) == plan(index) == plan(index_of(NO_TEST_NEIGHBOURS, hosts, vms))


def test_moves_are_ordered_so_each_target_has_room():
    """A VM that must move into a full host waits for the VM leaving it; every step is admitted in turn."""
    policies = """
name: site-a
select: {tenants: [acme]}
require: {sites: [site-a]}
---
name: site-b
select: {tenants: [globex]}
require: {sites: [site-b]}
"""
    hosts = [host("a1", site="site-a", memory_mb=1024), host("b1", site="site-b"), host("x1", site="site-x")]
    vms = [vm("g", "globex", "a1"), vm("c", "acme", "x1")]  # c must go to a1, which only has room once g left
    index = index_of(policies, hosts, vms)
    result = plan(index)
    assert [(m.vm_id, m.target) for m in result.moves] == [("g", "b1"), ("c", "a1")]
    fleet = {v: index.vm(v) for v in index.vm_ids()}
    for move in result.moves:  # each step, in order, passes admission in the state the previous steps left
        step = FleetIndex(index.compiled, index.hosts(), list(fleet.values()))
        assert step.admit(fleet[move.vm_id], move.target) == []
        fleet[move.vm_id] = dataclasses.replace(fleet[move.vm_id], host=move.target)
    assert applied(index, result).violations() == []


def test_symmetric_max_vms_is_respected_by_every_landing():
    """A VM never lands on a host whose residents cap the VM count, even when that host is otherwise best."""
    policies = """
name: small-hosts
select: {tenants: [quiet]}
require: {max_vms_per_host: 1}
---
name: patched
select: {tenants: [acme]}
require: {min_patch_level: 3}
prefer: [{weight: 10, zones: [z9]}]
"""
    hosts = [host("h1", patch_level=1), host("h2", zone="z9"), host("h3")]
    index = index_of(policies, hosts, [vm("a", "acme", "h1"), vm("q", "quiet", "h2")])
    result = plan(index)
    assert [(m.vm_id, m.target) for m in result.moves] == [("a", "h3")]
    assert applied(index, result).violations() == []


def test_unfixable_violation_is_explained_by_the_rejections():
    """When no host satisfies the VM's rules, the reason names the rules that reject the hosts."""
    index = index_of(PATCHED, [host("h1", patch_level=1), host("h2", patch_level=2)], [vm("a", "acme", "h1")])
    result = plan(index)
    assert result.moves == []
    [(_, why)] = result.unresolved
    assert "no allowed host" in why and "min_patch_level" in why


def test_lower_bound_counts_hosts_and_host_rule_movers():
    """Each host with a violation needs one move out; each VM breaking a host rule must move itself."""
    hosts = [host("h1", patch_level=1), host("h2")]
    vms = [
        vm("a", "acme", "h1"),
        vm("b", "acme", "h1"),
        vm("prod", "acme", "h2", environment="production"),
        vm("t1", "globex", "h2", environment="test"),
    ]
    index = index_of(PATCHED + "---\n" + NO_TEST_NEIGHBOURS, hosts, vms)
    assert lower_bound(index.violations()) == 3


def test_negative_limits_are_refused():
    """Limits below zero are an InvalidInput, not an empty plan."""
    index = index_of(PATCHED, [host("h1")], [])
    with pytest.raises(InvalidInput):
        plan(index, max_in=-1)


@settings(max_examples=60, deadline=None)
@given(
    ref.policy_sets(),
    ref.fleets(),
    st.integers(0, 3),
    st.integers(0, 3),
    st.none() | st.integers(0, 4),
    st.sets(st.integers(0, 29), max_size=6),
    st.sampled_from((4, 60)),
)
def test_random_plans_respect_limits_and_never_add_violations(
    policies, fleet, max_out, max_in, max_moves, frozen, max_candidates
):
    """Random plans keep limits and freezes, add no violation, land compliant in memory, and account for fixes."""
    hosts, vms = fleet
    index = FleetIndex(compile_policies(policies), hosts, vms)
    frozen_vms = {f"vm-{i}": "frozen by the test" for i in frozen}
    before = {v.key for v in index.violations()}
    result = plan_remediation(
        index,
        max_moves=max_moves,
        max_out_per_host=max_out,
        max_in_per_host=max_in,
        frozen_vms=frozen_vms,
        max_candidates=max_candidates,
    )
    moved = [m.vm_id for m in result.moves]
    assert max_moves is None or len(moved) <= max_moves
    assert len(moved) == len(set(moved))
    assert not set(moved) & set(frozen_vms)
    assert all(index.migration_rules(v).auto_balance for v in moved)
    assert max(Counter(m.source for m in result.moves).values(), default=0) <= max_out
    assert max(Counter(m.target for m in result.moves).values(), default=0) <= max_in
    after_index = applied(index, result)
    after = {v.key for v in after_index.violations()}
    assert after <= before
    assert {v.key for v, _ in result.unresolved} == after
    assert all(why for _, why in result.unresolved)
    assert sorted(k for m in result.moves for k in m.fixes) == sorted(before - after)
    assert not after_index.violations(moved)
    for target in {m.target for m in result.moves}:
        load = after_index.host_load(target)
        assert load.memory_used_mb <= load.memory_mb
