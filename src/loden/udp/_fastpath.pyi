"""Types of the optional C extension built from _fastpath.c.

Not reentrant: one caller per process at a time (static buffers; see the C file's
header). A call made while another runs raises RuntimeError.
"""

from typing import ClassVar

from loden.udp.csum import BytesLike

def segment_tcp4(pkt: memoryview, mss: int, /) -> tuple[list[BytesLike], int, int] | None: ...
def gro_scan(
    data: BytesLike,
    mv: memoryview,
    off: int,
    n: int,
    seg: int,
    first: BytesLike,
    hl: int,
    nseq: int,
    mss: int,
    total: int,
    max_super: int,
    payloads: list[BytesLike],
    /,
) -> tuple[int, int, int, int, int, int]: ...

class Counters(tuple[int, ...]):
    """What one call of the C loops did; the names are the worker's counter names."""

    __match_args__: ClassVar[tuple[str, ...]]
    n_fields: ClassVar[int]
    tun_reads: int
    tun_bytes: int
    bad_from_tun: int
    ttl_drops: int
    tx_datagrams: int
    tx_sends: int
    tx_errors: int
    rx_calls: int
    rx_bytes: int
    rx_packets: int
    rx_dropped: int
    tun_writes: int
    tun_write_errors: int

Counts = Counters
Groups = list[tuple[int, dict[int, int]]]

def tun_to_wire(
    tun: int, sock: int, vnet_len: int, groups: Groups, port: int, budget: int, /
) -> tuple[Counts, int, bytes | None]: ...
def wire_to_tun(
    sock: int, tun: int, vnet_len: int, budget: int, max_bytes: int, /
) -> tuple[Counts, int, tuple[bytes, int] | None]: ...
def serve(
    epfd: int,
    ctl: int,
    tun: int,
    sock: int,
    vnet_len: int,
    groups: Groups,
    port: int,
    budget: int,
    max_bytes: int,
    /,
) -> tuple[Counts, int, bytes | tuple[bytes, int] | int | None]: ...
