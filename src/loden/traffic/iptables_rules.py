"""Flannel's iptables-mode rule text: the FLANNEL-POSTRTG (nat) and FLANNEL-FWD (filter) chains.

The rules are byte-for-byte flannel's (spec §7.2, §7.3), so a node can switch between
flanneld and Loden without leaving duplicates behind, and ``iptables -t nat -S`` shows
the same e2e golden. They live apart from the code that runs iptables so the golden text
can be reviewed and tested on its own, without binaries or a kernel.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Literal

from loden.errors import TrafficRulesError

MASQ_COMMENT = "flanneld masq"
FWD_COMMENT = "flanneld forward"
POSTRTG_CHAIN = "FLANNEL-POSTRTG"
FWD_CHAIN = "FLANNEL-FWD"
#: kube-proxy marks packets it will masquerade itself with this bit (avoid double NAT).
KUBE_PROXY_MARK = "0x4000/0x4000"
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}

Family = Literal[4, 6]
Network = IPv4Network | IPv6Network

_NEEDS_QUOTES = re.compile(r"[\s\"'\\]")


def quote_tokens(tokens: Iterable[str]) -> list[str]:
    """Tokens as iptables-restore reads them: the ``--comment`` value always in double
    quotes (like flannel's payload), any other token only if it needs quoting."""
    out: list[str] = []
    after_comment = False
    for token in tokens:
        if after_comment or not token or _NEEDS_QUOTES.search(token):
            escaped = token.replace("\\", "\\\\").replace('"', '\\"')
            out.append(f'"{escaped}"')
        else:
            out.append(token)
        after_comment = token == "--comment"
    return out


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule: ``<op> <chain> <spec...>`` in ``table``."""

    table: str
    chain: str
    spec: tuple[str, ...]

    def line(self, op: str = "-A") -> str:
        """The rule as ``iptables -S`` prints it and ``iptables-restore`` reads it."""
        return " ".join((op, self.chain, *quote_tokens(self.spec)))


@dataclass(frozen=True, slots=True)
class ChainSpec:
    """A chain Loden owns: its rules in order, and the one jump that makes it reachable."""

    family: Family
    table: str
    chain: str
    #: The built-in chain holding the jump (``POSTROUTING`` or ``FORWARD``).
    parent: str
    jump: Rule
    rules: tuple[Rule, ...]

    def golden_lines(self) -> list[str]:
        """What ``iptables -t <table> -S`` lists for Loden (without the ``-P`` lines and
        without other components' rules): ``-N``, the jump, then the chain's rules."""
        return [f"-N {self.chain}", self.jump.line(), *(r.line() for r in self.rules)]


def _family(network: Network) -> Family:
    return 4 if network.version == 4 else 6


def masq_chain(network: Network, subnet: Network, *, random_fully: bool) -> ChainSpec:
    """flannel's masquerade rules for cluster network ``network`` and own ``subnet``
    (spec §7.2; ``random_fully`` must already include the iptables version check)."""
    if network.version != subnet.version:
        raise TrafficRulesError(
            f"masquerade rules need one IP family, got network {network} and subnet {subnet}: "
            "pass the IPv4 or the IPv6 pair"
        )
    fam = _family(network)
    n, s, mc = str(network), str(subnet), MULTICAST[fam]
    c = ("-m", "comment", "--comment", MASQ_COMMENT)
    rf = ("--random-fully",) if random_fully else ()

    def rule(*spec: str) -> Rule:
        return Rule("nat", POSTRTG_CHAIN, spec)

    return ChainSpec(
        family=fam,
        table="nat",
        chain=POSTRTG_CHAIN,
        parent="POSTROUTING",
        jump=Rule("nat", "POSTROUTING", (*c, "-j", POSTRTG_CHAIN)),
        rules=(
            rule("-m", "mark", "--mark", KUBE_PROXY_MARK, *c, "-j", "RETURN"),
            rule("-s", s, "-d", n, *c, "-j", "RETURN"),
            rule("-s", n, "-d", s, *c, "-j", "RETURN"),
            rule("!", "-s", n, "-d", s, *c, "-j", "RETURN"),
            rule("-s", n, "!", "-d", mc, *c, "-j", "MASQUERADE", *rf),
            rule("!", "-s", n, "-d", n, *c, "-j", "MASQUERADE", *rf),
        ),
    )


def forward_chain(network: Network) -> ChainSpec:
    """flannel's forward-accept rules for the cluster ``network`` (spec §7.3)."""
    n = str(network)
    c = ("-m", "comment", "--comment", FWD_COMMENT)
    return ChainSpec(
        family=_family(network),
        table="filter",
        chain=FWD_CHAIN,
        parent="FORWARD",
        jump=Rule("filter", "FORWARD", (*c, "-j", FWD_CHAIN)),
        rules=(
            Rule("filter", FWD_CHAIN, ("-s", n, *c, "-j", "ACCEPT")),
            Rule("filter", FWD_CHAIN, ("-d", n, *c, "-j", "ACCEPT")),
        ),
    )
