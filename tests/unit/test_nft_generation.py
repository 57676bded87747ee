"""The NFT_MSG_GETGEN codec, the verified-at records and where a manager reads the id."""

from __future__ import annotations

import errno
import struct

import pytest

from loden.traffic import Networks
from loden.traffic.commands import Commands
from loden.traffic.iptables import IptablesManager
from loden.traffic.iptables_rules import masq_chain
from loden.traffic.nft_generation import (
    NEWGEN_TYPE,
    NftGeneration,
    VerifiedAt,
    generation_source,
    getgen_request,
    parse_reply,
    source_for_prefix,
)
from loden.traffic.nftables import NftablesManager
from loden.traffic.nftables import forward_chain as nft_forward_chain
from tests.unit.test_traffic_fakes import CUR, VERSION, FakeRunner, N, S, save_dump

HDR = struct.Struct("=IHHII")


def newgen(seq: int, gen: int, *, with_id: bool = True) -> bytes:
    attrs = struct.pack("=HH", 8, 1) + gen.to_bytes(4, "big") if with_id else b""
    attrs += struct.pack("=HH", 8, 2) + (4242).to_bytes(4, "big")  # NFTA_GEN_PROC_PID
    body = struct.pack("=BBH", 0, 0, 0) + attrs
    return HDR.pack(HDR.size + len(body), NEWGEN_TYPE, 0, seq, 1234) + body


def error(seq: int, code: int) -> bytes:
    body = struct.pack("=i", -code) + getgen_request(seq)
    return HDR.pack(HDR.size + len(body), 2, 0, seq, 0) + body


def test_request_is_a_getgen_with_an_unspec_nfgenmsg() -> None:
    assert getgen_request(7) == bytes.fromhex("14000000100a010007000000000000000000" + "0000")


def test_reply_gives_the_big_endian_id() -> None:
    assert parse_reply(newgen(5, 0x01020304), 5) == 0x01020304


def test_a_late_reply_to_another_request_is_skipped() -> None:
    assert parse_reply(newgen(4, 9), 5) is None
    assert parse_reply(newgen(4, 9) + newgen(5, 10), 5) == 10


def test_kernel_error_and_malformed_replies_raise() -> None:
    with pytest.raises(OSError) as info:
        parse_reply(error(5, errno.EPERM), 5)
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError):
        parse_reply(newgen(5, 1, with_id=False), 5)
    with pytest.raises(OSError):
        parse_reply(newgen(5, 1)[:-4], 5)


class Counter:
    def __init__(self, values: list[int | OSError]) -> None:
        self.values = values

    def read(self) -> int:
        value = self.values.pop(0)
        if isinstance(value, OSError):
            raise value
        return value


def test_records_match_on_place_wish_and_generation() -> None:
    seen = VerifiedAt(Counter([3, 3, 4]))
    gen = seen.generation()
    seen.verified((4, "FLANNEL-FWD"), "spec-a", gen)
    assert seen.unchanged((4, "FLANNEL-FWD"), "spec-a", seen.generation())
    assert not seen.unchanged((4, "FLANNEL-FWD"), "spec-b", 3)  # another wish
    assert not seen.unchanged((6, "FLANNEL-FWD"), "spec-a", 3)  # another family
    assert not seen.unchanged((4, "FLANNEL-FWD"), "spec-a", seen.generation())  # 4: changed
    seen.forget((4, "FLANNEL-FWD"))
    assert not seen.unchanged((4, "FLANNEL-FWD"), "spec-a", 3)


def test_a_failed_read_never_skips() -> None:
    seen = VerifiedAt(Counter([3, OSError(errno.EPERM, "no"), 3]))
    seen.verified("k", "w", seen.generation())
    gen = seen.generation()
    assert gen is None and not seen.unchanged("k", "w", gen)
    seen.verified("k", "w", gen)  # a dump at an unknown generation clears the record
    assert not seen.unchanged("k", "w", seen.generation())


def test_no_source_never_skips() -> None:
    seen = VerifiedAt(None)
    seen.verified("k", "w", seen.generation())
    assert not seen.unchanged("k", "w", seen.generation())


def test_where_the_id_is_read() -> None:
    own = source_for_prefix(())
    assert isinstance(own, NftGeneration) and own.netns is None
    named = source_for_prefix(("ip", "netns", "exec", "ld1"))
    assert isinstance(named, NftGeneration) and named.netns == "ld1"
    entered = source_for_prefix(("nsenter", "--net=/run/netns/x", "--"))
    assert isinstance(entered, NftGeneration) and entered.netns == "/run/netns/x"
    assert source_for_prefix(("ssh", "node1")) is None
    # a fake runner's rules are not in any kernel; an explicit choice wins
    assert generation_source(FakeRunner({}), "auto") is None
    assert generation_source(Commands(), None) is None
    counter = Counter([])
    assert generation_source(FakeRunner({}), counter) is counter
    assert isinstance(generation_source(Commands(), "auto"), NftGeneration)


class Settable:
    """A generation that the test moves by hand."""

    def __init__(self) -> None:
        self.value = 1

    def read(self) -> int:
        return self.value


async def test_iptables_dump_skipped_while_the_generation_stands() -> None:
    want = masq_chain(N, S, random_fully=True)
    good = save_dump("nat", [want.jump.line(), *(r.line() for r in want.rules)], [want.chain])
    save = ("iptables-nft-save", "-t", "nat")
    fake = FakeRunner({**VERSION, save: good})
    gen = Settable()
    mgr = IptablesManager(fake, generation=gen)
    assert await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True) is False
    assert fake.argvs().count(save) == 1
    fake.calls.clear()
    for _ in range(5):
        assert await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True) is False
    assert fake.calls == []
    # an edit anywhere: dump again, find the chain gone, rewrite it
    gen.value = 2
    fake.answers[save] = save_dump("nat", [])
    assert await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True) is True
    assert [a[0] for a in fake.argvs()] == ["iptables-nft-save", "iptables-nft-restore"]
    # our own write is not recorded: the next call dumps even at the same generation
    fake.calls.clear()
    fake.answers[save] = good
    assert await mgr.ensure_masq_rules(CUR, Networks(), random_fully=True) is False
    assert fake.argvs() == [save]


async def test_iptables_legacy_never_reads_the_generation() -> None:
    class Refuse:
        def read(self) -> int:
            raise AssertionError("legacy has no nf_tables generation")

    fake = FakeRunner({("iptables-legacy", "--version"): "iptables v1.8.9 (legacy)\n"})
    mgr = IptablesManager(fake, backend="legacy", generation=Refuse())
    await mgr.ensure_forward_rules(CUR)
    fake.calls.clear()
    await mgr.ensure_forward_rules(CUR)
    assert ("iptables-legacy-save", "-t", "filter") in fake.argvs()


async def test_nft_listing_skipped_while_the_generation_stands() -> None:
    chain = nft_forward_chain(N)
    list_argv = ("nft", "list", "chain", "ip", "flannel-ipv4", "forward")
    fake = FakeRunner({list_argv: chain.listing()})
    gen = Settable()
    mgr = NftablesManager(fake, generation=gen)
    assert await mgr.ensure_forward_rules(CUR) is False
    fake.calls.clear()
    assert await mgr.ensure_forward_rules(CUR) is False
    assert fake.calls == []
    gen.value = 7
    assert await mgr.ensure_forward_rules(CUR) is False
    assert fake.argvs() == [list_argv]
