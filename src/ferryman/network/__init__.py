"""Virtual networks as pure data: addresses (:mod:`.ipam`) and what a NIC may send and receive, rendered as the
nftables rules that enforce it (:mod:`.rules`).

Nothing here touches a host: :mod:`ferryman.agent.network` plumbs segments and taps and installs the rules.
"""
