"""nftables mode (``EnableNFTables: true``): flannel's ``flannel-ipv4``/``flannel-ipv6`` tables.

The tables, chains, comments and rules are exactly flannel's (spec §7.5, §11 item 8),
including where they differ from the iptables rules: the kube-proxy mark test is the
exact ``meta mark 0x00004000`` and rule 5 is ``saddr != S daddr N``. Every change is one
``nft -f -`` transaction (``add table``, ``add chain``, ``flush chain``, ``add rule``...),
so the chain is never seen half-written.

Unlike flannel (which never looks again), every ``ensure_*`` call compares
``nft list chain`` with the wanted listing and re-applies the chain when they differ, so
an ``nft flush ruleset`` or a stray rule is repaired at the next resync. Since the
listing's wording can vary between nft releases, the listing read right after Loden's
own transaction is also accepted as "in sync" (no re-apply loop on a newer nft).
A chain found in sync at nf_tables generation G is not listed again while the
generation is still G (:mod:`loden.traffic.nft_generation`): an idle resync costs one
netlink request instead of an ``nft`` process.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Literal

from loden.errors import CommandError, TrafficRulesError
from loden.traffic.base import Networks
from loden.traffic.commands import Commands, Runner
from loden.traffic.iptables import (
    FLANNEL_NFT_TABLES,
    available_xtables,
    delete_nft_tables,
    remove_chains,
)
from loden.traffic.nft_generation import GenerationChoice, VerifiedAt, generation_source

log = logging.getLogger(__name__)

Family = Literal[4, 6]
Network = IPv4Network | IPv6Network

NFT_FAMILY: dict[Family, str] = {4: FLANNEL_NFT_TABLES[0][0], 6: FLANNEL_NFT_TABLES[1][0]}
TABLE: dict[Family, str] = {4: FLANNEL_NFT_TABLES[0][1], 6: FLANNEL_NFT_TABLES[1][1]}
POSTRTG_CHAIN = "postrtg"
POSTRTG_COMMENT = "chain to manage traffic masquerading by flannel"
FORWARD_CHAIN = "forward"
FORWARD_COMMENT = "chain to accept flannel traffic"
KUBE_PROXY_MARK = "0x00004000"
MULTICAST: dict[Family, str] = {4: "224.0.0.0/4", 6: "ff00::/8"}


def table_comment(family: Family) -> str:
    return f"rules for {TABLE[family]}"


@dataclass(frozen=True, slots=True)
class NftChain:
    """One base chain of a flannel table, with its rules in nft syntax."""

    family: Family
    name: str
    comment: str
    #: e.g. ``type nat hook postrouting priority srcnat``
    hook: str
    rules: tuple[str, ...]

    @property
    def nft_family(self) -> str:
        return NFT_FAMILY[self.family]

    @property
    def table(self) -> str:
        return TABLE[self.family]

    def listing(self) -> str:
        """What ``nft list chain <family> <table> <chain>`` prints (nft 1.0.x, tabs)."""
        body = [f'\t\tcomment "{self.comment}"', f"\t\t{self.hook}; policy accept;"]
        body += [f"\t\t{r}" for r in self.rules]
        lines = [f"table {self.nft_family} {self.table} {{", f"\tchain {self.name} {{", *body]
        return "\n".join([*lines, "\t}", "}"]) + "\n"

    def transaction(self) -> str:
        """The ``nft -f -`` script that (re)creates the chain atomically."""
        where = f"{self.nft_family} {self.table}"
        lines = [
            table_statement(self.family),
            f'add chain {where} {self.name} {{ {self.hook} ; comment "{self.comment}" ; }}',
            f"flush chain {where} {self.name}",
            *(f"add rule {where} {self.name} {r}" for r in self.rules),
        ]
        return "\n".join(lines) + "\n"


def table_statement(family: Family) -> str:
    return (
        f'add table {NFT_FAMILY[family]} {TABLE[family]} {{ comment "{table_comment(family)}" ; }}'
    )


def tables_script() -> str:
    """Both tables, created at start whichever families are enabled (like flannel)."""
    return "".join(table_statement(f) + "\n" for f in (4, 6))


def _family(network: Network) -> Family:
    return 4 if network.version == 4 else 6


def masq_chain(network: Network, subnet: Network, *, random_fully: bool) -> NftChain:
    """flannel's ``postrtg`` chain for cluster ``network`` and own ``subnet``."""
    if network.version != subnet.version:
        raise TrafficRulesError(
            f"masquerade rules need one IP family, got network {network} and subnet {subnet}: "
            "pass the IPv4 or the IPv6 pair"
        )
    fam = _family(network)
    ip = NFT_FAMILY[fam]
    n, s = str(network), str(subnet)
    masq = "masquerade fully-random" if random_fully else "masquerade"
    return NftChain(
        family=fam,
        name=POSTRTG_CHAIN,
        comment=POSTRTG_COMMENT,
        hook="type nat hook postrouting priority srcnat",
        rules=(
            f"meta mark {KUBE_PROXY_MARK} return",
            f"{ip} saddr {s} {ip} daddr {n} return",
            f"{ip} saddr {n} {ip} daddr {s} return",
            f"{ip} saddr != {s} {ip} daddr {n} return",
            f"{ip} saddr {n} {ip} daddr != {MULTICAST[fam]} {masq}",
            f"{ip} saddr != {n} {ip} daddr {n} {masq}",
        ),
    )


def forward_chain(network: Network) -> NftChain:
    """flannel's ``forward`` chain accepting traffic from/to the cluster ``network``."""
    fam = _family(network)
    ip = NFT_FAMILY[fam]
    return NftChain(
        family=fam,
        name=FORWARD_CHAIN,
        comment=FORWARD_COMMENT,
        hook="type filter hook forward priority filter",
        rules=(f"{ip} saddr {network} accept", f"{ip} daddr {network} accept"),
    )


def normalise_listing(text: str) -> tuple[str, ...]:
    """Listing lines without indentation and blank lines (tabs vs spaces do not matter)."""
    return tuple(line.strip() for line in text.splitlines() if line.strip())


#: The dry run flannel (knftables) uses to decide on ``fully-random``.
FULLY_RANDOM_PROBE = (
    "add table ip flannel-ipv4\n"
    "add chain ip flannel-ipv4 masqueradeTest { type nat hook postrouting priority srcnat ; }\n"
    "add rule ip flannel-ipv4 masqueradeTest ip saddr != 127.0.0.1 masquerade fully-random\n"
)


class NftablesManager:
    """:class:`~loden.traffic.base.TrafficManager` for ``EnableNFTables: true``.

    ``generation`` is where the nf_tables generation id is read: ``"auto"`` derives it
    from a :class:`~loden.traffic.commands.Commands` runner's namespace (none for other
    runners), ``None`` turns the shortcut off (list every chain on every call).
    """

    def __init__(
        self, runner: Runner | None = None, *, generation: GenerationChoice = "auto"
    ) -> None:
        self._runner: Runner = runner if runner is not None else Commands()
        self._verified = VerifiedAt(generation_source(self._runner, generation))
        self._ready = False
        self._fully_random: bool | None = None
        #: (family, chain) -> listing read right after our own last transaction.
        self._applied: dict[tuple[Family, str], tuple[str, ...]] = {}
        self._announced: set[str] = set()
        self._lock = asyncio.Lock()

    async def check(self, *, ipv6: bool) -> None:
        """``nft`` must be installed and answer (it needs CAP_NET_ADMIN)."""
        del ipv6  # one binary serves both families
        if not self._runner.has("nft"):
            raise TrafficRulesError(
                "EnableNFTables is true but nft is not installed: install nftables "
                "(Debian: apt-get install nftables) or set EnableNFTables to false"
            )
        await self._runner.run(["nft", "list", "tables"])

    async def cleanup_other_mode(self) -> None:
        """Remove iptables mode's jumps and chains (FLANNEL-POSTRTG in nat, FLANNEL-FWD in
        filter), both families and every installed iptables backend.

        Fixes flannel's quirk (spec §11 item 9): the jump goes first, then the chain is
        flushed and deleted, each in its own table. A host without iptables binaries has
        nothing to clean (flannel would exit 1 there).
        """
        families: tuple[Family, ...] = (4, 6)
        async with self._lock:
            for family in families:
                for xt in await available_xtables(self._runner, family):
                    try:
                        await remove_chains(self._runner, xt)
                    except TrafficRulesError as exc:
                        log.warning("could not remove iptables-mode rules with %s: %s", xt.cmd, exc)

    async def ensure_masq_rules(
        self, current: Networks, previous: Networks, *, random_fully: bool
    ) -> bool:
        """Install/repair ``postrtg`` per enabled family. ``previous`` is not needed: the
        chain is flushed and refilled from ``current`` in one transaction."""
        del previous
        pairs: list[tuple[Network | None, Network | None]]
        pairs = [(current.network, current.subnet), (current.ipv6_network, current.ipv6_subnet)]
        changed = False
        async with self._lock:
            await self._setup()
            if random_fully and self._fully_random is None:
                self._fully_random = await self._probe_fully_random()
            rf = random_fully and bool(self._fully_random)
            for net, sub in pairs:
                if net is None or sub is None:
                    continue
                self._announce("masq", "Setting up masking rules")
                changed |= await self._reconcile(masq_chain(net, sub, random_fully=rf))
        return changed

    async def ensure_forward_rules(self, current: Networks) -> bool:
        """Install/repair the ``forward`` chain per enabled family.

        An ``accept`` here does not override a ``drop`` in another base chain on the same
        hook (e.g. iptables-nft's FORWARD policy DROP set by Docker).
        """
        changed = False
        async with self._lock:
            await self._setup()
            for net in (current.network, current.ipv6_network):
                if net is None:
                    continue
                self._announce(
                    "fwd",
                    "Changing default FORWARD chain policy to ACCEPT "
                    "(as flannel: by accept rules in the forward chain; the policy is untouched)",
                )
                changed |= await self._reconcile(forward_chain(net))
        return changed

    async def remove_all(self) -> bool:
        """Delete both flannel tables. Never called on shutdown (flannel keeps its
        rules); meant for an explicit cleanup flag. Returns True if anything was removed."""
        async with self._lock:
            self._ready = False
            self._applied.clear()
            self._verified.forget()
            return await delete_nft_tables(self._runner)

    def _announce(self, key: str, message: str) -> None:
        if key not in self._announced:
            self._announced.add(key)
            log.info("%s", message)

    async def _setup(self) -> None:
        """Create both tables once (spec §7.5: regardless of the enabled families)."""
        if self._ready:
            return
        if not self._runner.has("nft"):
            raise TrafficRulesError(
                "no nftables support: nft not found; install the nftables package or "
                "set EnableNFTables to false"
            )
        try:
            await self._runner.run(["nft", "-f", "-"], stdin=tables_script().encode())
        except CommandError as exc:
            raise TrafficRulesError(
                f"nftables: couldn't initialise tables {TABLE[4]}/{TABLE[6]}: "
                f"{exc.stderr.strip()[:160]}; check that the kernel has nf_tables"
            ) from exc
        self._ready = True
        self._announce(
            "check",
            "rules check: nf_tables generation id (dump only after a change)"
            if self._verified.source is not None
            else "rules check: no nf_tables generation source for this runner, dump every pass",
        )

    async def _probe_fully_random(self) -> bool:
        res = await self._runner.run(
            ["nft", "--check", "-f", "-"], stdin=FULLY_RANDOM_PROBE.encode(), check=False
        )
        if res.returncode != 0:
            log.info("nft masquerade fully-random not supported here: %s", res.error_text.strip())
        return res.returncode == 0

    async def _list(self, chain: NftChain) -> tuple[str, ...] | None:
        res = await self._runner.run(
            ["nft", "list", "chain", chain.nft_family, chain.table, chain.name], check=False
        )
        return normalise_listing(res.text) if res.returncode == 0 else None

    async def _reconcile(self, chain: NftChain) -> bool:
        key = (chain.family, chain.name)
        # Read before listing: an edit racing with the listing leaves a newer generation.
        gen = self._verified.generation()
        if self._verified.unchanged(key, chain, gen):
            return False
        wanted = normalise_listing(chain.listing())
        listed = await self._list(chain)
        if listed is not None and listed in (wanted, self._applied.get(key)):
            self._verified.verified(key, chain, gen)
            return False
        # Not recorded after our own write: the next call lists and records what it sees.
        self._verified.forget(key)
        where = f"{chain.nft_family} {chain.table} {chain.name}"
        if listed is None:
            log.info("Creating nftables chain %s", where)
        else:
            log.warning("nftables chain %s differs from the wanted rules; recreating it", where)
        try:
            await self._runner.run(["nft", "-f", "-"], stdin=chain.transaction().encode())
        except CommandError as exc:
            raise TrafficRulesError(
                f"nftables: could not write chain {where}: {exc.stderr.strip()[:160]}"
            ) from exc
        after = await self._list(chain)
        if after is not None and after != wanted:
            log.debug("nft lists chain %s differently than expected: %s", where, after)
        if after is not None:
            self._applied[key] = after
        return True
