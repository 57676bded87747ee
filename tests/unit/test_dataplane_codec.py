"""The rtnetlink codec and the diff rules, without a kernel."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from loden.backend.routes import diff, entry_key, ordered, transition
from loden.kernel import rtnl
from loden.kernel.netlink import RTPROT_LODEN, Change, FdbEntry, Neighbour, Route
from loden.kernel.types import NTF_SELF

NET = IPv4Network("10.5.2.0/24")
GW = IPv4Address("10.5.2.0")


def as_kernel_message(kind: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 1, 0) + body


def test_route_roundtrip() -> None:
    route = Route(NET, gateway=GW, oif=7, onlink=True, priority=5)
    kind, flags, body = rtnl.encode(route, delete=False)
    assert kind == rtnl.RTM_NEWROUTE
    assert flags & rtnl.NLM_F_REPLACE and flags & rtnl.NLM_F_CREATE and flags & rtnl.NLM_F_ACK
    decoded = rtnl.decode_route(as_kernel_message(kind, body))
    assert decoded == route and decoded.protocol == RTPROT_LODEN == 76


def test_route_v6_and_big_table_roundtrip() -> None:
    route = Route(IPv6Network("fd00:5:2::/64"), gateway=IPv6Address("fe80::1"), oif=3, table=1000)
    kind, _, body = rtnl.encode(route, delete=False)
    assert rtnl.decode_route(as_kernel_message(kind, body)) == route


def test_route_delete_matches_any_scope() -> None:
    kind, flags, body = rtnl.encode(Route(NET, gateway=GW, oif=7), delete=True)
    assert kind == rtnl.RTM_DELROUTE and not flags & rtnl.NLM_F_CREATE
    assert body[6] == rtnl.RT_SCOPE_NOWHERE and body[5] == RTPROT_LODEN


def test_neighbour_and_fdb_roundtrip() -> None:
    neigh = Neighbour(4, GW, "0a:58:0a:05:02:00")
    kind, _, body = rtnl.encode(neigh, delete=False)
    assert rtnl.decode_neigh(as_kernel_message(kind, body)) == neigh
    fdb = FdbEntry(4, "0a:58:0a:05:02:00", IPv4Address("192.0.2.2"))
    kind, _, body = rtnl.encode(fdb, delete=False)
    decoded = rtnl.decode_neigh(as_kernel_message(kind, body))
    assert decoded == fdb and decoded.permanent and decoded.flags == NTF_SELF


def test_error_message_with_extended_ack() -> None:
    text = b"Nexthop has invalid gateway\0"
    attr = struct.pack("=HH", 4 + len(text), 1) + text + b"\0" * (-len(text) % 4)
    inner = struct.pack("=IHHII", 60, 24, 5, 9, 0)
    body = struct.pack("=i", -101) + inner + attr
    msg = struct.pack("=IHHII", 16 + len(body), rtnl.NLMSG_ERROR, 0x300, 9, 0) + body
    err = rtnl._error(msg, 0x300)
    assert err is not None and err.errno == 101
    assert err.kernel_message == "Nexthop has invalid gateway"
    assert "ENETUNREACH" in str(err)
    ok = struct.pack("=IHHII", 36, rtnl.NLMSG_ERROR, 0x100, 9, 0) + struct.pack("=i", 0) + inner
    assert rtnl._error(ok, 0x100) is None


def test_diff_adopts_replaces_and_sweeps_only_owned() -> None:
    want = Route(NET, gateway=GW, oif=4, onlink=True)
    boot_twin = Route(NET, gateway=GW, oif=4, onlink=True, protocol=3)
    stale = Route(IPv4Network("10.5.9.0/24"), gateway=IPv4Address("10.5.9.0"), oif=4, onlink=True)
    static = Route(IPv4Network("10.5.8.0/24"), gateway=GW, oif=4, protocol=4)
    changes = diff([want], [boot_twin, stale, static], owned=lambda e: e is stale)
    assert changes == [Change(stale, delete=True), Change(want)]
    assert diff([want], [want], owned=lambda e: True) == []


def test_diff_fdb_extra_remote_is_removed() -> None:
    mac = "0a:58:00:00:00:01"
    want = FdbEntry(4, mac, IPv4Address("192.0.2.2"))
    extra = FdbEntry(4, mac, IPv4Address("192.0.2.3"))
    changes = diff([want], [want, extra], owned=lambda e: True)
    assert changes == [Change(extra, delete=True)]


def test_diff_neighbour_with_other_mac_is_replaced_not_deleted() -> None:
    want = Neighbour(4, GW, "0a:58:00:00:00:01")
    old = Neighbour(4, GW, "0a:58:00:00:00:02")
    assert diff([want], [old], owned=lambda e: True) == [Change(want)]


def test_transition_and_order() -> None:
    old = (
        Neighbour(4, GW, "0a:00:00:00:00:01"),
        FdbEntry(4, "0a:00:00:00:00:01", GW),
        Route(NET, gateway=GW, oif=4, onlink=True),
    )
    new = (
        Neighbour(4, GW, "0a:00:00:00:00:02"),
        FdbEntry(4, "0a:00:00:00:00:02", GW),
        Route(NET, gateway=GW, oif=4, onlink=True),
    )
    changes = transition(old, new)
    # The neighbour and route keys are overwritten; only the old MAC's FDB entry goes,
    # after the new entries are written.
    assert changes[-1] == Change(old[1], delete=True)
    assert [c.delete for c in changes] == [False, False, False, True]
    assert entry_key(old[0]) == entry_key(new[0])
    mixed = [
        Change(new[0], delete=True),
        Change(new[2]),
        Change(new[2], delete=True),
        Change(new[1]),
    ]
    ranks = [(isinstance(c.entry, Route), c.delete) for c in ordered(mixed)]
    assert ranks == [(True, True), (False, False), (True, False), (False, True)]


def _msg(kind: int, seq: int, body: bytes = b"\0" * 4) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body


def test_a_dump_makes_each_message_only_when_reached() -> None:
    """Replies of our dump (seq 7), in datagram order; another request's message, an
    ack and what follows DONE are not replies."""
    first = _msg(24, 7, b"a" * 4) + _msg(24, 9, b"x" * 4) + _msg(24, 7, b"b" * 8)
    second = _msg(rtnl.NLMSG_ERROR, 7, b"\0" * 20) + _msg(24, 7, b"c" * 4)
    second += _msg(rtnl.NLMSG_DONE, 7) + _msg(24, 7, b"z" * 4)
    dump = rtnl.Dump([first, second], 7)
    bodies = [msg[16:] for msg in dump]
    assert bodies == [b"a" * 4, b"b" * 8, b"c" * 4]
    assert [msg[16:] for msg in dump] == bodies  # it can be walked again
    it = iter(dump)
    assert isinstance(next(it), bytes)  # lazy: one message made per step
