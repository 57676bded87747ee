"""VXLAN checksum corruption (pain point 5): UDP checksum errors rising while vxlan
traffic flows, and the ``TxChecksumOffload`` setting that decides it.

Sampled over ``-sample-seconds``: ``Udp: InCsumErrors`` in /proc/net/snmp and the
packet counters of ``flannel.<VNI>``. A rising error count with traffic on the device is
the signature of the kernel bug (tx checksum offload on a vxlan device whose packets
then pass a NAT, e.g. a NodePort): packets are dropped and TCP waits for retransmits.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import socket
import struct
from pathlib import Path

from loden.doctor.base import Context, Finding
from loden.status.expected import vxlan_device

_SIOCETHTOOL = 0x8946
_ETHTOOL_GTXCSUM = 0x16


def udp_csum_errors() -> int | None:
    try:
        lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()]
    except OSError:
        return None
    rows = [line for line in lines if line and line[0] == "Udp:"]
    if len(rows) < 2 or "InCsumErrors" not in rows[0]:
        return None
    return int(rows[1][rows[0].index("InCsumErrors")])


def device_packets(name: str) -> int | None:
    try:
        base = Path(f"/sys/class/net/{name}/statistics")
        return int((base / "rx_packets").read_text()) + int((base / "tx_packets").read_text())
    except (OSError, ValueError):
        return None


def tx_checksum_on(name: str) -> bool | None:
    """``ethtool -k NAME`` tx-checksumming, through the ioctl (None: unknown)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            value = ctypes.create_string_buffer(struct.pack("=II", _ETHTOOL_GTXCSUM, 0), 8)
            ifreq = struct.pack("16sP", name.encode(), ctypes.addressof(value)).ljust(40, b"\0")
            fcntl.ioctl(sock.fileno(), _SIOCETHTOOL, ifreq)
            return bool(struct.unpack("=II", value.raw)[1])
    except OSError:
        return None


async def check_vxlan_checksum(ctx: Context) -> list[Finding]:
    config = ctx.config
    if config is None or config.backend_type != "vxlan":
        return []
    name = vxlan_device(config)
    if ctx.link(name) is None:
        return []
    errors0, packets0 = udp_csum_errors(), device_packets(name)
    await asyncio.sleep(ctx.sample_seconds)
    errors1, packets1 = udp_csum_errors(), device_packets(name)
    if None in (errors0, errors1, packets0, packets1):
        return []
    assert errors0 is not None and errors1 is not None
    assert packets0 is not None and packets1 is not None
    rising, traffic = errors1 - errors0, packets1 - packets0
    if rising <= 0 or traffic <= 0:
        return []
    offload = tx_checksum_on(name)
    state = {True: "on", False: "off", None: "unknown"}[offload]
    if offload:
        fix = (
            f'set "TxChecksumOffload": false in the Backend of the network config and '
            f"restart the agents (now: ethtool -K {name} tx off); it costs vxlan "
            "throughput, so do it only where this shows"
        )
    else:
        fix = (
            f"tx checksum offload is already off on {name} here: the bad packets come from "
            "a peer; run `loden doctor` on the nodes that send them and turn it off there "
            '("TxChecksumOffload": false)'
        )
    return [
        Finding(
            "checksum/vxlan",
            "UDP packets arrive with bad checksums while vxlan traffic flows: the vxlan "
            "checksum-offload bug (63 s / 3 s delays to Services)",
            f"Udp InCsumErrors +{rising} and {name} +{traffic} packets in "
            f"{ctx.sample_seconds:g}s; tx checksum offload on {name}: {state}",
            fix,
        )
    ]
