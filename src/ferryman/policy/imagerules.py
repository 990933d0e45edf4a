"""Image rules: the part of a policy that depends on the VM's image alone (``min_image_version``), never on a host.

Why it exists: an operator who sets a baseline ("every Debian VM on 12.8 or later") must see the VMs below it, and
the VMs whose baseline cannot be shown (their image is unknown to the image registry) as well, and keep them from
being placed anywhere. The answer for a VM is the same on every host, so the engine refuses every host or none, and
the compliance audit reports the VM wherever it runs.

What it must not do: look at hosts or other VMs, or read the registry: the controller copies an image's OS and
version into :class:`~ferryman.policy.facts.VMFacts`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ferryman.policy.facts import VMFacts
from ferryman.policy.schema import Rules
from ferryman.policy.versions import Version, version_or_none

RULE = "min_image_version"

# Image versions repeat across a fleet (one per image, thousands of VMs each): parse each spelling once.
_parsed = functools.lru_cache(maxsize=4096)(version_or_none)


@dataclass(frozen=True)
class ImageBaseline:
    """A compiled ``min_image_version``: the minimum version of each OS it names, in the order written."""

    floors: tuple[tuple[str, Version], ...]
    rule: str = RULE

    def floor(self, os: str) -> Version | None:
        """The minimum version for images of ``os`` (None: the rule does not constrain that OS)."""
        for name, version in self.floors:
            if name == os:
                return version
        return None

    def describe(self) -> str:
        return ", ".join(f"{os} {version}" for os, version in self.floors)

    def failure(self, vm: VMFacts, policy: str) -> str | None:
        """Why ``vm`` breaks this rule of ``policy`` (None: it does not). An image the registry does not know
        breaks it whatever the OS: its baseline cannot be shown."""
        if vm.image_os is None or vm.image_version is None:
            what = f"image {vm.image} is not in the image registry" if vm.image else "the VM names no image"
            return (
                f"image baseline unknown: {what}, so it cannot show the minimum image versions required by "
                f"{policy} ({self.describe()})"
            )
        floor = self.floor(vm.image_os)
        if floor is None:
            return None
        version = _parsed(vm.image_version)
        if version is None:
            return (
                f"image {vm.image} is {vm.image_os} {vm.image_version!r}, which cannot be read as a version, so it "
                f"does not meet {floor} required by {policy}"
            )
        if version < floor:
            return (
                f"image {vm.image} is {vm.image_os} {vm.image_version}, below the minimum {vm.image_os} version "
                f"{floor} required by {policy}"
            )
        return None


def image_baseline(rules: Rules) -> ImageBaseline | None:
    """The compiled ``min_image_version`` of a rule set (None: it sets none)."""
    if rules.min_image_version is None:
        return None
    return ImageBaseline(tuple((os, Version(text)) for os, text in rules.min_image_version.items()))
