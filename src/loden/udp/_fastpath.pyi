"""Types of the optional C extension built from _fastpath.c."""

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

#: tun_reads, tun_bytes, bad_from_tun, ttl_drops, tx_datagrams, tx_sends, tx_errors,
#: rx_calls, rx_bytes, rx_packets, rx_dropped, tun_writes, tun_write_errors
Counts = tuple[int, int, int, int, int, int, int, int, int, int, int, int, int]
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
