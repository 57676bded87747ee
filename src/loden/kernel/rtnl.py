"""A small rtnetlink codec and batching socket for the hot paths (routes, neighbours, FDB).

Why not pyroute2 here: measured in one namespace on the 2-core test machine, pyroute2
0.9.7 spends 70-120 µs *encoding* one neighbour or route message (500 µs through
``IPBatch``/``IPRoute.neigh``) and parses a 5,000-route dump in ~0.4 s. A vxlan node
with 5,000 peers needs 15,000 entries, so pyroute2 alone cannot meet "cold start
≤ 3 s, no-change resync ≤ 0.5 s". These three message types are simple fixed headers
plus a handful of attributes, so packing them with :mod:`struct` costs ~2 µs each,
and the kernel becomes the limit: 15,000 replace requests sent 512 per ``send()`` on
one socket, acks collected after each chunk, take ~0.5 s (the same as ``ip -batch``);
dumping and decoding 5,000 routes + 5,000 neighbours + 5,000 FDB entries ~0.1 s.

Everything else (links with their nested vxlan attributes, addresses) stays on
pyroute2 in :mod:`loden.kernel.netlink`, which is the only public entry point; this
module is an implementation detail of it and raises plain :class:`OSError`.

The socket turns on ``NETLINK_CAP_ACK`` (acks do not echo the request),
``NETLINK_EXT_ACK`` (errors carry the kernel's message) and ``NETLINK_GET_STRICT_CHK``
(dumps are filtered in the kernel: by table for routes, by device for neighbours/FDB).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from itertools import islice
from typing import Final

from loden.kernel.types import (
    NUD_PERMANENT,
    Address,
    Entry,
    FdbEntry,
    IPAddress,
    IPNetwork,
    Link,
    Neighbour,
    Route,
    RouteLookup,
    VxlanSpec,
)

NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
RTM_NEWROUTE: Final = 24
RTM_DELROUTE: Final = 25
RTM_GETROUTE: Final = 26
RTM_NEWNEIGH: Final = 28
RTM_DELNEIGH: Final = 29
RTM_GETNEIGH: Final = 30

NLM_F_REQUEST: Final = 0x1
NLM_F_ACK: Final = 0x4
NLM_F_DUMP_INTR: Final = 0x10
NLM_F_CAPPED: Final = 0x100
NLM_F_ACK_TLVS: Final = 0x200
NLM_F_DUMP: Final = 0x300
NLM_F_REPLACE: Final = 0x100
NLM_F_CREATE: Final = 0x400
NLM_F_EXCL: Final = 0x200

AF_BRIDGE: Final = 7
RTNH_F_ONLINK: Final = 0x4
RT_SCOPE_NOWHERE: Final = 255

NDA_DST: Final = 1
NDA_LLADDR: Final = 2
NDA_IFINDEX: Final = 8
RTA_DST: Final = 1
RTA_OIF: Final = 4
RTA_GATEWAY: Final = 5
RTA_PRIORITY: Final = 6
RTA_PREFSRC: Final = 7
RTA_TABLE: Final = 15

_SOL_NETLINK: Final = 270
_NETLINK_CAP_ACK: Final = 10
_NETLINK_EXT_ACK: Final = 11
_NETLINK_GET_STRICT_CHK: Final = 12
_SO_SNDBUFFORCE: Final = 32
_SO_RCVBUFFORCE: Final = 33
_NLMSGERR_ATTR_MSG: Final = 1

_HDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BxxxiHBB")
_ATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")

#: Requests per ``send()``. Each ack costs ~1 KiB of receive buffer (skb truesize), so
#: 512 stay far below the 8 MiB buffer even when every request fails with a long message.
CHUNK: Final = 512


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def mac_text(raw: bytes) -> str:
    return raw.hex(":")


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _ATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _family(addr: IPAddress | IPNetwork) -> int:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


def encode(entry: Entry, *, delete: bool) -> tuple[int, int, bytes]:
    """(message type, flags, body) for replacing or deleting ``entry``."""
    if isinstance(entry, Route):
        return _encode_route(entry, delete)
    if isinstance(entry, Neighbour):
        body = _NDMSG.pack(_family(entry.dst), entry.ifindex, 0 if delete else entry.state, 0, 0)
        body += _attr(NDA_DST, entry.dst.packed)
        if not delete and entry.lladdr is not None:
            body += _attr(NDA_LLADDR, mac_bytes(entry.lladdr))
        return _neigh_op(body, delete)
    body = _NDMSG.pack(AF_BRIDGE, entry.ifindex, entry.state, entry.flags, 0)
    body += _attr(NDA_LLADDR, mac_bytes(entry.lladdr))
    if entry.dst is not None:
        body += _attr(NDA_DST, entry.dst.packed)
    return _neigh_op(body, delete)


def _neigh_op(body: bytes, delete: bool) -> tuple[int, int, bytes]:
    if delete:
        return RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, body
    return RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body


def _encode_route(route: Route, delete: bool) -> tuple[int, int, bytes]:
    table = route.table if route.table < 256 else 252  # RT_TABLE_COMPAT; RTA_TABLE is exact
    if delete:
        # Scope NOWHERE and type 0 match any; protocol/gateway/oif narrow the match so
        # a route that is not ours at the same destination is never deleted by mistake.
        head = _RTMSG.pack(
            _family(route.dst),
            route.dst.prefixlen,
            0,
            0,
            table,
            route.protocol,
            RT_SCOPE_NOWHERE,
            0,
            0,
        )
    else:
        head = _RTMSG.pack(
            _family(route.dst),
            route.dst.prefixlen,
            0,
            0,
            table,
            route.protocol,
            route.scope,
            route.type,
            RTNH_F_ONLINK if route.onlink else 0,
        )
    body = head + _attr(RTA_TABLE, _U32.pack(route.table))
    if route.dst.prefixlen:
        body += _attr(RTA_DST, route.dst.network_address.packed)
    if route.gateway is not None:
        body += _attr(RTA_GATEWAY, route.gateway.packed)
    if route.oif is not None:
        body += _attr(RTA_OIF, _U32.pack(route.oif))
    if route.priority:
        body += _attr(RTA_PRIORITY, _U32.pack(route.priority))
    if delete:
        return RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, body
    return RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body


def attrs(msg: bytes, offset: int) -> dict[int, bytes]:
    """Top-level attributes of a message body starting at ``offset`` (type -> payload)."""
    out: dict[int, bytes] = {}
    end = len(msg)
    while offset + 4 <= end:
        length, kind = _ATTR.unpack_from(msg, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = msg[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return out


def _addr(raw: bytes | None) -> IPAddress | None:
    if raw is None:
        return None
    return IPv4Address(raw) if len(raw) == 4 else IPv6Address(raw)


def decode_route(msg: bytes) -> Route | None:
    """A RTM_NEWROUTE message (header included) as a :class:`Route`; None if not one."""
    family, dst_len, _src, _tos, table, proto, scope, kind, flags = _RTMSG.unpack_from(msg, 16)
    a = attrs(msg, 16 + _RTMSG.size)
    if RTA_TABLE in a:
        table = _U32.unpack(a[RTA_TABLE])[0]
    raw_dst = a.get(RTA_DST)
    dst: IPNetwork
    if family == socket.AF_INET:
        dst = IPv4Network((raw_dst or b"\0" * 4, dst_len))
    elif family == socket.AF_INET6:
        dst = IPv6Network((raw_dst or b"\0" * 16, dst_len))
    else:
        return None
    oif = a.get(RTA_OIF)
    prio = a.get(RTA_PRIORITY)
    return Route(
        dst=dst,
        gateway=_addr(a.get(RTA_GATEWAY)),
        oif=_U32.unpack(oif)[0] if oif is not None else None,
        onlink=bool(flags & RTNH_F_ONLINK),
        protocol=proto,
        table=table,
        priority=_U32.unpack(prio)[0] if prio is not None else 0,
        scope=scope,
        type=kind,
    )


def decode_neigh(msg: bytes) -> Neighbour | FdbEntry | None:
    """A RTM_NEWNEIGH message: an FDB entry (AF_BRIDGE) or a neighbour."""
    family, ifindex, state, flags, _type = _NDMSG.unpack_from(msg, 16)
    a = attrs(msg, 16 + _NDMSG.size)
    raw_ll = a.get(NDA_LLADDR)
    if family == AF_BRIDGE:
        if raw_ll is None:
            return None
        return FdbEntry(ifindex, mac_text(raw_ll), _addr(a.get(NDA_DST)), state, flags)
    dst = _addr(a.get(NDA_DST))
    if dst is None:
        return None
    return Neighbour(ifindex, dst, mac_text(raw_ll) if raw_ll else None, state)


#: Attributes whose values change by themselves (use timestamps and counters, probes,
#: expiry countdowns): a fingerprint leaves them out.
RTA_CACHEINFO: Final = 12
RTA_EXPIRES: Final = 23
NDA_CACHEINFO: Final = 3
NDA_PROBES: Final = 4
_VOLATILE: Final = {
    RTM_NEWROUTE: frozenset({RTA_CACHEINFO, RTA_EXPIRES}),
    RTM_NEWNEIGH: frozenset({NDA_CACHEINFO, NDA_PROBES}),
}
_BODY_HEAD: Final = 12  # struct rtmsg and struct ndmsg alike
assert _RTMSG.size == _NDMSG.size == _BODY_HEAD
FINGERPRINT_MASK: Final = (1 << 64) - 1


def fingerprint(msg: bytes) -> int:
    """A number for what one dumped route or neighbour message says: its type, its
    rtmsg/ndmsg header and its attributes, without the netlink header (sequence, port)
    and the volatile attributes. Summed over a dump (mod 2**64), it changes when any
    entry in the dump does, at ~1 µs a message against ~2-5 µs to decode one into an
    entry (issue 14: a no-change pass at 5,000 vxlan peers)."""
    mtype = _HDR.unpack_from(msg, 0)[1]
    volatile = _VOLATILE.get(mtype, frozenset())
    head_end = 16 + _BODY_HEAD
    parts = [msg[4:6], msg[16:head_end]]
    offset, end = head_end, len(msg)
    while offset + 4 <= end:
        length, kind = _ATTR.unpack_from(msg, offset)
        if length < 4:
            break
        if kind & 0x3FFF not in volatile:
            parts.append(msg[offset : offset + length])
        offset += (length + 3) & ~3
    return hash(b"".join(parts)) & FINGERPRINT_MASK


def decode_lookup(msg: bytes) -> RouteLookup:
    a = attrs(msg, 16 + _RTMSG.size)
    oif = a.get(RTA_OIF)
    dst = _addr(a.get(RTA_DST))
    return RouteLookup(
        dst=dst if dst is not None else IPv4Address(0),
        oif=_U32.unpack(oif)[0] if oif is not None else None,
        gateway=_addr(a.get(RTA_GATEWAY)),
        prefsrc=_addr(a.get(RTA_PREFSRC)),
    )


def route_dump_request(family: int, table: int) -> tuple[int, bytes]:
    body = _RTMSG.pack(family, 0, 0, 0, table if table < 256 else 0, 0, 0, 0, 0)
    if table >= 256:
        body += _attr(RTA_TABLE, _U32.pack(table))
    return RTM_GETROUTE, body


def neigh_dump_request(family: int, ifindex: int) -> tuple[int, bytes]:
    if family == AF_BRIDGE:
        # FDB dumps take the port filter in the header (rtnl_fdb_dump strict mode).
        return RTM_GETNEIGH, _NDMSG.pack(AF_BRIDGE, ifindex, 0, 0, 0)
    body = _NDMSG.pack(family, 0, 0, 0, 0)
    if ifindex:
        body += _attr(NDA_IFINDEX, _U32.pack(ifindex))
    return RTM_GETNEIGH, body


def lookup_request(dst: IPAddress) -> tuple[int, int, bytes]:
    body = _RTMSG.pack(_family(dst), dst.max_prefixlen, 0, 0, 0, 0, 0, 0, 0)
    return RTM_GETROUTE, NLM_F_REQUEST, body + _attr(RTA_DST, dst.packed)


class NetlinkFailure(OSError):
    """One request failed: errno plus the kernel's extended-ack text, if any."""

    def __init__(self, code: int, message: str = "") -> None:
        text = errno.errorcode.get(code, str(code))
        detail = f"{message} " if message else ""
        super().__init__(code, f"{detail}({text}: {os.strerror(code)})")
        self.kernel_message = message


@dataclass(frozen=True, slots=True)
class Outcome:
    """Result of one request in a batch: error (None if ok) and any reply messages."""

    error: NetlinkFailure | None
    replies: tuple[bytes, ...] = ()


class RtnlSocket:
    """A blocking NETLINK_ROUTE socket; use it from one thread only."""

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        try:
            for opt, value in ((_SO_RCVBUFFORCE, 8 << 20), (_SO_SNDBUFFORCE, 4 << 20)):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, value)
                except PermissionError:
                    sock.setsockopt(socket.SOL_SOCKET, opt - 25, value)  # SO_{SND,RCV}BUF
            for opt in (_NETLINK_CAP_ACK, _NETLINK_EXT_ACK, _NETLINK_GET_STRICT_CHK):
                sock.setsockopt(_SOL_NETLINK, opt, 1)
            sock.bind((0, 0))
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    @property
    def portid(self) -> int:
        """The kernel-assigned netlink port id (``nlmsg_pid`` of what this socket changes)."""
        return int(self._sock.getsockname()[0])

    def _header(self, kind: int, flags: int, body: bytes) -> bytes:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return _HDR.pack(16 + len(body), kind, flags, self._seq, 0) + body

    def transact(self, requests: Sequence[tuple[int, int, bytes]]) -> list[Outcome]:
        """Send ``requests`` (type, flags, body) in chunks; one outcome each.

        A request with ``NLM_F_ACK`` is complete at its ack (or error); one without it
        (a ``get``) at its first reply or error. Every datagram costs a ``recv()``
        (~20 µs), so gets skip the ack.

        :raises OSError: the socket failed (e.g. ENOBUFS: acks were lost).
        """
        outcomes: list[Outcome] = []
        for start in range(0, len(requests), CHUNK):
            chunk = requests[start : start + CHUNK]
            first = (self._seq + 1) & 0xFFFFFFFF or 1
            self._sock.send(b"".join(self._header(k, f, b) for k, f, b in chunk))
            acked = [bool(f & NLM_F_ACK) for _, f, _ in chunk]
            outcomes.extend(self._collect(first, acked))
        return outcomes

    def write(self, requests: Iterable[tuple[int, int, bytes]]) -> list[tuple[int, NetlinkFailure]]:
        """Send acked change requests (type, flags with ``NLM_F_ACK``, body) in chunks,
        encoding them as they are consumed; returns only the failures, by position.

        Why not :meth:`transact`: a cold start at 5,000 vxlan peers writes 15,000
        entries, and holding every encoded request and every outcome at once was ~4 MB
        of short-lived objects, which the agent then kept as fragmented RSS (issue 14).

        :raises OSError: the socket failed (e.g. ENOBUFS: acks were lost).
        """
        failures: list[tuple[int, NetlinkFailure]] = []
        source = iter(requests)
        done = 0
        while True:
            first = (self._seq + 1) & 0xFFFFFFFF or 1
            datagram = b"".join(self._header(k, f, b) for k, f, b in islice(source, CHUNK))
            if not datagram:
                return failures
            count = (self._seq - first + 1) & 0xFFFFFFFF
            self._sock.send(datagram)
            del datagram
            acked = 0
            while acked < count:
                data = self._sock.recv(1 << 20)
                for offset, length, kind, flags, seq, _pid in messages(data):
                    index = (seq - first) & 0xFFFFFFFF
                    if index < count and kind == NLMSG_ERROR:
                        acked += 1
                        err = _error(data[offset : offset + length], flags)
                        if err is not None:
                            failures.append((done + index, err))
            done += count

    def _collect(self, first: int, acked: list[bool]) -> list[Outcome]:
        count = len(acked)
        done: dict[int, NetlinkFailure | None] = {}
        replies: dict[int, list[bytes]] = {}
        while len(done) < count:
            data = self._sock.recv(1 << 20)
            for offset, length, kind, flags, seq, _pid in messages(data):
                index = (seq - first) & 0xFFFFFFFF
                if index < count:
                    msg = data[offset : offset + length]
                    if kind == NLMSG_ERROR:
                        done[index] = _error(msg, flags)
                    else:
                        replies.setdefault(index, []).append(msg)
                        if not acked[index]:
                            done[index] = None
        return [Outcome(done[i], tuple(replies.get(i, ()))) for i in range(count)]

    def dump(self, kind: int, body: bytes) -> Dump:
        """Run one dump request; retried (up to 5 times) if the kernel flags it interrupted."""
        for _ in range(5):
            replies, interrupted = self._dump_once(kind, body)
            if not interrupted:
                return replies
        raise NetlinkFailure(errno.EINTR, "dump kept being interrupted by concurrent changes")

    def _dump_once(self, kind: int, body: bytes) -> tuple[Dump, bool]:
        seq = (self._seq + 1) & 0xFFFFFFFF or 1
        self._sock.send(self._header(kind, NLM_F_REQUEST | NLM_F_DUMP, body))
        datagrams: list[bytes] = []
        interrupted = False
        while True:
            data = self._sock.recv(1 << 20)
            datagrams.append(data)
            for offset, length, mtype, flags, mseq, _pid in messages(data):
                if mseq == seq:
                    interrupted |= bool(flags & NLM_F_DUMP_INTR)
                    if mtype == NLMSG_DONE:
                        return Dump(datagrams, seq), interrupted
                    if mtype == NLMSG_ERROR:
                        err = _error(data[offset : offset + length], flags)
                        if err is not None:
                            raise err


class Dump:
    """The replies of one dump, kept as the datagrams they came in (a few of ~32 KB,
    outside Python's small-object allocator). Iterating makes each message its own
    ``bytes`` only when it is reached, so one is alive at a time. Holding 15,000 of
    them at once (a full pass at 5,000 vxlan peers) left ~1 MB of the allocator's
    arenas pinned for good, a step up after the first full pass (issue 14)."""

    __slots__ = ("_datagrams", "_seq")

    def __init__(self, datagrams: list[bytes], seq: int) -> None:
        self._datagrams = datagrams
        self._seq = seq

    def __iter__(self) -> Iterator[bytes]:
        for data in self._datagrams:
            for offset, length, mtype, _flags, mseq, _pid in messages(data):
                if mseq != self._seq or mtype == NLMSG_ERROR:
                    continue
                if mtype == NLMSG_DONE:
                    return
                yield data[offset : offset + length]


def messages(data: bytes) -> Iterator[tuple[int, int, int, int, int, int]]:
    """The netlink messages of one datagram: (offset, length, type, flags, seq, port id)
    each (any netlink family: route, netfilter).

    :raises OSError: EBADMSG, a message runs past the datagram (never sent by a kernel).
    """
    offset, end = 0, len(data)
    while offset + 16 <= end:
        length, kind, flags, seq, pid = _HDR.unpack_from(data, offset)
        if length < 16 or offset + length > end:
            raise OSError(errno.EBADMSG, f"truncated netlink message ({length} bytes)")
        yield offset, length, kind, flags, seq, pid
        offset += (length + 3) & ~3


def _error(msg: bytes, flags: int) -> NetlinkFailure | None:
    code = -_I32.unpack_from(msg, 16)[0]
    if code == 0:
        return None
    text = ""
    if flags & NLM_F_ACK_TLVS:
        inner = 16 if flags & NLM_F_CAPPED else _U32.unpack_from(msg, 20)[0]
        raw = attrs(msg, 20 + ((inner + 3) & ~3)).get(_NLMSGERR_ATTR_MSG)
        if raw:
            text = raw.rstrip(b"\0").decode("utf-8", "replace")
    return NetlinkFailure(code, text)


# -- change notifications (multicast groups) -------------------------------------------

RTM_NEWLINK: Final = 16
RTM_DELLINK: Final = 17
RTMGRP_LINK: Final = 0x1
RTMGRP_NEIGH: Final = 0x4
RTMGRP_IPV4_ROUTE: Final = 0x40
RTMGRP_IPV6_ROUTE: Final = 0x400
IFF_UP: Final = 0x1
_IFINFOMSG = struct.Struct("=BxHiII")


@dataclass(frozen=True, slots=True)
class LinkChange:
    """A link was created, changed (``up`` is its admin state) or deleted."""

    index: int
    up: bool
    deleted: bool


@dataclass(frozen=True, slots=True)
class EntryChange:
    """A route, neighbour or FDB entry was added/replaced or (``deleted``) removed."""

    entry: Entry
    deleted: bool


KernelChange = LinkChange | EntryChange


_SO_ATTACH_FILTER: Final = 26
_BPF_LD_W_ABS: Final = 0x20
_BPF_LD_H_ABS: Final = 0x28
_BPF_LD_B_ABS: Final = 0x30
_BPF_JEQ_K: Final = 0x15
_BPF_JSET_K: Final = 0x45
#: ``ndm_state`` (host order) at offset 24: its low byte holds NUD_PERMANENT.
_NDM_STATE_LOW_BYTE: Final = 16 + 8 + (0 if sys.byteorder == "little" else 1)
_BPF_RET_K: Final = 0x06
_BPF_INSN = struct.Struct("=HBBI")


def _network_order(value: int, fmt: str) -> int:
    """``value`` as a classic BPF absolute load sees it: the kernel loads packet bytes
    big-endian, while netlink headers are in host order."""
    return int.from_bytes(struct.pack("=" + fmt, value), "big")


def echo_filter(skip_portids: Sequence[int], skip_protocol: int | None) -> bytes:
    """A classic BPF program for a notification socket that drops, inside the kernel,
    what :class:`RtnlMonitor`'s reader would drop anyway: messages whose ``nlmsg_pid``
    is one of ``skip_portids``, RTM_NEWROUTE with ``rtm_protocol == skip_protocol``, and
    RTM_NEWNEIGH of permanent FDB entries (the echoes of our own FDB writes, which the
    vxlan driver sends without a port id; see ``PeerNetwork._echo_of_own_write``). Every
    notification is its own datagram, so the header at offset 0 is the message's.

    Why in the kernel: measured with 15,000 vxlan entries written in one batch, reading
    and discarding 10,000 echoes in Python cost ~0.15 s of CPU and slowed the batch
    itself (the writer thread waits for the interpreter lock the reader holds).
    """
    # (code, jump-if-true label, jump-if-false label, k); labels: "drop", "accept", None
    insns: list[tuple[int, str | None, str | None, int]] = [(_BPF_LD_W_ABS, None, None, 12)]
    for pid in sorted(set(skip_portids)):
        insns.append((_BPF_JEQ_K, "drop", None, _network_order(pid, "I")))
    if skip_protocol is not None:
        insns += [
            (_BPF_LD_H_ABS, None, None, 4),  # nlmsg_type
            (_BPF_JEQ_K, None, "fdb", _network_order(RTM_NEWROUTE, "H")),
            (_BPF_LD_B_ABS, None, None, 16 + 5),  # rtm_protocol
            (_BPF_JEQ_K, "drop", None, skip_protocol),
        ]
    insns += [
        (_BPF_LD_H_ABS, None, None, 4),  # "fdb": nlmsg_type
        (_BPF_JEQ_K, None, "accept", _network_order(RTM_NEWNEIGH, "H")),
        (_BPF_LD_B_ABS, None, None, 16),  # ndm_family
        (_BPF_JEQ_K, None, "accept", AF_BRIDGE),
        (_BPF_LD_B_ABS, None, None, _NDM_STATE_LOW_BYTE),
        (_BPF_JSET_K, "drop", None, NUD_PERMANENT),
    ]
    fdb = len(insns) - 6
    labels = {"fdb": fdb, "accept": len(insns), "drop": len(insns) + 1}
    out = []
    for at, (code, if_true, if_false, k) in enumerate(insns):
        jt = labels[if_true] - at - 1 if if_true else 0
        jf = labels[if_false] - at - 1 if if_false else 0
        out.append(_BPF_INSN.pack(code, jt, jf, k))
    out.append(_BPF_INSN.pack(_BPF_RET_K, 0, 0, 0xFFFFFFFF))  # accept
    out.append(_BPF_INSN.pack(_BPF_RET_K, 0, 0, 0))  # drop
    return b"".join(out)


def attach_filter(sock: socket.socket, program: bytes) -> None:
    """``SO_ATTACH_FILTER``: the kernel copies the program, so the buffer may go."""
    count = len(program) // _BPF_INSN.size
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", count, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


class RtnlMonitor:
    """A non-blocking socket subscribed to the link, neighbour and route groups.

    Echoes of the agent's own writes are dropped (a cold start at 5,000 vxlan peers
    echoes 15,000 of them): notifications whose ``nlmsg_pid`` is one of
    ``skip_portids`` (the sockets that made the change; the kernel fills it in for
    routes and neighbours, not for vxlan FDB entries), and RTM_NEWROUTE of routes with
    protocol ``skip_protocol``. A socket filter (:func:`echo_filter`) drops them in the
    kernel, and permanent FDB entries written too; :meth:`read` checks the first two
    again, so a kernel that refuses the filter only costs CPU. Deletions by anybody
    else are always decoded.
    """

    #: Whether the kernel accepted :func:`echo_filter` on this socket.
    filtered: bool

    def __init__(
        self,
        rcvbuf: int,
        skip_protocol: int | None = None,
        skip_portids: frozenset[int] = frozenset(),
    ) -> None:
        groups = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK, 0
        )
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.bind((0, groups))
            try:
                attach_filter(sock, echo_filter(sorted(skip_portids), skip_protocol))
                self.filtered = True
            except OSError:
                self.filtered = False
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._skip = skip_protocol
        self._own = skip_portids

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()

    def read(self) -> list[KernelChange]:
        """Every notification queued now (empty when none).

        :raises OSError: ENOBUFS when the kernel dropped notifications because the
            receive buffer was full: the caller must assume anything changed.
        """
        out: list[KernelChange] = []
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return out
            for offset, length, kind, _flags, _seq, pid in messages(data):
                if pid == 0 or pid not in self._own:
                    change = self._decode(data[offset : offset + length], kind)
                    if change is not None:
                        out.append(change)

    def _decode(self, msg: bytes, kind: int) -> KernelChange | None:
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(msg, 16)
            return LinkChange(index, bool(flags & IFF_UP), kind == RTM_DELLINK)
        if kind in (RTM_NEWROUTE, RTM_DELROUTE):
            if kind == RTM_NEWROUTE and msg[16 + 5] == self._skip:  # rtm_protocol
                return None
            route = decode_route(msg)
            return None if route is None else EntryChange(route, kind == RTM_DELROUTE)
        if kind in (RTM_NEWNEIGH, RTM_DELNEIGH):
            neigh = decode_neigh(msg)
            return None if neigh is None else EntryChange(neigh, kind == RTM_DELNEIGH)
        return None


# -- links and addresses ---------------------------------------------------------------
# Few, small messages: kept here rather than on pyroute2, whose import alone costs the
# agent ~9 MB of RSS (about a quarter of its footprint; measured in bench/scale.py).

RTM_GETLINK: Final = 18
RTM_NEWADDR: Final = 20
RTM_DELADDR: Final = 21
RTM_GETADDR: Final = 22
IFLA_ADDRESS: Final = 1
IFLA_IFNAME: Final = 3
IFLA_MTU: Final = 4
IFLA_TXQLEN: Final = 13
IFLA_LINKINFO: Final = 18
IFLA_INFO_KIND: Final = 1
IFLA_INFO_DATA: Final = 2
IFLA_VXLAN_ID: Final = 1
IFLA_VXLAN_GROUP: Final = 2
IFLA_VXLAN_LINK: Final = 3
IFLA_VXLAN_LOCAL: Final = 4
IFLA_VXLAN_LEARNING: Final = 7
IFLA_VXLAN_L2MISS: Final = 13
IFLA_VXLAN_L3MISS: Final = 14
IFLA_VXLAN_PORT: Final = 15
IFLA_VXLAN_LOCAL6: Final = 17
IFLA_VXLAN_GBP: Final = 23
IFA_ADDRESS: Final = 1
IFA_LOCAL: Final = 2
IFA_FLAGS: Final = 8
_IFADDRMSG = struct.Struct("=BBBBi")
_U8 = struct.Struct("=B")
_BE16 = struct.Struct("!H")


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)


def link_get_request(*, index: int = 0, name: str | None = None) -> tuple[int, int, bytes]:
    body = _ifinfo(index)
    if name is not None:
        body += _attr(IFLA_IFNAME, name.encode() + b"\0")
    return RTM_GETLINK, NLM_F_REQUEST, body


def link_dump_request() -> tuple[int, bytes]:
    return RTM_GETLINK, _ifinfo()


def link_set_request(
    index: int,
    *,
    up: bool | None = None,
    mtu: int | None = None,
    mac: str | None = None,
    txqlen: int | None = None,
) -> tuple[int, int, bytes]:
    body = _ifinfo(index, IFF_UP if up else 0, IFF_UP if up is not None else 0)
    if txqlen is not None:
        body += _attr(IFLA_TXQLEN, _U32.pack(txqlen))
    if mtu is not None:
        body += _attr(IFLA_MTU, _U32.pack(mtu))
    if mac is not None:
        body += _attr(IFLA_ADDRESS, mac_bytes(mac))
    return RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, body


def link_delete_request(index: int) -> tuple[int, int, bytes]:
    return RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, _ifinfo(index)


def vxlan_create_request(
    name: str, spec: VxlanSpec, *, mtu: int | None, mac: str | None
) -> tuple[int, int, bytes]:
    data = _attr(IFLA_VXLAN_ID, _U32.pack(spec.vni))
    data += _attr(IFLA_VXLAN_PORT, _BE16.pack(spec.port))
    data += _attr(IFLA_VXLAN_LEARNING, _U8.pack(int(spec.learning)))
    data += _attr(IFLA_VXLAN_L2MISS, _U8.pack(int(spec.l2miss)))
    data += _attr(IFLA_VXLAN_L3MISS, _U8.pack(int(spec.l3miss)))
    if isinstance(spec.local, IPv6Address):
        data += _attr(IFLA_VXLAN_LOCAL6, spec.local.packed)
    elif spec.local is not None:
        data += _attr(IFLA_VXLAN_LOCAL, spec.local.packed)
    if spec.link is not None:
        data += _attr(IFLA_VXLAN_LINK, _U32.pack(spec.link))
    if spec.group is not None:
        data += _attr(IFLA_VXLAN_GROUP, spec.group.packed)
    if spec.gbp:
        data += _attr(IFLA_VXLAN_GBP, b"")
    return link_create_request(name, "vxlan", mtu=mtu, mac=mac, data=data)


def link_create_request(
    name: str, kind: str, *, mtu: int | None = None, mac: str | None = None, data: bytes = b""
) -> tuple[int, int, bytes]:
    """Create link ``name`` of ``kind`` (down), ``txqueuelen 0`` as Go flanneld's netlink
    library creates every link; ``data``: the kind's nested IFLA_INFO_DATA attributes."""
    info = _attr(IFLA_INFO_KIND, kind.encode())
    if data:
        info += _attr(IFLA_INFO_DATA | 0x8000, data)
    body = _ifinfo() + _attr(IFLA_IFNAME, name.encode() + b"\0")
    body += _attr(IFLA_TXQLEN, _U32.pack(0))
    if mtu is not None:
        body += _attr(IFLA_MTU, _U32.pack(mtu))
    if mac is not None:
        body += _attr(IFLA_ADDRESS, mac_bytes(mac))
    body += _attr(IFLA_LINKINFO | 0x8000, info)
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return RTM_NEWLINK, flags, body


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _u(raw: bytes | None) -> int:
    """An unsigned u8/u32 attribute in host order (0 when absent)."""
    if not raw:
        return 0
    return raw[0] if len(raw) == 1 else int(_U32.unpack_from(raw)[0])


def decode_link(msg: bytes) -> Link:
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(msg, 16)
    a = attrs(msg, 16 + _IFINFOMSG.size)
    info = attrs(a[IFLA_LINKINFO], 0) if IFLA_LINKINFO in a else {}
    kind = _text(info.get(IFLA_INFO_KIND))
    vxlan: VxlanSpec | None = None
    if kind == "vxlan" and IFLA_INFO_DATA in info:
        d = attrs(info[IFLA_INFO_DATA], 0)
        local, group = d.get(IFLA_VXLAN_LOCAL), d.get(IFLA_VXLAN_GROUP)
        local6 = d.get(IFLA_VXLAN_LOCAL6)
        local_ip: IPAddress | None = IPv4Address(local) if local and any(local) else None
        if local_ip is None and local6 and any(local6):
            local_ip = IPv6Address(local6)
        vxlan = VxlanSpec(
            vni=_u(d.get(IFLA_VXLAN_ID)),
            port=_BE16.unpack(d[IFLA_VXLAN_PORT])[0] if IFLA_VXLAN_PORT in d else 0,
            local=local_ip,
            link=_u(d.get(IFLA_VXLAN_LINK)) or None,
            learning=bool(_u(d.get(IFLA_VXLAN_LEARNING))),
            gbp=IFLA_VXLAN_GBP in d,
            group=IPv4Address(group) if group and any(group) else None,
            l2miss=bool(_u(d.get(IFLA_VXLAN_L2MISS))),
            l3miss=bool(_u(d.get(IFLA_VXLAN_L3MISS))),
        )
    mac = a.get(IFLA_ADDRESS)
    return Link(
        index=index,
        name=_text(a.get(IFLA_IFNAME)) or "",
        kind=kind,
        mtu=_u(a.get(IFLA_MTU)),
        mac=mac_text(mac) if mac else None,
        up=bool(flags & IFF_UP),
        vxlan=vxlan,
        txqlen=_u(a[IFLA_TXQLEN]) if IFLA_TXQLEN in a else None,
    )


def addr_dump_request(family: int, index: int) -> tuple[int, bytes]:
    return RTM_GETADDR, _IFADDRMSG.pack(family, 0, 0, 0, index)


def addr_request(
    index: int, ip: IPv4Address | IPv6Address, prefixlen: int, *, delete: bool
) -> tuple[int, int, bytes]:
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    body = _IFADDRMSG.pack(family, prefixlen, 0, 0, index)
    body += _attr(IFA_LOCAL, ip.packed) + _attr(IFA_ADDRESS, ip.packed)
    if delete:
        return RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK, body
    return RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, body


def decode_addr(msg: bytes) -> Address | None:
    family, prefixlen, flags, scope, index = _IFADDRMSG.unpack_from(msg, 16)
    a = attrs(msg, 16 + _IFADDRMSG.size)
    ip = _addr(a.get(IFA_LOCAL) or a.get(IFA_ADDRESS))
    if ip is None:
        return None
    if IFA_FLAGS in a:
        flags = _U32.unpack(a[IFA_FLAGS])[0]
    iface: IPv4Interface | IPv6Interface = (
        IPv4Interface((ip, prefixlen))
        if isinstance(ip, IPv4Address)
        else IPv6Interface((ip, prefixlen))
    )
    return Address(index=index, interface=iface, scope=scope, flags=flags)
