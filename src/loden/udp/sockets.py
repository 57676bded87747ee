"""The UDP sockets of the data path: one per worker, all bound to ``IfaceAddr:Port``.

flannel binds one socket to the external interface's address (not 0.0.0.0) and the
configured port (8285); Loden does the same, once per worker, with ``SO_REUSEPORT``.
Each socket gets:

* ``UDP_GRO``: the kernel may hand over many datagrams of one flow in one ``recvmsg``
  (a control message gives the datagram size). Datagrams sent with ``UDP_SEGMENT``
  usually arrive like that, even across veth.
* large buffers (``SO_RCVBUFFORCE``/``SO_SNDBUFFORCE`` as root): a Python worker
  stalls for milliseconds at times, and the default 208 KB receive buffer then
  overflows (flannel's C proxy drops there under load).
* with several workers, a classic BPF program on the reuseport group that picks the
  socket from a hash of the *inner* addresses and ports (the datagram payload). The
  kernel's default hash uses the outer 4-tuple, which is the same for everything one
  peer sends (``peer:8285 -> us:8285``), so all of it would land on one worker.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import struct
from ipaddress import IPv4Address

from loden.errors import DataplaneError

log = logging.getLogger(__name__)

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
SO_ATTACH_REUSEPORT_CBPF = 51

#: Socket buffer size asked for (bytes).
BUFFER_BYTES = 8 << 20


def _bpf(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k)


def steering_program(nsockets: int) -> bytes:
    """cBPF: socket index = hash(inner saddr, daddr, first 4 L4 bytes) % ``nsockets``.

    For a reuseport group the program sees the datagram from its payload on: the inner
    IPv4 header. A load past the end makes the program return 0 (socket 0).
    """
    ld_w_abs, ldx_msh, ld_w_ind = 0x20, 0xB1, 0x40
    tax, st, ldx_mem = 0x07, 0x02, 0x61
    alu_xor_x, alu_rsh_k, alu_mod_k, ret_a = 0xAC, 0x74, 0x94, 0x16
    insns = [
        _bpf(ld_w_abs, 0, 0, 12),  # A = inner saddr
        _bpf(tax, 0, 0, 0),  # X = A
        _bpf(ld_w_abs, 0, 0, 16),  # A = inner daddr
        _bpf(alu_xor_x, 0, 0, 0),  # A ^= X
        _bpf(st, 0, 0, 0),  # M[0] = A
        _bpf(ldx_msh, 0, 0, 0),  # X = 4 * (P[0] & 0xf): the inner header length
        _bpf(ld_w_ind, 0, 0, 0),  # A = P[X:X+4]: source and destination ports
        _bpf(ldx_mem, 0, 0, 0),  # X = M[0]
        _bpf(alu_xor_x, 0, 0, 0),  # A ^= X
        _bpf(tax, 0, 0, 0),  # X = A
        _bpf(alu_rsh_k, 0, 0, 16),  # A >>= 16
        _bpf(alu_xor_x, 0, 0, 0),  # A ^= X (fold the high half in)
        _bpf(tax, 0, 0, 0),  # X = A
        _bpf(alu_rsh_k, 0, 0, 8),  # A >>= 8
        _bpf(alu_xor_x, 0, 0, 0),  # A ^= X
        _bpf(alu_mod_k, 0, 0, nsockets),  # A %= n
        _bpf(ret_a, 0, 0, 0),
    ]
    return b"".join(insns)


def attach_steering(sock: socket.socket, nsockets: int) -> None:
    """Attach :func:`steering_program` to ``sock``'s reuseport group."""
    code = steering_program(nsockets)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(code) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def _set_buffers(sock: socket.socket, size: int) -> None:
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


def open_sockets(
    addr: IPv4Address, port: int, count: int, *, gro: bool = True
) -> list[socket.socket]:
    """``count`` UDP sockets bound to ``addr:port`` (SO_REUSEPORT when count > 1).

    :raises DataplaneError: the address cannot be bound (in use, not local).
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            _set_buffers(sock, BUFFER_BYTES)
            if gro:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
            sock.bind((str(addr), port))
        if count > 1:
            attach_steering(socks[0], count)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise DataplaneError(
            "bind",
            f"udp {addr}:{port}",
            f"{exc.strerror or exc}: is another flanneld or Loden running on this port?",
            errno=exc.errno,
        ) from exc
    return socks
