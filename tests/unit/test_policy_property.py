"""The compiled engine agrees with the pair-by-pair reference evaluator on random fleets and policy sets."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ferryman.policy import FleetIndex, VMFacts, compile_policies, parse_policies
from ferryman.testing import policy_reference as ref

fleets, host_facts, policy_sets, profiles, vm_facts = (
    ref.fleets,
    ref.host_facts,
    ref.policy_sets,
    ref.profiles,
    ref.vm_facts,
)
TENANTS, HOST_NAMES = ref.TENANTS, ref.HOST_NAMES

FAST = settings(max_examples=120, deadline=None)


def _keys(reasons) -> set[tuple[str, str]]:
    return {(r.policy, r.rule) for r in reasons}


@FAST
@given(policy_sets(), fleets())
def test_admit_agrees_with_reference(policies, fleet):
    """admit() refuses exactly the (policy, rule) pairs the pair-by-pair evaluator refuses, for every VM and host."""
    hosts, vms = fleet
    index = FleetIndex(compile_policies(policies), hosts, vms)
    newcomer = VMFacts("new", "fresh", "globex", {"environment": "test", "sensitivity": "public"}, 512, None)
    for vm in [*vms, newcomer]:
        for host in hosts:
            assert _keys(index.admit(vm, host.name)) == ref.admit(policies, hosts, vms, vm, host.name), (vm, host)


_PAIRWISE = ("forbidden_neighbours", "dedicated_host", "min_neighbour_security_level")


@FAST
@given(policy_sets(), fleets())
def test_pairwise_conflicts_agree_with_reference(policies, fleet):
    """conflicts(a, b) names exactly the pairwise neighbour rules either VM breaks when they share a host."""
    hosts, vms = fleet
    index = FleetIndex(compile_policies(policies), hosts, [])
    for a in vms[:8]:
        for b in vms[:8]:
            if a.id == b.id:
                continue
            expected = ref.own_failures(policies, hosts[0], [b], a) | ref.symmetric_failures(policies, [b], a)
            expected = {(p, r) for p, r in expected if r.startswith(_PAIRWISE)}
            assert _keys(index.conflicts(a, b)) == expected


@FAST
@given(policy_sets(), fleets())
def test_place_agrees_with_reference(policies, fleet):
    """place() picks the reference's best host and score, and explains every host it rejects."""
    hosts, vms = fleet
    index = FleetIndex(compile_policies(policies), hosts, vms)
    newcomers = [
        VMFacts("new-1", "fresh-1", "acme", {"environment": "production", "sensitivity": "secret"}, 256, None),
        VMFacts("new-2", "fresh-2", "initech", {"environment": "test"}, 1024, None),
    ]
    for vm in [*vms, *newcomers]:
        decision = index.place(vm, top=len(hosts))
        assert (decision.host, decision.score) == ref.place(policies, hosts, vms, vm), vm
        allowed = {name for name, _ in decision.ranked}
        assert allowed | set(decision.rejections) == {h.name for h in hosts}
        assert not allowed & set(decision.rejections)
        for host, reasons in decision.rejections.items():
            assert reasons, host
            if host != vm.host:
                assert _keys(reasons) == ref.admit(policies, hosts, vms, vm, host)


@FAST
@given(policy_sets(), fleets())
def test_violations_agree_with_reference(policies, fleet):
    """The full audit and the per-VM check both report exactly the reference's violations."""
    hosts, vms = fleet
    index = FleetIndex(compile_policies(policies), hosts, vms)
    expected = ref.violations(policies, hosts, vms)
    assert {v.key for v in index.violations()} == expected
    assert {v.key for v in index.violations([vm.id for vm in vms])} == expected


@st.composite
def changes(draw: st.DrawFn) -> list[tuple[str, Any]]:
    steps: list[tuple[str, Any]] = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(("move", "move", "move", "add", "remove", "host", "new_host", "drop_host", "vm")))
        steps.append((kind, draw(st.integers(0, 1000))))
    return steps


@settings(max_examples=80, deadline=None)
@given(policy_sets(), fleets(), changes(), st.data())
def test_incremental_changes_agree_with_rebuilding(policies, fleet, steps, data):
    """After each change the index equals a fresh one, and re-checking only the VMs a change names suffices."""
    hosts, vms = fleet
    compiled = compile_policies(policies)
    index = FleetIndex(compiled, hosts, vms)
    state = {v.key: v for v in index.violations()}
    host_map = {h.name: h for h in hosts}
    vm_map = {v.id: v for v in vms}
    for kind, seed in steps:
        affected = _apply(index, kind, seed, host_map, vm_map, data)
        fresh = FleetIndex(compiled, list(host_map.values()), list(vm_map.values()))
        expected = fresh.violations()
        assert [v.key for v in index.violations()] == [v.key for v in expected]
        state = {k: v for k, v in state.items() if k[0] not in affected}
        state.update({v.key: v for v in index.violations(affected)})
        assert set(state) == {v.key for v in expected}
        assert {v.key for v in expected} == ref.violations(policies, list(host_map.values()), list(vm_map.values()))


def _apply(index, kind, seed, host_map, vm_map, data) -> frozenset[str]:
    names = sorted(host_map)
    if kind == "move" and vm_map:
        vm = vm_map[sorted(vm_map)[seed % len(vm_map)]]
        target = [*names, None][seed % (len(names) + 1)]
        vm_map[vm.id] = dataclasses.replace(vm, host=target)
        return index.move_vm(vm.id, target)
    if kind == "add":
        vm = data.draw(vm_facts(100 + seed, names))
        if vm.id in vm_map:
            return frozenset()
        vm_map[vm.id] = vm
        return index.add_vm(vm)
    if kind == "remove" and vm_map:
        vm_id = sorted(vm_map)[seed % len(vm_map)]
        del vm_map[vm_id]
        return index.remove_vm(vm_id)
    if kind == "vm" and vm_map:
        vm = vm_map[sorted(vm_map)[seed % len(vm_map)]]
        changed = dataclasses.replace(vm, profile=data.draw(profiles()), tenant=data.draw(st.sampled_from(TENANTS)))
        vm_map[vm.id] = changed
        return index.update_vm(changed)
    if kind == "host":
        host = data.draw(host_facts(names[seed % len(names)]))
        host_map[host.name] = host
        return index.update_host(host)
    if kind == "new_host":
        name = HOST_NAMES[seed % len(HOST_NAMES)]
        if name in host_map:
            return frozenset()
        host_map[name] = data.draw(host_facts(name))
        return index.update_host(host_map[name])
    if kind == "drop_host":
        empty = [n for n in names if not any(v.host == n for v in vm_map.values())]
        if len(empty) < 2 or len(host_map) < 2:
            return frozenset()
        name = empty[seed % len(empty)]
        del host_map[name]
        return index.remove_host(name)
    return frozenset()


@settings(max_examples=40, deadline=None)
@given(policy_sets(), fleets(), changes(), st.data())
def test_placement_after_changes_agrees_with_reference(policies, fleet, steps, data):
    """Placements on an index changed incrementally (hosts added out of name order included) match the reference."""
    hosts, vms = fleet
    index = FleetIndex(compile_policies(policies), hosts, vms)
    host_map = {h.name: h for h in hosts}
    vm_map = {v.id: v for v in vms}
    for kind, seed in steps:
        _apply(index, kind, seed, host_map, vm_map, data)
    current_hosts = sorted(host_map.values(), key=lambda h: h.name)
    current_vms = list(vm_map.values())
    for vm in current_vms[:10]:
        decision = index.place(vm)
        assert (decision.host, decision.score) == ref.place(policies, current_hosts, current_vms, vm)


@settings(max_examples=60, deadline=None)
@given(policy_sets())
def test_documents_round_trip(policies):
    """A policy set dumped with to_yaml() parses back to an equal set."""
    assert parse_policies({"stored.yaml": policies.to_yaml()}) == policies
