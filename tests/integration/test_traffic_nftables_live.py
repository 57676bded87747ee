"""nftables mode and the cross-mode cleanups, each test inside its own network namespace."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network

import pytest

from loden.traffic import Networks, open_traffic_manager
from loden.traffic.iptables import IptablesManager
from loden.traffic.nftables import NftablesManager, forward_chain, masq_chain
from tests.fixtures.topology import Namespace
from tests.fixtures.traffic import bare_netns, runner_in
from tests.unit.test_traffic_nftables import FORWARD_GOLDEN, POSTRTG_GOLDEN

pytestmark = pytest.mark.root

N = IPv4Network("10.244.0.0/16")
S = IPv4Network("10.244.1.0/24")
N6 = IPv6Network("fd00:10::/56")
S6 = IPv6Network("fd00:10:0:1::/64")
CUR = Networks(N, S)
DUAL = Networks(N, S, N6, S6)


@pytest.fixture
def ns() -> Iterator[Namespace]:
    with bare_netns() as namespace:
        yield namespace


def nft_chain(ns: Namespace, family: str, table: str, chain: str) -> str:
    return ns.out("nft", "list", "chain", family, table, chain)


def flannel_tables(ns: Namespace) -> list[str]:
    return [line for line in ns.out("nft", "list", "tables").splitlines() if "flannel" in line]


async def test_nft_goldens(ns: Namespace) -> None:
    mgr = NftablesManager(runner_in(ns))
    assert await mgr.ensure_masq_rules(DUAL, Networks(), random_fully=True) is True
    assert await mgr.ensure_forward_rules(DUAL) is True
    assert nft_chain(ns, "ip", "flannel-ipv4", "postrtg") == POSTRTG_GOLDEN
    assert nft_chain(ns, "ip", "flannel-ipv4", "forward") == FORWARD_GOLDEN
    v6 = nft_chain(ns, "ip6", "flannel-ipv6", "postrtg")
    assert v6 == masq_chain(N6, S6, random_fully=True).listing()
    assert "ip6 saddr != fd00:10:0:1::/64 ip6 daddr fd00:10::/56 return" in v6
    assert nft_chain(ns, "ip6", "flannel-ipv6", "forward") == forward_chain(N6).listing()
    table = ns.out("nft", "list", "table", "ip", "flannel-ipv4")
    assert '\tcomment "rules for flannel-ipv4"\n' in table
    assert await mgr.ensure_masq_rules(DUAL, Networks(), random_fully=True) is False
    assert await mgr.ensure_forward_rules(DUAL) is False


async def test_both_tables_created_even_for_ipv4_only(ns: Namespace) -> None:
    await NftablesManager(runner_in(ns)).ensure_forward_rules(CUR)
    assert flannel_tables(ns) == ["table ip flannel-ipv4", "table ip6 flannel-ipv6"]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(["flush", "chain", "ip", "flannel-ipv4", "postrtg"], id="flush-chain"),
        pytest.param(["delete", "table", "ip", "flannel-ipv4"], id="delete-table"),
        pytest.param(
            ["insert", "rule", "ip", "flannel-ipv4", "postrtg", "ip", "saddr", "1.2.3.4", "return"],
            id="stray-rule",
        ),
        pytest.param(["flush", "ruleset"], id="flush-ruleset"),
    ],
)
async def test_nft_resync(
    ns: Namespace, damage: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    mgr = NftablesManager(runner_in(ns))
    await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True)
    ns.run("nft", *damage)
    with caplog.at_level(logging.INFO, logger="loden.traffic.nftables"):
        assert await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True) is True
    assert any("chain ip flannel-ipv4 postrtg" in m for m in caplog.messages)
    assert nft_chain(ns, "ip", "flannel-ipv4", "postrtg") == POSTRTG_GOLDEN
    assert await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True) is False


async def test_switch_iptables_to_nftables_leaves_no_iptables_state(ns: Namespace) -> None:
    """Fixes flannel's quirk (§11 item 9): jumps go first, chains in the right tables,
    both families, and both iptables backends."""
    old = IptablesManager(runner_in(ns))
    await old.ensure_masq_rules(DUAL, Networks(), random_fully=True)
    await old.ensure_forward_rules(DUAL)
    legacy = IptablesManager(runner_in(ns), backend="legacy")
    await legacy.ensure_masq_rules(CUR, Networks(), random_fully=True)
    ns.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "172.17.0.0/16", "-j", "MASQUERADE")

    mgr = open_traffic_manager(nftables=True, runner=runner_in(ns))
    await mgr.cleanup_other_mode()
    for cmd in ("iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save"):
        assert "FLANNEL" not in ns.out(cmd), cmd
    assert "-A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE" in ns.out("iptables-save")
    await mgr.ensure_masq_rules(DUAL, Networks(), random_fully=True)
    assert nft_chain(ns, "ip", "flannel-ipv4", "postrtg") == POSTRTG_GOLDEN
    await mgr.cleanup_other_mode()  # idempotent, nftables state untouched
    assert nft_chain(ns, "ip", "flannel-ipv4", "postrtg") == POSTRTG_GOLDEN


async def test_switch_nftables_to_iptables_deletes_tables(ns: Namespace) -> None:
    nft = NftablesManager(runner_in(ns))
    await nft.ensure_masq_rules(DUAL, Networks(), random_fully=True)
    await nft.ensure_forward_rules(DUAL)
    ns.run("nft", "add", "table", "inet", "someone-else")
    mgr = open_traffic_manager(nftables=False, runner=runner_in(ns))
    await mgr.cleanup_other_mode()
    assert flannel_tables(ns) == []
    assert "table inet someone-else" in ns.out("nft", "list", "tables")
    await mgr.cleanup_other_mode()  # nothing left: quiet no-op
    await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True)
    assert flannel_tables(ns) == []


async def test_nft_remove_all(ns: Namespace) -> None:
    mgr = open_traffic_manager(nftables=True, runner=runner_in(ns))
    await mgr.ensure_forward_rules(DUAL)
    assert await mgr.remove_all() is True
    assert flannel_tables(ns) == []
    assert await mgr.remove_all() is False
