"""Placement policies: schema, compiler, evaluator, explanations, compliance. A pure layer: no I/O, no clock.

Modules:

* :mod:`.facts`: what policies read of hosts and VMs (built by the controller from the CMDB);
* :mod:`.schema`: the YAML policy language, its parser and errors (file, line, field, allowed);
* :mod:`.versions`: hypervisor and image versions as ordered values (upstream and Debian style);
* :mod:`.hostrules`: rules on host labels alone, and :func:`unsatisfiable` (apply-time check against a fleet);
* :mod:`.imagerules`: rules on the VM's image alone (``min_image_version``);
* :mod:`.compiled`: a policy set compiled into matchers and rule records, VMs grouped into classes;
* :mod:`.engine`: :class:`FleetIndex`: placement, admission, violations, incremental updates
  (:mod:`.state` keeps its counters, :mod:`.bitsets` the containers, :mod:`.results` the values it returns).
"""

from __future__ import annotations

from ferryman.policy.compiled import CompiledPolicies, MigrationRules, compile_policies
from ferryman.policy.engine import FleetIndex
from ferryman.policy.facts import HostFacts, VMFacts, profile_security_level
from ferryman.policy.hostrules import unsatisfiable
from ferryman.policy.results import HostLoad, PlacementDecision, Reason, Rejections, Violation, ViolationKey
from ferryman.policy.schema import (
    Policy,
    PolicyError,
    PolicyErrors,
    PolicySet,
    PolicySource,
    check_policies,
    parse_policies,
)
from ferryman.policy.versions import Version, VersionError, parse_version

__all__ = [
    "CompiledPolicies",
    "FleetIndex",
    "HostFacts",
    "HostLoad",
    "MigrationRules",
    "PlacementDecision",
    "Policy",
    "PolicyError",
    "PolicyErrors",
    "PolicySet",
    "PolicySource",
    "Reason",
    "Rejections",
    "VMFacts",
    "Version",
    "VersionError",
    "Violation",
    "ViolationKey",
    "check_policies",
    "compile_policies",
    "parse_policies",
    "parse_version",
    "profile_security_level",
    "unsatisfiable",
]
