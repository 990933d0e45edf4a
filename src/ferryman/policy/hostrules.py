"""Host-only rules: the part of a policy that depends on a host's labels alone (location, network, virtualisation
type, hypervisor floors), and the apply-time check that the fleet can satisfy them at all.

Why it exists: these rules never change while the fleet's labels do not, so the engine turns each into a bitset over
hosts once (through :class:`HostAttributes`, its label indexes) and only flips one bit when a host changes; the same
predicates explain a rejection ("site lyon-2 has security level 2 < 3 required by acme-production") and answer
:func:`unsatisfiable` when a policy set is applied.

What it must not do: look at VMs. Neighbour rules (``max_vms_per_host``, ``forbidden_neighbours``,
``dedicated_host``, ``min_neighbour_security_level``) live in the engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ferryman.policy.facts import HostFacts
from ferryman.policy.schema import PolicyError, PolicySet, Rules
from ferryman.policy.versions import Version, version_or_none

LABEL_ATTRIBUTES: dict[str, str] = {
    "sites": "site",
    "zones": "zone",
    "subnets": "subnet",
    "virt_types": "virt_type",
    "hypervisors": "hypervisor",
}
"""List rules and the host label each one reads."""


class HostAttributes(Protocol):
    """Label indexes over the hosts of a fleet, bit i standing for host i."""

    def any_of(self, attribute: str, values: Iterable[str]) -> int:
        """Hosts whose ``attribute`` label is one of ``values``."""
        ...

    def at_least(self, attribute: str, floor: int | Version) -> int:
        """Hosts whose ordered ``attribute`` (site_security_level, version, patch_level) is at least ``floor``."""
        ...


def _listing(values: Iterable[str], limit: int = 6) -> str:
    items = sorted(values)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


@dataclass(frozen=True)
class HostPredicate:
    """One host-only rule of one rule set; ``rule`` is the field name (``min_site_security_level``, ...)."""

    rule: str

    def test(self, host: HostFacts, version: Version | None) -> bool:
        """Whether ``host`` (whose parsed hypervisor version is ``version``) satisfies the rule."""
        raise NotImplementedError

    def bits(self, index: HostAttributes) -> int:
        """All hosts that satisfy the rule."""
        raise NotImplementedError

    def explain(self, host: HostFacts, policy: str) -> str:
        """Why ``host`` fails the rule of ``policy``."""
        raise NotImplementedError


@dataclass(frozen=True)
class SiteLevelAtLeast(HostPredicate):
    floor: int

    def test(self, host: HostFacts, version: Version | None) -> bool:
        return host.site_security_level >= self.floor

    def bits(self, index: HostAttributes) -> int:
        return index.at_least("site_security_level", self.floor)

    def explain(self, host: HostFacts, policy: str) -> str:
        return f"site {host.site} has security level {host.site_security_level} < {self.floor} required by {policy}"


@dataclass(frozen=True)
class LabelIn(HostPredicate):
    attribute: str
    values: frozenset[str]

    def test(self, host: HostFacts, version: Version | None) -> bool:
        return str(getattr(host, self.attribute)) in self.values

    def bits(self, index: HostAttributes) -> int:
        return index.any_of(self.attribute, self.values)

    def explain(self, host: HostFacts, policy: str) -> str:
        label = self.attribute.replace("_", " ")
        return (
            f"{label} {getattr(host, self.attribute)} is not among the {self.rule.replace('_', ' ')} {policy} allows "
            f"({_listing(self.values)})"
        )


@dataclass(frozen=True)
class SiteNotIn(HostPredicate):
    values: frozenset[str]

    def test(self, host: HostFacts, version: Version | None) -> bool:
        return host.site not in self.values

    def bits(self, index: HostAttributes) -> int:
        return ~index.any_of("site", self.values)

    def explain(self, host: HostFacts, policy: str) -> str:
        return f"site {host.site} is forbidden by {policy}"


@dataclass(frozen=True)
class VersionAtLeast(HostPredicate):
    floor: Version

    def test(self, host: HostFacts, version: Version | None) -> bool:
        return version is not None and version >= self.floor

    def bits(self, index: HostAttributes) -> int:
        return index.at_least("hypervisor_version", self.floor)

    def explain(self, host: HostFacts, policy: str) -> str:
        if version_or_none(host.hypervisor_version) is None:
            return (
                f"hypervisor version {host.hypervisor_version!r} cannot be read, so it does not meet "
                f"{self.floor} required by {policy}"
            )
        return f"hypervisor version {host.hypervisor_version} < {self.floor} required by {policy}"


@dataclass(frozen=True)
class PatchAtLeast(HostPredicate):
    floor: int

    def test(self, host: HostFacts, version: Version | None) -> bool:
        return host.patch_level >= self.floor

    def bits(self, index: HostAttributes) -> int:
        return index.at_least("patch_level", self.floor)

    def explain(self, host: HostFacts, policy: str) -> str:
        return f"patch level {host.patch_level} < {self.floor} required by {policy}"


def host_predicates(rules: Rules) -> tuple[HostPredicate, ...]:
    """The host-only rules of a rule set (``require`` or a ``prefer`` entry), in schema order."""
    found: list[HostPredicate] = []
    if rules.min_site_security_level is not None:
        found.append(SiteLevelAtLeast("min_site_security_level", rules.min_site_security_level))
    if rules.sites is not None:
        found.append(LabelIn("sites", "site", frozenset(rules.sites)))
    if rules.forbidden_sites is not None:
        found.append(SiteNotIn("forbidden_sites", frozenset(rules.forbidden_sites)))
    for rule in ("zones", "subnets", "virt_types", "hypervisors"):
        values = getattr(rules, rule)
        if values is not None:
            found.append(LabelIn(rule, LABEL_ATTRIBUTES[rule], frozenset(values)))
    if rules.min_hypervisor_version is not None:
        found.append(VersionAtLeast("min_hypervisor_version", Version(rules.min_hypervisor_version)))
    if rules.min_patch_level is not None:
        found.append(PatchAtLeast("min_patch_level", rules.min_patch_level))
    return tuple(found)


def host_failures(rules: Rules, host: HostFacts, policy: str) -> list[tuple[str, str]]:
    """(rule, explanation) for each host-only rule of ``rules`` that ``host`` fails; empty when it satisfies all."""
    version = version_or_none(host.hypervisor_version)
    return [(p.rule, p.explain(host, policy)) for p in host_predicates(rules) if not p.test(host, version)]


# ------------------------------------------------------------------------------------------------- apply-time check


def unsatisfiable(policy_set: PolicySet, hosts: Sequence[HostFacts]) -> list[PolicyError]:
    """Policies whose host-only hard rules no host of ``hosts`` satisfies (their VMs could never be placed), and
    policies whose ``migration.allowed_targets`` name no host that satisfies them. Labels only: a host that is down
    or draining still counts, since it may come back. An empty fleet reports nothing (policies may come first)."""
    if not hosts:
        return []
    errors: list[PolicyError] = []
    versions = [version_or_none(h.hypervisor_version) for h in hosts]
    for policy in policy_set:
        source = policy_set.source(policy.name)
        predicates = host_predicates(policy.require)
        passing = [{h.name for h, v in zip(hosts, versions, strict=True) if p.test(h, v)} for p in predicates]
        for predicate, names in zip(predicates, passing, strict=True):
            if not names:
                field_path = f"require.{predicate.rule}"
                errors.append(
                    PolicyError(
                        source.file,
                        source.line_of(field_path),
                        field_path,
                        f"no host of the {len(hosts)} in the fleet satisfies it (policy {policy.name})",
                        _fleet_offers(predicate.rule, hosts),
                    )
                )
        if any(not names for names in passing):
            continue
        together = set.intersection(*passing) if passing else {h.name for h in hosts}
        if not together:
            alone = ", ".join(f"{p.rule} alone {len(n)}" for p, n in zip(predicates, passing, strict=True))
            errors.append(
                PolicyError(
                    source.file,
                    source.line_of("require"),
                    "require",
                    f"no host satisfies these rules together (policy {policy.name}; hosts passing {alone})",
                    "rules that some host satisfies at once",
                )
            )
            continue
        errors.extend(_targets_unsatisfiable(policy_set, policy.name, hosts, together))
    return errors


def _targets_unsatisfiable(
    policy_set: PolicySet, name: str, hosts: Sequence[HostFacts], together: set[str]
) -> list[PolicyError]:
    targets = policy_set[name].migration.allowed_targets
    if targets is None:
        return []
    source = policy_set.source(name)
    field_path = "migration.allowed_targets"
    known = set(targets) & {h.name for h in hosts}
    if not known:
        problem = f"none of these hosts is in the fleet (policy {name})"
    elif not known & together:
        problem = f"none of these hosts satisfies the policy's require rules (policy {name})"
    else:
        return []
    allowed = f"hosts that satisfy require, such as {_listing(together)}"
    return [PolicyError(source.file, source.line_of(field_path), field_path, problem, allowed)]


def _fleet_offers(rule: str, hosts: Sequence[HostFacts]) -> str:
    if rule in LABEL_ATTRIBUTES or rule == "forbidden_sites":
        attribute = LABEL_ATTRIBUTES.get(rule, "site")
        return f"{rule.replace('_', ' ')} the fleet has: {_listing({str(getattr(h, attribute)) for h in hosts})}"
    if rule == "min_site_security_level":
        return f"a level ≤ {max(h.site_security_level for h in hosts)}, the highest site level of the fleet"
    if rule == "min_patch_level":
        return f"a level ≤ {max(h.patch_level for h in hosts)}, the highest patch level of the fleet"
    readable = [v for v in (version_or_none(h.hypervisor_version) for h in hosts) if v is not None]
    if not readable:
        return "no host reports a readable hypervisor version"
    return f"a version ≤ {max(readable)}, the newest hypervisor of the fleet"
