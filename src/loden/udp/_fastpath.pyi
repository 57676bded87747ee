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
