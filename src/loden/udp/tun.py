"""Opening the TUN device (``flannel%d``) and the virtio-net header it may carry.

flannel opens its TUN with ``IFF_TUN | IFF_NO_PI``: every read and write is one bare
IPv4 packet. Loden can add two flags, both invisible on the wire and to pods:

``IFF_VNET_HDR``
    Every read and write starts with a 10-byte ``virtio_net_hdr``. Writes may then be
    one super-packet built from many received segments (``GSO_TCPV4``), which the
    kernel takes as if its GRO had built it: one system call and one trip through the
    stack per 64 KB. A user-space proxy pays per system call, not per byte, so this is
    where most of its speed comes from.

``TUNSETOFFLOAD(CSUM | TSO4 | TSO_ECN)`` (``TunOptions.tso``, off by default)
    Reads may then be TCP super-packets of up to 64 KB with the TCP checksum left
    partial: one read instead of ~45, but every segment's checksum must then be
    computed in Python, and its floor is ``int.from_bytes`` over the payload (a C loop
    at ~1.5-2 ns per byte here, 2-3 us per 1420-byte segment) before any folding.
    Measured in the two-host benchmark (bench/dataplane_udp.py), the sender worker
    spends ~6-8 us user + ~1 us system per segment with TSO against ~3-4 us user +
    ~2 us system without it, and throughput was never higher with TSO, so Loden asks
    for no offloads: the kernel segments and checksums in C, one read per segment,
    and sends are still batched (``UDP_SEGMENT``).

``IFF_MULTI_QUEUE``
    Opening the same name again attaches another queue (another fd). Each worker
    process owns one; the kernel spreads flows over the queues and keeps a flow on the
    queue that last wrote it.

The device is not persistent: it disappears when the last queue fd is closed.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass

from loden.errors import DataplaneError

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8

IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

#: virtio_net_hdr flags / gso types.
VNET_F_NEEDS_CSUM = 1
VNET_F_DATA_VALID = 2
VNET_GSO_NONE = 0
VNET_GSO_TCPV4 = 1
VNET_GSO_ECN = 0x80

#: ``struct virtio_net_hdr`` (little-endian on every host Loden runs on):
#: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
VNET_HDR = struct.Struct("<BBHHHH")
VNET_HDR_LEN = VNET_HDR.size
#: The header of a plain, fully checksummed packet.
VNET_PLAIN = bytes(VNET_HDR_LEN)

_IFREQ = struct.Struct("16sH22x")


@dataclass(frozen=True, slots=True)
class TunOptions:
    """How to open the TUN; the defaults are Loden's fast path."""

    vnet_hdr: bool = True
    #: Let the kernel hand us TSO super-packets (we then segment and checksum in
    #: Python). Off: the kernel segments and checksums in C, one read per segment.
    tso: bool = False
    multi_queue: bool = True


def _flags(opts: TunOptions) -> int:
    flags = IFF_TUN | IFF_NO_PI
    if opts.vnet_hdr:
        flags |= IFF_VNET_HDR
    if opts.multi_queue:
        flags |= IFF_MULTI_QUEUE
    return flags


def open_queue(name: str, opts: TunOptions) -> tuple[int, str]:
    """Open one TUN fd (one queue) named ``name`` (a ``%d`` template is allowed).

    :returns: the non-blocking fd and the device name the kernel chose.
    :raises DataplaneError: /dev/net/tun cannot be opened or the ioctl fails.
    """
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise DataplaneError(
            "open",
            "/dev/net/tun",
            f"{exc.strerror}: is the tun driver available?",
            errno=exc.errno,
        ) from exc
    try:
        req = _IFREQ.pack(name.encode(), _flags(opts))
        res = fcntl.ioctl(fd, TUNSETIFF, req)
        if opts.vnet_hdr:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            offload = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN if opts.tso else 0
            fcntl.ioctl(fd, TUNSETOFFLOAD, offload)
    except OSError as exc:
        os.close(fd)
        raise DataplaneError(
            "TUNSETIFF",
            name,
            f"{exc.strerror} (is a device of another kind named so?)",
            errno=exc.errno,
        ) from exc
    actual = _IFREQ.unpack(res)[0].rstrip(b"\0").decode()
    return fd, actual


def open_tun(template: str, queues: int, opts: TunOptions) -> tuple[list[int], str]:
    """Create the device from ``template`` and attach ``queues`` queues to it.

    Without ``multi_queue`` only one queue can exist. On failure every fd opened so far
    is closed (and the device vanishes with them).

    :raises DataplaneError: see :func:`open_queue`.
    """
    if queues < 1 or (queues > 1 and not opts.multi_queue):
        raise DataplaneError("open", template, f"{queues} queues need IFF_MULTI_QUEUE")
    fd, name = open_queue(template, opts)
    fds = [fd]
    try:
        for _ in range(queues - 1):
            fds.append(open_queue(name, opts)[0])
    except DataplaneError:
        for opened in fds:
            os.close(opened)
        raise
    return fds, name
