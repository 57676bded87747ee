"""What the halves of a udp worker share (:mod:`loden.udp.tx`, :mod:`loden.udp.rx`).

:class:`loden.udp.worker.Worker` is built from the two halves; each half is written
against :class:`WorkerState`, the state the worker sets up and the two methods it
provides (adding up the C loops' counters, giving up a TUN queue that failed).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from loden.udp.peers import PeerTable

if TYPE_CHECKING:
    from loden.udp._fastpath import Counters

#: Packets (TUN reads or socket receives) handled per wake-up before polling again.
BUDGET = 64


class WorkerState:
    """The worker's state, as the halves see it."""

    tun: int | None
    sock: socket.socket
    vnet: bool
    #: Use the C loops for plain packets (False: the Python ones).
    fast: bool
    table: PeerTable
    stats: dict[str, int]

    def _add(self, counts: Counters) -> None:
        raise NotImplementedError

    def _tun_lost(self, exc: OSError) -> None:
        raise NotImplementedError
