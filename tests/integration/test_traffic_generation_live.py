"""The nf_tables generation shortcut against the real kernel, iptables and nft.

Every test runs in its own namespace. The runner is counted: a dump
(``iptables-save``, ``nft list``) is a process started, and an unchanged ruleset must
start none once a chain has been verified; every kind of edit must be seen.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator, Sequence
from ipaddress import IPv4Network

import pytest

from loden.traffic import Networks
from loden.traffic.commands import CommandResult, Commands
from loden.traffic.iptables import IptablesManager
from loden.traffic.iptables_rules import forward_chain, masq_chain
from loden.traffic.nft_generation import NftGeneration
from loden.traffic.nftables import NftablesManager
from tests.fixtures.topology import Namespace
from tests.fixtures.traffic import bare_netns, listed, runner_in
from tests.unit.test_traffic_nftables import FORWARD_GOLDEN, POSTRTG_GOLDEN

pytestmark = pytest.mark.root

N = IPv4Network("10.244.0.0/16")
S = IPv4Network("10.244.1.0/24")
CUR = Networks(N, S)
MASQ = masq_chain(N, S, random_fully=True).golden_lines()
FWD = forward_chain(N).golden_lines()
JUMP = ["-m", "comment", "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG"]
FWD_JUMP = ["-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD"]
PASSES = 20
T4 = ["ip", "flannel-ipv4"]


class CountingRunner:
    """The real runner of a namespace, recording every argv it starts."""

    def __init__(self, inner: Commands) -> None:
        self.inner = inner
        self.argvs: list[tuple[str, ...]] = []

    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, check: bool = True
    ) -> CommandResult:
        self.argvs.append(tuple(argv))
        return await self.inner.run(argv, stdin=stdin, check=check)

    def has(self, program: str) -> bool:
        return self.inner.has(program)

    def take(self) -> list[tuple[str, ...]]:
        """The commands started since the last take."""
        out, self.argvs = self.argvs, []
        return out


class BrokenGeneration:
    """A generation source that always fails, as a netlink read can."""

    def __init__(self) -> None:
        self.reads = 0

    def read(self) -> int:
        self.reads += 1
        raise OSError(13, "NFT_MSG_GETGEN failed: EACCES")


@pytest.fixture
def ns() -> Iterator[Namespace]:
    with bare_netns() as namespace:
        yield namespace


def generation(ns: Namespace) -> int:
    reader = NftGeneration(ns.name)
    try:
        return reader.read()
    finally:
        reader.close()


def dumps(argvs: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    return [a for a in argvs if a[0].endswith("-save") or a[:2] == ("nft", "list")]


async def ensure_both(mgr: IptablesManager | NftablesManager) -> bool:
    changed = await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True)
    return await mgr.ensure_forward_rules(CUR) or changed


Manager = IptablesManager | NftablesManager


async def settled(ns: Namespace, kind: type[Manager]) -> tuple[Manager, CountingRunner]:
    """A manager whose two chains are installed and verified (recorded) once."""
    runner = CountingRunner(runner_in(ns))
    mgr = kind(runner, generation=NftGeneration(ns.name))
    assert await ensure_both(mgr) is True  # installs (not recorded: our own write)
    assert await ensure_both(mgr) is False  # dumps, finds both intact, records
    assert len(dumps(runner.take())) >= 2
    return mgr, runner


# --------------------------------------------------------------------------- the id itself


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param([["iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-j", "RETURN"]], id="A"),
        pytest.param([["iptables-nft", "-t", "nat", "-D", "POSTROUTING", "1"]], id="D"),
        pytest.param([["iptables-nft", "-t", "nat", "-F", "POSTROUTING"]], id="F"),
        pytest.param([["iptables-nft", "-P", "FORWARD", "DROP"]], id="P"),
        pytest.param([["iptables-nft", "-P", "FORWARD", "ACCEPT"]], id="P-same-policy"),
        pytest.param(
            [["iptables-nft", "-t", "mangle", "-A", "PREROUTING", "-j", "ACCEPT"]], id="other-table"
        ),  # fmt: skip
        pytest.param(
            [["nft", "add", "rule", "ip", "nat", "POSTROUTING", "counter"]], id="nft-add-rule"
        ),  # fmt: skip
        pytest.param([["nft", "add", "table", "inet", "unrelated"]], id="nft-other-table"),
        pytest.param([["restore"]], id="restore-noflush"),
    ],
)
def test_every_kind_of_edit_bumps_the_generation(ns: Namespace, edit: list[list[str]]) -> None:
    ns.run("iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-s", "10.9.0.0/16", "-j", "RETURN")
    ns.run("iptables-nft", "-A", "FORWARD", "-j", "ACCEPT")
    before = generation(ns)
    for argv in edit:
        if argv == ["restore"]:
            ns.run(
                "iptables-nft-restore",
                "--noflush",
                input="*filter\n-A FORWARD -s 1.2.3.4/32 -j ACCEPT\nCOMMIT\n",
            )
        else:
            ns.run(*argv)
    assert generation(ns) != before


def test_reads_and_legacy_edits_leave_the_generation_alone(ns: Namespace) -> None:
    ns.run("iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-j", "RETURN")
    before = generation(ns)
    for argv in (
        ["iptables-nft-save"],
        ["iptables-nft-save", "-t", "nat"],
        ["iptables-nft", "-t", "nat", "-S"],
        ["iptables-nft", "-L", "-n", "-v"],
        ["nft", "list", "ruleset"],
        ["iptables-legacy", "-A", "FORWARD", "-j", "ACCEPT"],
    ):
        ns.run(*argv)
    assert generation(ns) == before


def test_the_agents_own_namespace_reads_its_own_generation(ns: Namespace) -> None:
    """The agent runs inside its namespace and opens the socket there (``netns=None``)."""
    probe = "from loden.traffic.nft_generation import NftGeneration; print(NftGeneration().read())"

    def inside() -> int:
        out = ns.out(sys.executable, "-c", probe)
        return int(out.strip())

    assert inside() == generation(ns)
    ns.run("nft", "add", "table", "ip", "probe")
    assert inside() == generation(ns)


def test_a_missing_namespace_is_an_oserror() -> None:
    with pytest.raises(OSError):
        NftGeneration("/var/run/netns/loden-no-such-namespace").read()


# --------------------------------------------------------------------------- iptables-nft


@pytest.mark.parametrize(
    ("kind", "logger"),
    [
        pytest.param(IptablesManager, "loden.traffic.iptables", id="iptables-nft"),
        pytest.param(NftablesManager, "loden.traffic.nftables", id="nftables"),
    ],
)
async def test_unchanged_ruleset_starts_no_process(
    ns: Namespace,
    caplog: pytest.LogCaptureFixture,
    kind: type[Manager],
    logger: str,
) -> None:
    with caplog.at_level(logging.INFO, logger=logger):
        mgr, runner = await settled(ns, kind)
    assert "rules check: nf_tables generation id (dump only after a change)" in caplog.messages
    for _ in range(PASSES):
        assert await ensure_both(mgr) is False
    assert runner.take() == []


@pytest.mark.parametrize(
    ("table", "damage", "golden"),
    [
        pytest.param("nat", ["-D", "FLANNEL-POSTRTG", "2"], MASQ, id="delete-rule"),
        pytest.param("nat", ["-F", "FLANNEL-POSTRTG"], MASQ, id="flush-chain"),
        pytest.param("nat", ["-D", "POSTROUTING", *JUMP], MASQ, id="delete-jump"),
        pytest.param("filter", ["-D", "FORWARD", *FWD_JUMP], FWD, id="delete-forward-jump"),
        pytest.param("filter", ["-F", "FLANNEL-FWD"], FWD, id="flush-forward"),
        pytest.param("nat", ["-I", "FLANNEL-POSTRTG", "1", "-j", "RETURN"], MASQ, id="stray-rule"),
    ],
)
async def test_hand_edit_is_repaired_at_the_next_call(
    ns: Namespace, table: str, damage: list[str], golden: list[str]
) -> None:
    mgr, runner = await settled(ns, IptablesManager)
    ns.run("iptables-nft", "-t", table, *damage)
    assert listed(ns, "iptables-nft", table) != golden
    assert await ensure_both(mgr) is True
    assert listed(ns, "iptables-nft", table) == golden
    # after the repair: one more dump records the repaired state, then silence again
    assert await ensure_both(mgr) is False
    assert dumps(runner.take())
    assert await ensure_both(mgr) is False
    assert runner.take() == []


async def test_unrelated_edit_costs_one_dump_and_no_write(ns: Namespace) -> None:
    mgr, runner = await settled(ns, IptablesManager)
    ns.run("iptables-nft", "-t", "mangle", "-A", "PREROUTING", "-j", "ACCEPT")
    assert await ensure_both(mgr) is False
    argvs = runner.take()
    assert dumps(argvs) == argvs and len(argvs) == 2  # nat and filter dumped, nothing written
    assert await ensure_both(mgr) is False
    assert runner.take() == []


async def test_a_different_wanted_spec_dumps(ns: Namespace) -> None:
    mgr, runner = await settled(ns, IptablesManager)
    # same chain, other wish (--random-fully off): must be checked, and is drift
    assert await mgr.ensure_masq_rules(CUR, Networks(), random_fully=False) is True
    assert listed(ns, "iptables-nft", "nat") == [m.removesuffix(" --random-fully") for m in MASQ]
    assert dumps(runner.take())


async def test_failing_generation_read_dumps_every_call(
    ns: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    runner = CountingRunner(runner_in(ns))
    broken = BrokenGeneration()
    mgr = IptablesManager(runner, generation=broken)
    with caplog.at_level(logging.WARNING, logger="loden.traffic.nft_generation"):
        await ensure_both(mgr)
        runner.take()
        for _ in range(3):
            assert await ensure_both(mgr) is False
            assert len(dumps(runner.take())) == 2
    assert broken.reads >= 8
    assert sum("cannot read the nf_tables generation id" in m for m in caplog.messages) == 1
    ns.run("iptables-nft", "-t", "nat", "-F", "FLANNEL-POSTRTG")
    assert await ensure_both(mgr) is True
    assert listed(ns, "iptables-nft", "nat") == MASQ


async def test_legacy_backend_dumps_every_call(
    ns: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    legacy = subprocess.run(
        ["ip", "netns", "exec", ns.name, "iptables-legacy", "-t", "nat", "-S"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    if legacy.returncode != 0:
        pytest.skip(f"iptables-legacy does not work in this kernel: {legacy.stderr.strip()}")
    runner = CountingRunner(runner_in(ns))
    mgr = IptablesManager(runner, backend="legacy", generation=NftGeneration(ns.name))
    with caplog.at_level(logging.INFO, logger="loden.traffic.iptables"):
        assert await ensure_both(mgr) is True
    assert "rules check: iptables-legacy, dump every --iptables-resync pass" in caplog.messages
    runner.take()
    for _ in range(3):
        assert await ensure_both(mgr) is False
        assert [a[0] for a in runner.take()] == ["iptables-legacy-save"] * 2
    ns.run("iptables-legacy", "-t", "nat", "-D", "FLANNEL-POSTRTG", "1")
    assert await ensure_both(mgr) is True
    assert listed(ns, "iptables-legacy", "nat") == MASQ


# --------------------------------------------------------------------------- nftables mode


def nft_chain(ns: Namespace, chain: str) -> str:
    return ns.out("nft", "list", "chain", "ip", "flannel-ipv4", chain)


@pytest.mark.parametrize(
    ("damage", "chain", "golden"),
    [
        pytest.param(["flush", "chain", *T4, "postrtg"], "postrtg", POSTRTG_GOLDEN, id="flush"),
        pytest.param(["add", "rule", *T4, "forward", "drop"], "forward", FORWARD_GOLDEN, id="add"),
        pytest.param(["delete", "table", *T4], "postrtg", POSTRTG_GOLDEN, id="table"),
    ],
)
async def test_nft_hand_edit_is_repaired_at_the_next_call(
    ns: Namespace, damage: list[str], chain: str, golden: str
) -> None:
    mgr, runner = await settled(ns, NftablesManager)
    ns.run("nft", *damage)
    assert await ensure_both(mgr) is True
    assert nft_chain(ns, chain) == golden
    assert await ensure_both(mgr) is False
    assert dumps(runner.take())
    assert await ensure_both(mgr) is False
    assert runner.take() == []


async def test_nft_failing_generation_read_lists_every_call(ns: Namespace) -> None:
    runner = CountingRunner(runner_in(ns))
    mgr = NftablesManager(runner, generation=BrokenGeneration())
    await ensure_both(mgr)
    runner.take()
    for _ in range(3):
        assert await ensure_both(mgr) is False
        assert len(dumps(runner.take())) == 2
    ns.run("nft", "flush", "chain", "ip", "flannel-ipv4", "postrtg")
    assert await ensure_both(mgr) is True
    assert nft_chain(ns, "postrtg") == POSTRTG_GOLDEN
