"""FORWARD policy DROP (Docker >= 1.13) without the forward-accept rules (pain point 12)."""

from __future__ import annotations

from loden.doctor.base import Context, Finding
from loden.errors import LodenError
from loden.traffic.commands import Commands
from loden.traffic.iptables import detect_xtables
from loden.traffic.iptables_rules import FWD_CHAIN
from loden.traffic.iptables_save import parse_save


async def check_forward_policy(ctx: Context) -> list[Finding]:
    config = ctx.config
    if config is None or config.enable_nftables or config.network is None:
        return []
    runner = Commands()
    try:
        xt = await detect_xtables(runner, 4)
        dump = await runner.run([xt.save, "-t", "filter"], check=False)
    except LodenError:
        return []
    table = parse_save(dump.text).get("filter")
    if table is None or table.policies.get("FORWARD") != "DROP":
        return []
    net = str(config.network)
    forward = table.chain_specs("FORWARD")
    jumps = any(FWD_CHAIN in spec for spec in forward)
    accepts = jumps and any(
        "ACCEPT" in spec and net in spec for spec in table.chain_specs(FWD_CHAIN)
    )
    accepts = accepts or any("ACCEPT" in spec and net in spec for spec in forward)
    if accepts:
        return []
    return [
        Finding(
            "forward/policy-drop",
            "the FORWARD policy is DROP and nothing accepts pod traffic: cross-node pod "
            "traffic is dropped",
            f"{xt.save}: ':FORWARD DROP', no ACCEPT rule for {net} "
            f"({FWD_CHAIN} {'present' if jumps else 'absent'})",
            "run the agent with -iptables-forward-rules=true (the default), or add "
            f"iptables -A FORWARD -s {net} -j ACCEPT and -d {net} -j ACCEPT",
        )
    ]
