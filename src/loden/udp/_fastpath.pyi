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
def tun_to_wire(
    tun: int,
    sock: int,
    vnet_len: int,
    groups: list[tuple[int, dict[int, int]]],
    port: int,
    budget: int,
    /,
) -> tuple[int, int, int, int, int, int, int, int, bytes | None]: ...
def wire_to_tun(
    sock: int, tun: int, vnet_len: int, budget: int, max_bytes: int, /
) -> tuple[int, int, int, int, int, int, int, tuple[bytes, int] | None]: ...
