"""Keeping the agent's resident memory small (issue 14: <= 40 MB at 5,000 peers).

The agent's big allocations are transient: a 5,000-lease store snapshot, a
15,000-entry kernel dump, the batch of changes a reconcile writes. Python frees them,
but glibc keeps freed pages unless told otherwise. What is left is pymalloc's: arenas
that still hold one live object stay resident (bench/scale.py shows ~5 MB of that after
a full pass at 5,000 peers).
"""

from __future__ import annotations

import ctypes
from typing import Any

_libc: Any = None


def _c() -> Any:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None)
            _libc.mallopt, _libc.malloc_trim  # noqa: B018 (glibc only; musl has neither)
        except (OSError, AttributeError):
            _libc = False
    return _libc


def tune_malloc() -> None:
    """glibc malloc settings for a long-running, mostly idle agent.

    One arena: the netlink worker threads would otherwise each get their own, and
    memory freed there is rarely given back. A fixed mmap threshold: glibc raises it
    after every large free, so the 1 MiB netlink receive buffers would move into the
    heap and fragment it.
    """
    libc = _c()
    if libc:
        libc.mallopt(-8, 1)  # M_ARENA_MAX
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixed: no dynamic growth)


def release() -> None:
    """Give memory freed after a big pass back to the kernel (a few ms at 50 MB; no
    ``gc.collect()``: ~20 ms at 5,000 peers, and the agent makes no cycles of note)."""
    libc = _c()
    if libc:
        libc.malloc_trim(0)
