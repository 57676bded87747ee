"""The peer table: which node (public IP) owns the subnet a destination falls in.

flannel's C proxy keeps a list and searches it linearly, moving hits to the front.
Here the table is a tuple of ``(mask, {network: (ip, port)})`` groups, one per prefix
length, longest first; all leases of one Network share ``SubnetLen``, so a lookup is
normally one ``&`` and one dict probe whatever the number of peers.

Workers never mutate a table: the parent sends a complete new one over the control
socket (in chunks, see :func:`encode`) and the worker swaps its reference in one
assignment between two packets, so the data path never stops for an update.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from loden.errors import ParseError

_ENTRY = struct.Struct("!IBI")
#: Control-message entries per chunk (keeps SEQPACKET messages well under 64 KB).
CHUNK = 4096


@dataclass(frozen=True, slots=True)
class PeerTable:
    """Immutable subnet -> ``(peer public IP, port)`` map with one probe per prefix length."""

    port: int
    groups: tuple[tuple[int, dict[int, tuple[str, int]]], ...] = ()
    entries: tuple[tuple[IPv4Network, IPv4Address], ...] = field(default=(), compare=False)
    #: The same groups for the C loop (``_fastpath.tun_to_wire``): network -> public IP
    #: as an int (the port is ``port`` for every peer).
    cgroups: list[tuple[int, dict[int, int]]] = field(default_factory=list, compare=False)

    @classmethod
    def build(cls, entries: Iterable[tuple[IPv4Network, IPv4Address]], port: int) -> PeerTable:
        """A table from ``(subnet, public IP)`` pairs; a later pair for a subnet wins."""
        by_net: dict[IPv4Network, IPv4Address] = {}
        for net, ip in entries:
            by_net[net] = ip
        groups: dict[int, dict[int, tuple[str, int]]] = {}
        for net, ip in by_net.items():
            groups.setdefault(net.prefixlen, {})[int(net.network_address)] = (str(ip), port)
        ordered = tuple(
            ((0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF, groups[plen])
            for plen in sorted(groups, reverse=True)
        )
        cgroups = [
            (mask, {net: int(IPv4Address(addr[0])) for net, addr in nets.items()})
            for mask, nets in ordered
        ]
        return cls(
            port=port, groups=ordered, entries=tuple(sorted(by_net.items())), cgroups=cgroups
        )

    def lookup(self, dst: int) -> tuple[str, int] | None:
        """The peer for destination address ``dst`` (an int), or None."""
        for mask, nets in self.groups:
            peer = nets.get(dst & mask)
            if peer is not None:
                return peer
        return None

    def __len__(self) -> int:
        return len(self.entries)


def encode(table: PeerTable) -> Iterator[bytes]:
    """Control messages carrying ``table``: ``b"P"`` + final flag + packed entries."""
    entries = table.entries
    if not entries:
        yield b"P\x01"
        return
    for start in range(0, len(entries), CHUNK):
        chunk = entries[start : start + CHUNK]
        final = b"\x01" if start + CHUNK >= len(entries) else b"\x00"
        body = b"".join(
            _ENTRY.pack(int(net.network_address), net.prefixlen, int(ip)) for net, ip in chunk
        )
        yield b"P" + final + body


def decode(message: bytes) -> tuple[bool, list[tuple[IPv4Network, IPv4Address]]]:
    """Parse one ``b"P"`` message: (is it the final chunk, its entries).

    :raises ParseError: the message is not a well-formed peer chunk.
    """
    if len(message) < 2 or message[:1] != b"P" or (len(message) - 2) % _ENTRY.size:
        raise ParseError(f"malformed peer-table message of {len(message)} bytes from the agent")
    out: list[tuple[IPv4Network, IPv4Address]] = []
    for net, plen, ip in _ENTRY.iter_unpack(message[2:]):
        if plen > 32:
            raise ParseError(f"peer-table entry with prefix length {plen} from the agent")
        out.append((IPv4Network((net, plen), strict=False), IPv4Address(ip)))
    return message[1] == 1, out
