"""The traffic-rules seam: masquerade and forward rules (iptables or nftables).

Methods are idempotent ``ensure_*`` calls: the agent calls them at start and every
``--iptables-resync`` seconds; each checks the kernel and repairs only what is
missing or out of order in the chains/tables Loden owns.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Networks:
    """The cluster network and this node's subnet, per family (None: family off)."""

    network: IPv4Network | None = None
    subnet: IPv4Network | None = None
    ipv6_network: IPv6Network | None = None
    ipv6_subnet: IPv6Network | None = None


class TrafficManager(Protocol):
    async def cleanup_other_mode(self) -> None:
        """Remove the rules of the mode not in use (iptables <-> nftables)."""
        ...

    async def ensure_masq_rules(
        self, current: Networks, previous: Networks, *, random_fully: bool
    ) -> bool:
        """Install/repair masquerade rules; delete rules built from ``previous`` values.
        Returns True if anything had to be (re)written."""
        ...

    async def ensure_forward_rules(self, current: Networks) -> bool:
        """Install/repair the forward-accept rules. Returns True if anything changed."""
        ...
