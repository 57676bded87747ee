"""The optional C loops (``_fastpath.c``), or None where they could not be built.

One place decides, so the sender, the receiver and the worker never disagree about
which loops run. setup.py builds the extension with ``optional=True``: without a C
compiler the install succeeds and every caller falls back to its Python loop (same
bytes on the wire, about a third of the throughput).
"""

from __future__ import annotations

try:
    from loden.udp import _fastpath as native
except ImportError:  # pragma: no cover - depends on the build machine
    # Typed as the module (its signatures come from _fastpath.pyi); callers test for None.
    native = None  # type: ignore[assignment]

__all__ = ["native"]
