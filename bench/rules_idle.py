"""Idle cost of the agent's ``rules`` loop: one pass on an unchanged ruleset, old vs new.

Run by hand (root): ``.venv/bin/python bench/rules_idle.py [--passes 200] [--rounds 2]``.
Creates a namespace, re-runs itself inside it (as the agent runs inside its own, with
no ``ip netns exec`` per command), installs the rules once, then times ``passes`` calls
of ``ensure_masq_rules`` + ``ensure_forward_rules`` per mode (iptables, nftables) with
the nf_tables generation shortcut off ("old": dump every pass) and on ("new"). Prints CPU
per pass of this process (``time.process_time``) and of its children (``os.times``),
the processes started per pass, and the share of a core at ``--iptables-resync`` 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loden.traffic import Networks
from loden.traffic.commands import CommandResult, Commands
from loden.traffic.iptables import IptablesManager
from loden.traffic.nft_generation import NftGeneration
from loden.traffic.nftables import NftablesManager

RESYNC_SECONDS = 5.0


class Counting:
    def __init__(self) -> None:
        self.inner = Commands()
        self.started = 0

    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, check: bool = True
    ) -> CommandResult:
        self.started += 1
        return await self.inner.run(argv, stdin=stdin, check=check)

    def has(self, program: str) -> bool:
        return self.inner.has(program)


def children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


async def measure(mode: str, shortcut: bool, nets: Networks, passes: int) -> str:
    runner = Counting()
    # the agent's source: its own namespace ("auto" gives none to a wrapped runner)
    generation = NftGeneration() if shortcut else None
    mgr: IptablesManager | NftablesManager
    if mode == "iptables":
        mgr = IptablesManager(runner, generation=generation)
    else:
        mgr = NftablesManager(runner, generation=generation)

    async def one_pass() -> bool:
        changed = await mgr.ensure_masq_rules(nets, nets, random_fully=True)
        return await mgr.ensure_forward_rules(nets) or changed

    for _ in range(3):  # install, verify (record), and one settled pass
        await one_pass()
    runner.started = 0
    own0, kids0, wall0 = time.process_time(), children_cpu(), time.perf_counter()
    for _ in range(passes):
        if await one_pass():
            raise SystemExit(f"{mode}: the ruleset changed during the measurement")
    own = (time.process_time() - own0) / passes
    kids = (children_cpu() - kids0) / passes
    wall = (time.perf_counter() - wall0) / passes
    name = "new" if shortcut else "old"
    share = 100 * (own + kids) / RESYNC_SECONDS
    return (
        f"{mode:9} {name}: own {own * 1e6:8.0f} us  children {kids * 1e6:8.0f} us  "
        f"wall {wall * 1e6:8.0f} us  processes {runner.started / passes:4.1f}/pass  "
        f"= {share:.4f} % of a core at {RESYNC_SECONDS:g} s"
    )


async def inside(passes: int, rounds: int, ipv6: bool) -> None:
    nets = Networks(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.1.0/24"))
    if ipv6:
        nets = Networks(
            nets.network, nets.subnet, IPv6Network("fd00:10::/56"), IPv6Network("fd00:10:0:1::/64")
        )
    for mode in ("iptables", "nftables"):
        for _ in range(rounds):
            for shortcut in (False, True):
                print(await measure(mode, shortcut, nets, passes), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ipv6", action="store_true", help="dual stack (4 chains per pass)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        asyncio.run(inside(args.passes, args.rounds, args.ipv6))
        return
    name = f"ldbr{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=20)
    try:
        argv = [sys.executable, __file__, "--inside", f"--passes={args.passes}"]
        argv += [f"--rounds={args.rounds}"] + (["--ipv6"] if args.ipv6 else [])
        subprocess.run(["ip", "netns", "exec", name, *argv], check=True, timeout=1800)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=20)


if __name__ == "__main__":
    main()
