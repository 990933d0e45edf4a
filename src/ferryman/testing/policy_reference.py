"""A slow, obviously correct policy evaluator (one loop over (VM, host) pairs and the parsed policies), and the
Hypothesis strategies for random small fleets and policy sets that the property tests feed to it and to the engine.

The evaluator reads the pydantic models directly and spells out the semantics documented in ferryman.policy.engine,
so the property tests can hold the compiled, bitset-based engine to it. Nothing here is fast or clever on purpose.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import yaml
from hypothesis import assume
from hypothesis import strategies as st

from ferryman.policy.facts import HostFacts, VMFacts, profile_security_level
from ferryman.policy.schema import (
    NeighbourSelector,
    Policy,
    PolicyErrors,
    PolicySet,
    Rules,
    VMSelector,
    parse_policies,
)
from ferryman.policy.versions import Version, version_or_none

Key = tuple[str, str]  # (policy, rule)


def selector_matches(selector: VMSelector, vm: VMFacts) -> bool:
    if selector.tenants is not None and vm.tenant not in selector.tenants:
        return False
    if selector.vms is not None and vm.name not in selector.vms:
        return False
    return all(vm.profile.get(key) in values for key, values in (selector.profile or {}).items())


def neighbour_matches(selector: NeighbourSelector, neighbour: VMFacts, governed: VMFacts) -> bool:
    if selector.other_tenant and neighbour.tenant == governed.tenant:
        return False
    return selector_matches(selector, neighbour)


def policies_of(policies: PolicySet, vm: VMFacts) -> list[Policy]:
    return [p for p in policies if selector_matches(p.select, vm)]


def rule_failures(rules: Rules, prefix: str, host: HostFacts, others: Sequence[VMFacts], vm: VMFacts) -> list[str]:
    """The names of the rules of ``rules`` that ``vm`` breaks on ``host`` next to ``others``."""
    failed: list[str] = []
    version = version_or_none(host.hypervisor_version)
    if rules.min_site_security_level is not None and host.site_security_level < rules.min_site_security_level:
        failed.append("min_site_security_level")
    if rules.sites is not None and host.site not in rules.sites:
        failed.append("sites")
    if rules.forbidden_sites is not None and host.site in rules.forbidden_sites:
        failed.append("forbidden_sites")
    for rule, attribute in (
        ("zones", "zone"),
        ("subnets", "subnet"),
        ("virt_types", "virt_type"),
        ("hypervisors", "hypervisor"),
    ):
        allowed = getattr(rules, rule)
        if allowed is not None and getattr(host, attribute) not in allowed:
            failed.append(rule)
    if rules.min_hypervisor_version is not None and (
        version is None or version < Version(rules.min_hypervisor_version)
    ):
        failed.append("min_hypervisor_version")
    if rules.min_patch_level is not None and host.patch_level < rules.min_patch_level:
        failed.append("min_patch_level")
    if rules.max_vms_per_host is not None and len(others) + 1 > rules.max_vms_per_host:
        failed.append("max_vms_per_host")
    for i, selector in enumerate(rules.forbidden_neighbours or ()):
        if any(neighbour_matches(selector, u, vm) for u in others):
            failed.append(f"{prefix}forbidden_neighbours[{i}]")
    if rules.dedicated_host and any(u.tenant != vm.tenant for u in others):
        failed.append("dedicated_host")
    floor = rules.min_neighbour_security_level
    if floor is not None and any(profile_security_level(u.profile) < floor for u in others):
        failed.append("min_neighbour_security_level")
    return failed


def own_failures(policies: PolicySet, host: HostFacts, others: Sequence[VMFacts], vm: VMFacts) -> set[Key]:
    return {
        (p.name, rule) for p in policies_of(policies, vm) for rule in rule_failures(p.require, "", host, others, vm)
    }


def symmetric_failures(policies: PolicySet, others: Sequence[VMFacts], vm: VMFacts) -> set[Key]:
    """The rules of the VMs in ``others`` that ``vm`` arriving among them would break."""
    found: set[Key] = set()
    level = profile_security_level(vm.profile)
    for u in others:
        for p in policies_of(policies, u):
            rules = p.require
            if rules.max_vms_per_host is not None and len(others) + 1 > rules.max_vms_per_host:
                found.add((p.name, "max_vms_per_host"))
            for i, selector in enumerate(rules.forbidden_neighbours or ()):
                if neighbour_matches(selector, vm, u):
                    found.add((p.name, f"forbidden_neighbours[{i}]"))
            if rules.dedicated_host and vm.tenant != u.tenant:
                found.add((p.name, "dedicated_host"))
            floor = rules.min_neighbour_security_level
            if floor is not None and level < floor:
                found.add((p.name, "min_neighbour_security_level"))
    return found


def others_on(vms: Iterable[VMFacts], host: str, vm_id: str) -> list[VMFacts]:
    return [u for u in vms if u.host == host and u.id != vm_id]


def admit(policies: PolicySet, hosts: Sequence[HostFacts], vms: Sequence[VMFacts], vm: VMFacts, host: str) -> set[Key]:
    """(policy, rule) of every reason ``vm`` may not run on ``host`` (built-in rules have policy "")."""
    target = next(h for h in hosts if h.name == host)
    others = others_on(vms, host, vm.id)
    staying = vm.host == host
    found: set[Key] = set()
    if not staying and not (target.schedulable and target.role != "quarantine"):
        found.add(("", "schedulable"))
    if sum(u.memory_mb for u in others) + vm.memory_mb > target.memory_mb:
        found.add(("", "capacity"))
    if vm.host is not None and not staying:
        for p in policies_of(policies, vm):
            targets = p.migration.allowed_targets
            if targets is not None and host not in targets:
                found.add((p.name, "migration.allowed_targets"))
    return found | own_failures(policies, target, others, vm) | symmetric_failures(policies, others, vm)


def score(policies: PolicySet, host: HostFacts, others: Sequence[VMFacts], vm: VMFacts) -> int:
    total = 0
    for p in policies_of(policies, vm):
        for i, entry in enumerate(p.prefer):
            if not rule_failures(entry, f"prefer[{i}].", host, others, vm):
                total += entry.weight
    return total


def place(
    policies: PolicySet, hosts: Sequence[HostFacts], vms: Sequence[VMFacts], vm: VMFacts, exclude: Iterable[str] = ()
) -> tuple[str | None, int]:
    """The best host (highest score, fewest VMs, first name) and its score; (None, 0) when none is allowed."""
    excluded = set(exclude)
    best: tuple[int, int, str] | None = None
    for host in hosts:
        if host.name in excluded or host.name == vm.host or admit(policies, hosts, vms, vm, host.name):
            continue
        others = others_on(vms, host.name, vm.id)
        key = (-score(policies, host, others, vm), len(others), host.name)
        if best is None or key < best:
            best = key
    return (best[2], -best[0]) if best is not None else (None, 0)


def violations(policies: PolicySet, hosts: Sequence[HostFacts], vms: Sequence[VMFacts]) -> set[tuple[str, str, str]]:
    """(vm_id, policy, rule) of every hard rule a placed VM breaks where it runs."""
    by_name = {h.name: h for h in hosts}
    found: set[tuple[str, str, str]] = set()
    for vm in vms:
        if vm.host is None:
            continue
        others = others_on(vms, vm.host, vm.id)
        found |= {(vm.id, policy, rule) for policy, rule in own_failures(policies, by_name[vm.host], others, vm)}
    return found


# ------------------------------------------------------------------------------------------ random fleets and sets

SITES = {"par1": 3, "par2": 2, "lyo1": 1}
TENANTS = ("acme", "globex", "initech")
VERSIONS = ("7.2.0", "7.10.0", "7.9.1", "8.0", "1:7.2+dfsg-7+deb12u6", "not a version")
HOST_NAMES = tuple(f"h{i:02d}" for i in range(16))


@st.composite
def host_facts(draw: st.DrawFn, name: str) -> HostFacts:
    site = draw(st.sampled_from(sorted(SITES)))
    return HostFacts(
        name=name,
        site=site,
        site_security_level=SITES[site],
        zone=draw(st.sampled_from(("z1", "z2"))),
        subnet=draw(st.sampled_from(("n1", "n2"))),
        virt_type=draw(st.sampled_from(("kvm", "sev"))),
        hypervisor=draw(st.sampled_from(("qemu", "ch"))),
        hypervisor_version=draw(st.sampled_from(VERSIONS)),
        patch_level=draw(st.integers(0, 4)),
        role=draw(st.sampled_from(("compute",) * 9 + ("quarantine",))),
        memory_mb=draw(st.sampled_from((1024, 2048, 4096))),
        schedulable=draw(st.booleans() | st.just(True)),
    )


@st.composite
def profiles(draw: st.DrawFn) -> dict[str, str]:
    profile: dict[str, str] = {}
    environment = draw(st.sampled_from(("production", "test", None)))
    if environment:
        profile["environment"] = environment
    sensitivity = draw(st.sampled_from(("public", "internal", "secret", None)))
    if sensitivity:
        profile["sensitivity"] = sensitivity
    if draw(st.integers(0, 9)) == 0:
        profile["security_level"] = str(draw(st.integers(0, 3)))
    return profile


@st.composite
def vm_facts(draw: st.DrawFn, i: int, hosts: list[str]) -> VMFacts:
    return VMFacts(
        id=f"vm-{i}",
        name=f"v{i}",
        tenant=draw(st.sampled_from(TENANTS)),
        profile=draw(profiles()),
        memory_mb=draw(st.sampled_from((256, 512, 1024))),
        host=draw(st.sampled_from([*hosts, None])),
    )


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[HostFacts], list[VMFacts]]:
    names = draw(st.lists(st.sampled_from(HOST_NAMES), min_size=1, max_size=12, unique=True))
    hosts = [draw(host_facts(name)) for name in names]
    count = draw(st.integers(0, 30))
    vms = [draw(vm_facts(i, names)) for i in range(count)]
    return hosts, vms


def _some(draw: st.DrawFn, values: tuple[str, ...]) -> list[str]:
    return draw(st.lists(st.sampled_from(values), min_size=1, max_size=len(values), unique=True))


@st.composite
def selectors(draw: st.DrawFn, neighbour: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    while not out:
        if draw(st.booleans()):
            out["tenants"] = _some(draw, TENANTS)
        if draw(st.booleans()):
            out["profile"] = {"environment": draw(st.sampled_from(("production", "test", ["production", "test"])))}
        if draw(st.integers(0, 5)) == 0:
            out["vms"] = [f"v{draw(st.integers(0, 29))}"]
        if neighbour and draw(st.booleans()):
            out["other_tenant"] = True
    return out


@st.composite
def rule_sets(draw: st.DrawFn) -> dict[str, Any]:
    rules: dict[str, Any] = {}
    options: dict[str, Callable[[], Any]] = {
        "min_site_security_level": lambda: draw(st.integers(0, 3)),
        "sites": lambda: _some(draw, tuple(SITES)),
        "forbidden_sites": lambda: _some(draw, tuple(SITES))[:1],
        "max_vms_per_host": lambda: draw(st.integers(1, 4)),
        "forbidden_neighbours": lambda: [draw(selectors(True)) for _ in range(draw(st.integers(1, 2)))],
        "dedicated_host": lambda: True,
        "min_neighbour_security_level": lambda: draw(st.integers(1, 3)),
        "zones": lambda: _some(draw, ("z1", "z2"))[:1],
        "subnets": lambda: _some(draw, ("n1", "n2")),
        "virt_types": lambda: _some(draw, ("kvm", "sev"))[:1],
        "hypervisors": lambda: _some(draw, ("qemu", "ch")),
        "min_hypervisor_version": lambda: draw(st.sampled_from(("7.2", "7.9.1", "7.10.0", "1:7.0"))),
        "min_patch_level": lambda: draw(st.integers(0, 4)),
    }
    chosen = draw(st.lists(st.sampled_from(sorted(options)), min_size=1, max_size=3, unique=True))
    for key in chosen:
        rules[key] = options[key]()
    return rules


@st.composite
def policy_sets(draw: st.DrawFn) -> PolicySet:
    documents = []
    for i in range(draw(st.integers(1, 4))):
        doc: dict[str, Any] = {"name": f"p{i}", "select": draw(selectors(False))}
        if draw(st.integers(0, 4)):
            doc["require"] = draw(rule_sets())
        prefer = [dict(draw(rule_sets()), weight=draw(st.integers(1, 12))) for _ in range(draw(st.integers(0, 2)))]
        if prefer:
            doc["prefer"] = prefer
        if draw(st.integers(0, 3)) == 0:
            doc["migration"] = {"allowed_targets": _some(draw, HOST_NAMES[:6])}
        if "require" not in doc and "prefer" not in doc and "migration" not in doc:
            doc["require"] = {"max_vms_per_host": 3}
        documents.append(doc)
    try:
        return parse_policies({"random.yaml": yaml.safe_dump_all(documents)})
    except PolicyErrors:
        assume(False)
        raise
