"""Expected masquerade/forward rules against the kernel's, read-only (iptables mode).

The same rule text and diff the agent uses (:mod:`loden.traffic.iptables_rules`,
:func:`loden.traffic.iptables_save.diff_chain`), without the repair step.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network

from loden.errors import LodenError
from loden.traffic.commands import Commands
from loden.traffic.iptables import detect_xtables
from loden.traffic.iptables_rules import ChainSpec, forward_chain, masq_chain
from loden.traffic.iptables_save import SavedTable, diff_chain, parse_save


@dataclass(frozen=True, slots=True)
class RulesDiff:
    chain: str
    table: str
    ok: bool
    summary: str
    missing: tuple[str, ...] = ()


async def rules_diff(
    network: IPv4Network,
    subnet: IPv4Network,
    *,
    ip_masq: bool,
    forward: bool,
    random_fully: bool = True,
) -> list[RulesDiff]:
    """One entry per chain Loden (or flanneld ≥ v0.20) keeps: FLANNEL-POSTRTG, FLANNEL-FWD."""
    runner = Commands()
    try:
        xt = await detect_xtables(runner, 4)
    except LodenError as exc:
        return [RulesDiff("iptables", "-", False, f"cannot read iptables: {exc}")]
    out: list[RulesDiff] = []
    specs: list[ChainSpec] = []
    if ip_masq:
        rf = random_fully and xt.supports_random_fully
        specs.append(masq_chain(network, subnet, random_fully=rf))
    if forward:
        specs.append(forward_chain(network))
    tables: dict[str, SavedTable] = {}
    for want in specs:
        if want.table not in tables:
            dump = await runner.run([xt.save, "-t", want.table], check=False)
            tables[want.table] = parse_save(dump.text).get(want.table, SavedTable(want.table))
        drift = diff_chain(tables[want.table], want)
        out.append(
            RulesDiff(
                want.chain,
                want.table,
                drift.ok,
                drift.describe(),
                tuple(" ".join(r.line().split()) for r in drift.missing),
            )
        )
    return out
