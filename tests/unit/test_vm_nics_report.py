"""A host's network report: in a namespace of its own every foreign nftables table counts; in the host's own
namespace (its firewall lives there) only the tables that can see a tap's frames (netdev, bridge) do."""

from __future__ import annotations

from dataclasses import dataclass, field

from ferryman.agent.hypervisor.nics import VMNics


@dataclass
class FakeReport:
    nics: list[object] = field(default_factory=list)
    foreign_tables: list[str] = field(default_factory=list)


class FakeNetwork:
    def __init__(self, netns: str | None) -> None:
        self.netns = netns

    def report(self) -> FakeReport:
        return FakeReport(foreign_tables=["inet filter", "ip nat", "netdev sniff", "bridge learn"])


async def test_own_namespace_counts_every_foreign_table() -> None:
    report = await VMNics(FakeNetwork("fm-host-a")).report()  # type: ignore[arg-type]
    assert report is not None and report.foreign_tables == ["inet filter", "ip nat", "netdev sniff", "bridge learn"]


async def test_the_hosts_own_namespace_counts_only_tables_that_see_taps() -> None:
    report = await VMNics(FakeNetwork(None)).report()  # type: ignore[arg-type]
    assert report is not None and report.foreign_tables == ["netdev sniff", "bridge learn"]


async def test_no_network_no_report() -> None:
    assert await VMNics(None).report() is None
