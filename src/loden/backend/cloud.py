"""What the cloud-route backends (aws-vpc, gce) share: retry pacing and the simple network.

Both program the cloud's route table instead of the kernel. Unlike flanneld (which
exits on the first cloud error after its lease is taken and leaves the lease behind),
every cloud call runs inside a reconcile pass: a failing pass is reported through
:class:`ReconcileReport` ``errors`` (so ``/healthz`` says why after three in a row) and
retried with exponential backoff, and a later pass recovers without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from ipaddress import IPv4Network

from loden.backend.base import ReconcileReport
from loden.model.lease import EventKind, Lease, LeaseEvent

log = logging.getLogger(__name__)

#: Backoff between failed passes: 1, 2, 4, ... seconds, at most this.
MAX_BACKOFF = 20.0

#: A full pass removes an owned route whose subnet no known lease holds only once it was
#: found so for this long (at the next pass, 10 s later): a node that just joined writes
#: its route right after publishing its lease, and a peer listing the routes before that
#: lease reached its watch would otherwise delete the new route (seen in the lab).
STALE_GRACE_SECONDS = 5.0

#: Is an owned route to this subnet stale, to be removed now?
Stale = Callable[[IPv4Network], bool]
#: ``run_pass(stale)``: one pass; the own route, and owned routes ``stale`` names removed.
Pass = Callable[[Stale], Awaitable[ReconcileReport]]


class _StaleAfterGrace:
    """The full pass's :data:`Stale`: a route no lease holds is stale once it was found
    so in this pass and in one at least :data:`STALE_GRACE_SECONDS` before. The live
    subnets are read when the first route is looked at, after the pass listed the
    routes, so a lease that arrived meanwhile still counts."""

    def __init__(
        self,
        live: Callable[[], set[IPv4Network]],
        earlier: Mapping[IPv4Network, float],
        found: dict[IPv4Network, float],
    ) -> None:
        self._read_live = live
        self._live: set[IPv4Network] | None = None
        self._earlier = earlier
        #: Filled for the next pass: each leaseless route, and when it was first seen.
        self._found = found

    def __call__(self, net: IPv4Network) -> bool:
        if self._live is None:
            self._live = self._read_live()
        if net in self._live:
            return False
        now = time.monotonic()
        first = self._found[net] = self._earlier.get(net, now)
        return now - first >= STALE_GRACE_SECONDS


class CloudRouteNetwork:
    """A :class:`~loden.backend.base.Network` whose data plane is a cloud route table.

    ``run_pass(stale)`` does one level-triggered pass: the own route, and removal of the
    owned routes ``stale`` names. After an event batch those are the subnets it removed;
    in a full pass, those no lease held in this pass and in one at least
    :data:`STALE_GRACE_SECONDS` before (checked against the peers known when the route
    is looked at, not when the pass began).
    """

    def __init__(self, lease: Lease, mtu: int, run_pass: Pass, what: str) -> None:
        self._lease = lease
        self._mtu = mtu
        self._run_pass = run_pass
        self._what = what
        self._lock = asyncio.Lock()
        self._failures = 0
        self._retry_at = 0.0
        self._last_error = ""
        self._peers: dict[str, Lease] = {}
        #: Owned routes found without a lease in a full pass: when that was first seen.
        self._suspects: dict[IPv4Network, float] = {}

    @property
    def lease(self) -> Lease:
        return self._lease

    @property
    def mtu(self) -> int:
        return self._mtu

    async def apply(self, events: Sequence[LeaseEvent]) -> ReconcileReport:
        for event in events:
            if event.kind is EventKind.ADDED:
                self._peers[event.lease.key] = event.lease
            else:
                self._peers.pop(event.lease.key, None)
        gone = frozenset(e.lease.subnet for e in events if e.kind is EventKind.REMOVED)
        if not gone:
            # Each node programs only its own route: a new peer changes nothing here,
            # but a pass that is failing must stay reported as failing.
            return self._still_failing()
        # Only the subnets these events removed: a peer set built from events alone is
        # not proof that any other route is stale.
        return await self._guarded(lambda net: net in gone and net not in self._live())

    async def reconcile(self, peers: Mapping[str, Lease]) -> ReconcileReport:
        self._peers = dict(peers)
        earlier, self._suspects = self._suspects, {}
        return await self._guarded(_StaleAfterGrace(self._live, earlier, self._suspects))

    def _live(self) -> set[IPv4Network]:
        """The subnets of the peers known now (``apply`` keeps them current)."""
        return {lease.subnet for lease in self._peers.values()}

    async def aclose(self) -> None:
        return None

    def _still_failing(self) -> ReconcileReport:
        if self._failures:
            return ReconcileReport(errors=(self._last_error,))
        return ReconcileReport()

    async def _guarded(self, stale: Stale) -> ReconcileReport:
        async with self._lock:
            now = time.monotonic()
            if self._failures and now < self._retry_at:
                left = self._retry_at - now
                return ReconcileReport(
                    errors=(f"{self._last_error} (next attempt in {left:.0f}s)",)
                )
            try:
                report = await self._run_pass(stale)
            except Exception as exc:
                report = ReconcileReport(errors=(str(exc) or type(exc).__name__,))
            if report.errors:
                self._failures += 1
                delay = min(MAX_BACKOFF, 2.0 ** (self._failures - 1))
                self._retry_at = time.monotonic() + delay
                self._last_error = report.errors[0]
                log.warning(
                    "%s: cloud route pass failed (%d in a row), retrying in %.0fs: %s",
                    self._what,
                    self._failures,
                    delay,
                    self._last_error,
                )
            elif self._failures:
                log.info(
                    "%s: cloud routes repaired after %d failed passes", self._what, self._failures
                )
                self._failures = 0
            return report
