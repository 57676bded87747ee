"""Shared machinery of the kernel backends (vxlan, host-gw): per-peer entries, diffing.

Each peer lease maps to a small set of kernel entries (host-gw: one route; vxlan: a
neighbour, an FDB entry and a route, or one direct route). :class:`PeerNetwork` keeps
the entries it last programmed per lease key and offers the two operations of
:class:`loden.backend.base.Network`:

* ``reconcile(peers)`` is level-triggered: build the complete desired set, dump the
  kernel once (routes of the main table, neighbours and FDB of the device), and send
  one batch with exactly the difference. An unchanged node costs three dumps and no
  writes, which is what makes a periodic resync of 5,000 peers cheap (pain points 6, 9).
* ``apply(events)`` is the fast path: only the entries of the peers in the batch are
  rewritten, computed from what this object last programmed for them, so the result is
  the state ``reconcile`` would produce.

Ownership (pain point 8: remove stale entries, never someone else's):

* routes with protocol :data:`~loden.kernel.netlink.RTPROT_LODEN` (76), unicast, whose
  destination lies inside the flannel ``Network`` (so an agent's blackhole route for
  the whole Network, or anybody's route elsewhere, is never ours to delete);
* a route identical to a desired one but with another protocol (left by Go flanneld,
  which uses ``proto boot``, or added by hand) is *adopted*: replaced in place with
  protocol 76, which the kernel does atomically, so traffic never stops;
* backends may declare more legacy shapes as theirs (vxlan: flanneld's exact
  ``<subnet> via <subnet>.0 dev flannel.N onlink proto boot``);
* every permanent neighbour and FDB entry on the backend's own device.

Changes are ordered so a peer never loses its path while being rewritten: stale routes
go first, then neighbours/FDB are written, then routes, then stale neighbours/FDB.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from ipaddress import IPv4Network

from loden.backend.base import ExternalInterface, ReconcileReport
from loden.kernel.netlink import (
    RTPROT_LODEN,
    BatchResult,
    Change,
    FdbEntry,
    IPAddress,
    Neighbour,
    Netlink,
    Route,
    RouteLookup,
)
from loden.model.config import NetworkConfig
from loden.model.lease import EventKind, Lease, LeaseEvent

log = logging.getLogger(__name__)

Entry = Route | Neighbour | FdbEntry
Key = tuple[object, ...]
_RTN_UNICAST = 1


def entry_key(entry: Entry) -> Key:
    """Identity of an entry in the kernel: a replace with the same key overwrites it."""
    if isinstance(entry, Route):
        return ("route", entry.dst, entry.table, entry.priority)
    if isinstance(entry, Neighbour):
        return ("neigh", entry.ifindex, entry.dst)
    return ("fdb", entry.ifindex, entry.lladdr)


def in_sync(want: Entry, have: Entry) -> bool:
    """Does the kernel entry ``have`` already do what ``want`` asks (protocol included)?"""
    if isinstance(want, Route):
        return isinstance(have, Route) and want.same_path(have) and have.protocol == RTPROT_LODEN
    if isinstance(want, Neighbour):
        return isinstance(have, Neighbour) and have.lladdr == want.lladdr and have.permanent
    return isinstance(have, FdbEntry) and have.dst == want.dst and have.permanent


def _rank(change: Change) -> int:
    is_route = isinstance(change.entry, Route)
    if change.delete:
        return 0 if is_route else 3
    return 2 if is_route else 1


def ordered(changes: Iterable[Change]) -> list[Change]:
    """Stale routes, then neighbours/FDB, then routes, then stale neighbours/FDB."""
    return sorted(changes, key=_rank)


def diff(
    desired: Iterable[Entry], kernel: Iterable[Entry], owned: Callable[[Entry], bool]
) -> list[Change]:
    """Changes that turn ``kernel`` into ``desired`` touching only ``owned`` extras."""
    have: dict[Key, list[Entry]] = {}
    for entry in kernel:
        have.setdefault(entry_key(entry), []).append(entry)
    changes: list[Change] = []
    wanted: set[Key] = set()
    matched: set[int] = set()
    for want in desired:
        key = entry_key(want)
        wanted.add(key)
        found = False
        for entry in have.get(key, ()):
            if in_sync(want, entry):
                matched.add(id(entry))
                found = True
        if not found:
            changes.append(Change(want))
    for key, entries in have.items():
        for entry in entries:
            if id(entry) in matched:
                continue
            if key in wanted and not isinstance(entry, FdbEntry):
                continue  # the replace above overwrites it (an FDB key may hold more remotes)
            if owned(entry):
                changes.append(Change(entry, delete=True))
    return ordered(changes)


def transition(old: Sequence[Entry], new: Sequence[Entry]) -> list[Change]:
    """Changes from one peer's old entries to its new ones (the ``apply`` path)."""
    new_keys = {entry_key(e) for e in new}
    changes = [Change(e, delete=True) for e in old if entry_key(e) not in new_keys]
    changes += [Change(e) for e in new]
    return ordered(changes)


def owned_route(route: Route, config: NetworkConfig, own: IPv4Network) -> bool:
    """Is ``route`` one Loden installed for a peer (see the module docstring)?"""
    if route.protocol != RTPROT_LODEN or route.type != _RTN_UNICAST:
        return False
    if not isinstance(route.dst, IPv4Network) or route.dst == own:
        return False
    net = config.network
    return net is None or (route.dst.subnet_of(net) and route.dst != net)


def adopted(changes: Sequence[Change], kernel: Iterable[Entry]) -> int:
    """How many route replaces only change the protocol of an identical route."""
    index = {entry_key(e): e for e in kernel if isinstance(e, Route)}
    count = 0
    for change in changes:
        old = index.get(entry_key(change.entry))
        if not change.delete and isinstance(change.entry, Route) and old is not None:
            count += change.entry.same_path(old)
    return count


def report(
    result: BatchResult, changes: Sequence[Change], skipped: Iterable[str]
) -> ReconcileReport:
    """``skipped``: why some peers got no entries (see :class:`ReconcileReport`)."""
    failed = {id(change) for change, _ in result.failed}
    added = sum(1 for c in changes if not c.delete and id(c) not in failed)
    removed = sum(1 for c in changes if c.delete and id(c) not in failed)
    errs = tuple(str(err) for _, err in result.failed)
    return ReconcileReport(added=added, removed=removed, errors=errs, skipped=tuple(skipped))


class PeerNetwork:
    """Base of the per-peer kernel backends; subclasses say what a peer needs."""

    backend_type = ""

    def __init__(
        self, nl: Netlink, lease: Lease, config: NetworkConfig, ext: ExternalInterface
    ) -> None:
        self._nl = nl
        self._lease = lease
        self._config = config
        self._ext = ext
        self._entries: dict[str, tuple[Entry, ...]] = {}
        #: The accepted peer leases as of the last reconcile plus applied events: what
        #: ``apply`` replays in full when the base (the vxlan device) had to be recreated.
        self._peers: dict[str, Lease] = {}
        self._lock = asyncio.Lock()
        self._warned: set[str] = set()
        #: Route lookups of peer public IPs, valid while the routes that are not ours
        #: (connected subnets, gateways: what decides how an underlay IP is reached)
        #: stay the same. One lookup costs a netlink round trip; 5,000 cost ~0.2 s.
        self._lookup_cache: dict[IPAddress, RouteLookup | None] = {}
        self._lookup_basis: frozenset[tuple[object, ...]] | None = None

    @property
    def lease(self) -> Lease:
        return self._lease

    # -- hooks ---------------------------------------------------------------------

    async def _ensure_base(self) -> bool:
        """Repair what the peers' entries depend on (the vxlan device); True if it was
        recreated, i.e. every entry that hung off it is gone."""
        return False

    def _entries_for(
        self, lease: Lease, lookups: Mapping[IPAddress, RouteLookup | None]
    ) -> tuple[Entry, ...] | str:
        """The entries ``lease`` needs, or a one-line reason it cannot have any."""
        raise NotImplementedError

    def _needs_lookup(self) -> bool:
        """Whether :meth:`_entries_for` uses route lookups of peer public IPs."""
        return False

    async def _kernel(self) -> list[Entry]:
        """Every kernel entry this backend might own (dumped once per reconcile)."""
        return list(await self._nl.routes())

    def _owns(self, entry: Entry) -> bool:
        return isinstance(entry, Route) and owned_route(entry, self._config, self._lease.subnet)

    # -- the Network API ---------------------------------------------------------------

    def accepts(self, lease: Lease) -> bool:
        return lease.attrs.backend_type == self.backend_type and lease.subnet != self._lease.subnet

    async def _lookups(self, leases: Iterable[Lease]) -> Mapping[IPAddress, RouteLookup | None]:
        if not self._needs_lookup():
            return {}
        missing = [lease.attrs.public_ip for lease in leases]
        missing = [ip for ip in missing if ip not in self._lookup_cache]
        if missing:
            self._lookup_cache.update(await self._nl.route_get_many(missing))
        return self._lookup_cache

    def _check_lookup_basis(self, kernel: Iterable[Entry]) -> None:
        basis = frozenset(
            (e.dst, e.gateway, e.oif, e.priority, e.type)
            for e in kernel
            if isinstance(e, Route) and e.protocol != RTPROT_LODEN
        )
        if basis != self._lookup_basis:
            self._lookup_cache.clear()
            self._lookup_basis = basis

    def _compute(
        self,
        leases: Iterable[tuple[str, Lease]],
        lookups: Mapping[IPAddress, RouteLookup | None],
    ) -> tuple[dict[str, tuple[Entry, ...]], list[str]]:
        """Entries per accepted peer, and why the others get none (warned once each)."""
        entries: dict[str, tuple[Entry, ...]] = {}
        skipped: list[str] = []
        for key, lease in leases:
            result = self._entries_for(lease, lookups)
            if isinstance(result, str):
                skipped.append(result)
                if result not in self._warned:
                    if len(self._warned) > 10000:  # bounded: a hostile store cannot grow it
                        self._warned.clear()
                    log.warning("%s", result)
                    self._warned.add(result)
            else:
                entries[key] = result
        return entries, skipped

    async def reconcile(self, peers: Mapping[str, Lease]) -> ReconcileReport:
        async with self._lock:
            await self._ensure_base()
            return await self._reconcile(peers)

    async def _reconcile(self, peers: Mapping[str, Lease]) -> ReconcileReport:
        started = time.monotonic()
        kernel = await self._kernel()
        wanted = [(key, lease) for key, lease in peers.items() if self.accepts(lease)]
        self._peers = dict(wanted)
        if self._needs_lookup():
            self._check_lookup_basis(kernel)
        lookups = await self._lookups(lease for _, lease in wanted)
        entries, skipped = self._compute(wanted, lookups)
        if len(self._lookup_cache) > 2 * len(wanted) + 64:  # keep the cache bounded
            keep = {lease.attrs.public_ip for _, lease in wanted}
            self._lookup_cache = {k: v for k, v in self._lookup_cache.items() if k in keep}
        changes = diff((e for es in entries.values() for e in es), kernel, self._owns)
        result = await self._nl.apply(changes)
        self._entries = entries
        out = report(result, changes, skipped)
        if changes or out.errors:
            log.info(
                "%s reconcile: %d peers (%d skipped), %d written (%d adopted), %d removed, "
                "%d errors, %.3fs",
                self.backend_type,
                len(entries),
                len(skipped),
                out.added,
                adopted(changes, kernel),
                out.removed,
                len(out.errors),
                time.monotonic() - started,
            )
        return out

    async def apply(self, events: Sequence[LeaseEvent]) -> ReconcileReport:
        async with self._lock:
            latest: dict[str, Lease | None] = {}
            fallback: dict[str, Lease] = {}
            for event in events:
                key = event.lease.key
                if event.lease.subnet == self._lease.subnet:
                    continue
                if event.kind is EventKind.ADDED and self.accepts(event.lease):
                    latest[key] = event.lease
                else:
                    latest[key] = None
                    if self.accepts(event.lease):
                        fallback[key] = event.lease
            if not latest:
                return ReconcileReport()
            if await self._ensure_base():
                peers = dict(self._peers)
                for key, lease in latest.items():
                    if lease is None:
                        peers.pop(key, None)
                    else:
                        peers[key] = lease
                return await self._reconcile(peers)
            alive = [(key, lease) for key, lease in latest.items() if lease is not None]
            lookups = await self._lookups([*(lease for _, lease in alive), *fallback.values()])
            new, skipped = self._compute(alive, lookups)
            changes: list[Change] = []
            for key in latest:
                old = self._entries.get(key)
                if old is None and key in fallback:
                    guess = self._entries_for(fallback[key], lookups)
                    old = guess if not isinstance(guess, str) else ()
                changes += transition(old or (), new.get(key, ()))
            changes = ordered(changes)
            result = await self._nl.apply(changes)
            for key, lease in latest.items():
                if key in new:
                    self._entries[key] = new[key]
                else:
                    self._entries.pop(key, None)
                if lease is None:
                    self._peers.pop(key, None)
                else:
                    self._peers[key] = lease
            return report(result, changes, skipped)

    async def aclose(self) -> None:
        await self._nl.aclose()
