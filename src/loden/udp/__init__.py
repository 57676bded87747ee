"""The udp backend's data path: flannel's wire format, moved by Python worker processes.

What the wire must look like (spec §6.3, byte-compatible with flannel's C proxy and
Go flanneld): UDP from ``IfaceAddr:8285`` to ``PeerPublicIP:8285``, every datagram
carrying exactly one raw inner IPv4 packet (no framing), at most MTU + 28 bytes on the
wire, TTL decremented once by the sender and once by the receiver, valid IP and TCP/UDP
checksums. Datagrams shorter than 20 bytes and packets whose TTL would reach 0 are
dropped; a destination in the Network with no lease gets an ICMP Net Unreachable.

Where the speed comes from: a Python proxy pays per system call, not per byte, so the
design batches system calls without changing a byte on the wire:

* sender (:mod:`.tx`, :mod:`.gso`): the TUN gives 64 KB TCP super-packets
  (``IFF_VNET_HDR`` + ``TUNSETOFFLOAD``), cut into MSS segments with complete checksums;
  runs of equal-size datagrams to one peer leave in one ``sendmsg`` with a
  ``UDP_SEGMENT`` cmsg (the kernel cuts them back into separate datagrams). Segmenting
  is a C loop (``_fastpath.c``, built by setup.py); without a compiler the Python loop
  is used and the TUN gives one kernel-checksummed segment per read instead, which is
  cheaper than a Python checksum (2-3 µs per segment);
* receiver (:mod:`.rx`, :mod:`.gro`): ``UDP_GRO`` returns many datagrams per ``recvmsg``; in-order
  segments of one TCP flow (checked by a C loop when built) are glued into one
  super-packet written with one ``writev``
  and a virtio-net header (``GSO_TCPV4`` + ``NEEDS_CSUM``), so the kernel's stack runs
  once per 64 KB instead of once per segment;
* :mod:`.engine`: one worker process per core (processes, not threads: the GIL),
  each with its own multi-queue TUN fd and ``SO_REUSEPORT`` socket, a cBPF program
  spreading inner flows over the sockets (:mod:`.sockets`); peer-table updates reach
  the workers over a control socket without pausing them (:mod:`.peers`).

The per-packet work (segmenting, checksums, run detection, and the whole event loop for
plain packets: epoll, read, route, TTL, sendmsg / recvmsg, writev) is C in
``_fastpath.c`` when a compiler was there at install time; Python decides the rest
(control messages, ICMP replies, TCP coalescing). Measured with bench/dataplane.py on
this 2-core machine, same run: TCP 0.12-0.16 of the underlay, 3.6-4x a one-packet-per-
call C forwarder of flannel's proxy design (bench/c_proxy.c) and 5-6x a naive Python
loop; 64-byte UDP 1.2-1.3x the C forwarder. Without the C loops: TCP ~0.055.

Modules: :mod:`.csum` (ones'-complement sums), :mod:`.packet` (IPv4 rules, TTL, ICMP),
:mod:`.tun`, :mod:`.sockets`, :mod:`.peers`, :mod:`.gso`, :mod:`.gro`, :mod:`.tx` and
:mod:`.rx` (a worker's two halves, over :mod:`.parts`), :mod:`.worker` and
:mod:`.engine`. Packet builders for tests and benchmarks: tests/fixtures/frames.py.
"""
