"""Masquerade and forward rules: iptables mode (default) or nftables mode.

Use::

    mgr = open_traffic_manager(nftables=config.enable_nftables)
    await mgr.cleanup_other_mode()          # at every start (spec §7.1)
    await mgr.ensure_masq_rules(current, previous, random_fully=not fully_random_disable)
    await mgr.ensure_forward_rules(current)
    ...                                     # repeat the ensure_* calls every --iptables-resync s
    await mgr.remove_all()                  # only for an explicit cleanup flag

Nothing is removed on shutdown, like flannel: pods keep their connectivity while the
agent restarts, and the next start finds the rules in place (no rewrite at all).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from loden.errors import TrafficRulesError
from loden.traffic.base import Networks, TrafficManager
from loden.traffic.commands import DEFAULT_TIMEOUT, Commands, Runner
from loden.traffic.iptables import BackendChoice, IptablesManager
from loden.traffic.nft_generation import GenerationChoice
from loden.traffic.nftables import NftablesManager

__all__ = [
    "Commands",
    "IptablesManager",
    "ManagedTraffic",
    "Networks",
    "NftablesManager",
    "TrafficManager",
    "check_br_netfilter",
    "open_traffic_manager",
]


class ManagedTraffic(TrafficManager, Protocol):
    """A :class:`TrafficManager` that can also check its tools and remove everything it
    installed."""

    async def check(self, *, ipv6: bool) -> None:
        """Are this mode's tools there and usable? Called before the agent creates any
        kernel object or lease, so a node that cannot have rules fails with nothing
        left behind.

        :raises TrafficRulesError: a tool is missing or unusable (says what to install).
        """
        ...

    async def remove_all(self) -> bool:
        """Remove this mode's chains/tables (for ``--cleanup-on-exit``-style flags).
        Returns True if anything was removed."""
        ...


def open_traffic_manager(
    *,
    nftables: bool,
    prefix: Sequence[str] = (),
    runner: Runner | None = None,
    iptables_backend: BackendChoice = "auto",
    timeout: float = DEFAULT_TIMEOUT,
    generation: GenerationChoice = "auto",
) -> ManagedTraffic:
    """The manager for ``EnableNFTables`` = ``nftables``.

    ``prefix`` is put before every command (tests: ``("ip", "netns", "exec", NS)``);
    ``runner`` replaces command execution entirely (unit tests). ``iptables_backend``
    forces ``nf_tables`` or ``legacy`` instead of what ``iptables --version`` reports.
    ``generation`` is where the nf_tables generation id is read to skip dumping an
    unchanged ruleset ("auto": the namespace the commands run in; None: always dump).
    Nothing runs until the first call.
    """
    run: Runner = runner if runner is not None else Commands(tuple(prefix), timeout)
    if nftables:
        return NftablesManager(run, generation=generation)
    return IptablesManager(run, backend=iptables_backend, generation=generation)


def check_br_netfilter(*, ipv6: bool, proc: Path = Path("/proc/sys/net/bridge")) -> None:
    """iptables mode needs br_netfilter, so bridged pod traffic passes iptables (§7.1).

    Checks the calling process's network namespace.

    :raises TrafficRulesError: the sysctl does not exist ("Failed to check br_netfilter").
    """
    names = ["bridge-nf-call-iptables"] + (["bridge-nf-call-ip6tables"] if ipv6 else [])
    for name in names:
        path = proc / name
        if not path.exists():
            raise TrafficRulesError(
                f"Failed to check br_netfilter: {path} does not exist; "
                "load the module (modprobe br_netfilter) or set EnableNFTables"
            )
