"""iptables mode against real iptables, each test inside its own network namespace."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network

import pytest

from loden.traffic import Networks, open_traffic_manager
from loden.traffic.iptables import IptablesManager
from loden.traffic.iptables_rules import forward_chain, masq_chain
from tests.fixtures.topology import Namespace
from tests.fixtures.traffic import bare_netns, listed, runner_in

pytestmark = pytest.mark.root

N = IPv4Network("10.244.0.0/16")
S = IPv4Network("10.244.1.0/24")
S2 = IPv4Network("10.244.9.0/24")
N6 = IPv6Network("fd00:10::/56")
S6 = IPv6Network("fd00:10:0:1::/64")
CUR = Networks(N, S)
MASQ = masq_chain(N, S, random_fully=True).golden_lines()
FWD = forward_chain(N).golden_lines()
JUMP = ["-m", "comment", "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG"]
MARK_RULE = ["-m", "mark", "--mark", "0x4000/0x4000", "-m", "comment", "--comment", "flanneld masq"]


@pytest.fixture
def ns() -> Iterator[Namespace]:
    with bare_netns() as namespace:
        yield namespace


async def test_golden_rules_then_no_op(ns: Namespace) -> None:
    mgr = open_traffic_manager(nftables=False, prefix=("ip", "netns", "exec", ns.name))
    assert await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True) is True
    assert await mgr.ensure_forward_rules(CUR) is True
    assert listed(ns, "iptables", "nat") == MASQ
    assert listed(ns, "iptables", "filter") == FWD
    # the iptables-save form is what the resync compares: nothing to do the second time
    assert await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True) is False
    assert await mgr.ensure_forward_rules(CUR) is False
    # a restart (new manager) finds everything in place and rewrites nothing
    again = IptablesManager(runner_in(ns))
    assert await again.ensure_masq_rules(CUR, Networks(), random_fully=True) is False


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param([["-F", "FLANNEL-POSTRTG"]], "missing", id="flush-chain"),
        pytest.param([["-D", "POSTROUTING", *JUMP]], "missing", id="delete-jump"),
        pytest.param(
            [["-D", "POSTROUTING", *JUMP], ["-F", "FLANNEL-POSTRTG"], ["-X", "FLANNEL-POSTRTG"]],
            "missing",
            id="delete-chain",
        ),
        pytest.param(
            [["-I", "FLANNEL-POSTRTG", "1", "-s", "192.168.0.0/16", "-j", "RETURN"]],
            "misordered",
            id="stray-rule",
        ),
        pytest.param([["-A", "POSTROUTING", *JUMP]], "misordered", id="duplicate-jump"),
        pytest.param(
            [["-D", "FLANNEL-POSTRTG", "1"], ["-A", "FLANNEL-POSTRTG", *MARK_RULE, "-j", "RETURN"]],
            "misordered",
            id="reordered",
        ),
    ],
)
async def test_resync_restores_exact_golden(
    ns: Namespace, damage: list[list[str]], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    # another component's rule in POSTROUTING must survive every repair
    ns.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "172.17.0.0/16", "-j", "MASQUERADE")
    mgr = IptablesManager(runner_in(ns))
    await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True)
    for argv in damage:
        ns.run("iptables", "-t", "nat", *argv)
    assert listed(ns, "iptables", "nat") != [
        MASQ[0],
        "-A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE",
        *MASQ[1:],
    ]
    with caplog.at_level(logging.WARNING, logger="loden.traffic.iptables"):
        assert await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True) is True
    got = listed(ns, "iptables", "nat")
    assert "-A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE" in got
    assert [line for line in got if "FLANNEL" in line] == MASQ
    expected = {
        "missing": "Some iptables rules are missing; deleting and recreating rules",
        "misordered": "Unexpected or misordered iptables rules; deleting and recreating rules",
    }[message]
    assert any(m.startswith(expected) and "chain FLANNEL-POSTRTG" in m for m in caplog.messages)
    assert await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True) is False


async def test_forward_chain_repair(ns: Namespace) -> None:
    mgr = IptablesManager(runner_in(ns))
    await mgr.ensure_forward_rules(CUR)
    ns.run("iptables", "-F", "FLANNEL-FWD")
    ns.run("iptables", "-A", "FLANNEL-FWD", "-j", "DROP")
    assert await mgr.ensure_forward_rules(CUR) is True
    assert listed(ns, "iptables", "filter") == FWD


async def test_recycle_after_subnet_change(ns: Namespace) -> None:
    mgr = IptablesManager(runner_in(ns))
    await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True)
    restarted = IptablesManager(runner_in(ns))
    assert await restarted.ensure_masq_rules(Networks(N, S2), CUR, random_fully=True) is True
    got = listed(ns, "iptables", "nat")
    assert got == masq_chain(N, S2, random_fully=True).golden_lines()
    assert not any(str(S) in line for line in got)


async def test_ipv6_rules(ns: Namespace) -> None:
    mgr = IptablesManager(runner_in(ns))
    dual = Networks(N, S, N6, S6)
    assert await mgr.ensure_masq_rules(dual, Networks(), random_fully=True) is True
    assert await mgr.ensure_forward_rules(dual) is True
    assert listed(ns, "ip6tables", "nat") == masq_chain(N6, S6, random_fully=True).golden_lines()
    assert listed(ns, "ip6tables", "filter") == forward_chain(N6).golden_lines()
    assert listed(ns, "iptables", "nat") == MASQ
    ns.run("ip6tables", "-t", "nat", "-F", "FLANNEL-POSTRTG")
    assert await mgr.ensure_masq_rules(dual, Networks(), random_fully=True) is True
    assert listed(ns, "ip6tables", "nat") == masq_chain(N6, S6, random_fully=True).golden_lines()


async def test_random_fully_can_be_disabled(ns: Namespace) -> None:
    mgr = IptablesManager(runner_in(ns))
    await mgr.ensure_masq_rules(CUR, Networks(), random_fully=False)
    assert listed(ns, "iptables", "nat") == [line.removesuffix(" --random-fully") for line in MASQ]
    # switching the flag on later is drift too
    assert await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True) is True
    assert listed(ns, "iptables", "nat") == MASQ


async def test_legacy_backend(ns: Namespace) -> None:
    mgr = IptablesManager(runner_in(ns), backend="legacy")
    await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True)
    await mgr.ensure_forward_rules(CUR)
    assert listed(ns, "iptables-legacy", "nat") == MASQ
    assert listed(ns, "iptables-legacy", "filter") == FWD
    assert not any("FLANNEL" in line for line in ns.out("iptables-nft-save").splitlines())
    assert await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True) is False
    ns.run("iptables-legacy", "-t", "nat", "-F", "FLANNEL-POSTRTG")
    assert await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True) is True
    assert listed(ns, "iptables-legacy", "nat") == MASQ


async def test_mixed_backend_warning(ns: Namespace, caplog: pytest.LogCaptureFixture) -> None:
    """Docker or kube-proxy on iptables-legacy while `iptables` is nf_tables (pain point 13)."""
    ns.run("iptables-legacy", "-P", "FORWARD", "DROP")
    with caplog.at_level(logging.WARNING, logger="loden.traffic.iptables"):
        await IptablesManager(runner_in(ns)).ensure_forward_rules(CUR)
    assert any(
        "iptables backend mismatch" in m and "FORWARD policy DROP" in m for m in caplog.messages
    )
    assert listed(ns, "iptables-nft", "filter") == FWD


async def test_remove_all(ns: Namespace) -> None:
    mgr = open_traffic_manager(nftables=False, runner=runner_in(ns))
    dual = Networks(N, S, N6, S6)
    await mgr.ensure_masq_rules(dual, Networks(), random_fully=True)
    await mgr.ensure_forward_rules(dual)
    assert await mgr.remove_all() is True
    for cmd in ("iptables-save", "ip6tables-save"):
        assert "FLANNEL" not in ns.out(cmd)
    assert await mgr.remove_all() is False
