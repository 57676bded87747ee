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
import dataclasses
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from loden.backend.base import ExternalInterface, KernelDrift, ReconcileReport
from loden.errors import DataplaneError, NotificationsLost
from loden.kernel.netlink import (
    RTPROT_LODEN,
    BatchResult,
    Change,
    Digest,
    EntryChange,
    FdbEntry,
    IPAddress,
    KernelChange,
    LinkChange,
    Neighbour,
    Netlink,
    Route,
    RouteLookup,
    Skip,
    Tally,
)
from loden.kernel.types import NUD_FAILED, RT_TABLE_MAIN
from loden.model.config import NetworkConfig
from loden.model.lease import EventKind, Lease, LeaseEvent
from loden.model.net import overlap, within

log = logging.getLogger(__name__)

Entry = Route | Neighbour | FdbEntry
Key = tuple[object, ...]
_RTN_UNICAST = 1
#: Peers per write of a fresh start (see ``PeerNetwork._fresh``).
FRESH_CHUNK = 500
#: The kernel gives an IPv6 route without a metric 1024 (``ip -6 route`` shows it): the
#: desired IPv6 entries say so, or every resync would see them as different and rewrite.
IPV6_METRIC = 1024


@dataclass(frozen=True, slots=True)
class Conflict:
    """A peer lease that claims this node's identity (e.g. advertises our VTEP MAC):
    it gets no entries, and the agent reports it until the lease changes or goes."""

    reason: str


Wanted = tuple[Entry, ...] | str | Conflict


def entry_key(entry: Entry) -> Key:
    """Identity of an entry in the kernel: a replace with the same key overwrites it."""
    if isinstance(entry, Route):
        return ("route", entry.dst, entry.table, entry.priority)
    if isinstance(entry, Neighbour):
        return ("neigh", entry.ifindex, entry.dst)
    return ("fdb", entry.ifindex, entry.lladdr)


def ident(entry: Entry) -> object:
    """What tells one backend's entries apart among themselves: a route by destination, a
    neighbour by address, an FDB entry by its remote (the peer's public IP). The values
    are objects the peer's lease already holds (no new objects: an index of 15,000 MAC
    strings made after the cold start's big batch pinned ~3 MB of the allocator's pools,
    issue 14). Device, table and family are then checked by :func:`same_slot`; an
    overlay address (route, neighbour) is never an underlay one (FDB remote).

    An FDB entry whose remote somebody changed is therefore not found by its new
    remote: the periodic reconcile repairs that one; deletions, the common drift,
    are found at once."""
    return entry.dst


def same_slot(want: Entry, have: Entry) -> bool:
    """Would ``have`` take the place of ``want`` in the kernel (same :func:`entry_key`)?"""
    return entry_key(want) == entry_key(have)


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
    if isinstance(changes, list):
        changes.sort(key=_rank)  # in place: no second list of 15,000 at a cold start
        return changes
    return sorted(changes, key=_rank)


def diff(
    desired: Iterable[Entry], kernel: Iterable[Entry], owned: Callable[[Entry], bool]
) -> list[Change]:
    """Changes that turn ``kernel`` into ``desired`` touching only ``owned`` extras.

    Entries are hashable values, so the common case (a kernel entry exactly equal to a
    desired one) is settled by two set differences in C; only the remainder, usually a
    handful of routes that are not ours, goes through the per-key rules below. At 5,000
    vxlan peers this cut the diff from ~0.2 s to ~0.03 s.
    """
    want_set = desired if isinstance(desired, frozenset | set) else set(desired)
    have_set = set(kernel)
    missing = want_set - have_set
    extra = have_set - want_set
    del have_set
    if not extra:  # a cold start or a clean node: no per-key work (nor its ~1 MB of keys)
        return ordered(Change(want) for want in missing)
    have: dict[Key, list[Entry]] = {}
    for entry in extra:
        have.setdefault(entry_key(entry), []).append(entry)
    changes: list[Change] = []
    missing_keys: set[Key] = set()
    matched: set[int] = set()
    for want in missing:
        key = entry_key(want)
        found = False
        for entry in have.get(key, ()):
            if in_sync(want, entry):
                matched.add(id(entry))
                found = True
        if not found:
            changes.append(Change(want))
            if key in have:  # only keys an extra entry may share are worth keeping
                missing_keys.add(key)
    wanted_keys: set[Key] | None = None
    for key, entries in have.items():
        for entry in entries:
            if id(entry) in matched or not owned(entry):
                continue
            if not isinstance(entry, FdbEntry):  # an FDB key may hold more remotes
                if key in missing_keys:
                    continue  # the replace above overwrites it
                if wanted_keys is None:  # rare (a stale entry): computed once, lazily
                    wanted_keys = {entry_key(e) for e in want_set}
                if key in wanted_keys:
                    continue
            changes.append(Change(entry, delete=True))
    return ordered(changes)


def transition(old: Sequence[Entry], new: Sequence[Entry]) -> list[Change]:
    """Changes from one peer's old entries to its new ones (the ``apply`` path)."""
    new_keys = {entry_key(e) for e in new}
    changes = [Change(e, delete=True) for e in old if entry_key(e) not in new_keys]
    changes += [Change(e) for e in new]
    return ordered(changes)


def owned_route(
    route: Route, config: NetworkConfig, own: IPv4Network, own6: IPv6Network | None = None
) -> bool:
    """Is ``route`` one Loden installed for a peer (see the module docstring)? IPv6
    routes count only inside ``IPv6Network`` (never the whole of it, never our own)."""
    if route.protocol != RTPROT_LODEN or route.type != _RTN_UNICAST:
        return False
    dst = route.dst
    if isinstance(dst, IPv6Network):
        net6 = config.ipv6_network
        return (
            config.enable_ipv6
            and net6 is not None
            and dst != own6
            and dst.subnet_of(net6)
            and dst != net6
        )
    if dst == own:
        return False
    net = config.network
    return net is None or (dst.subnet_of(net) and dst != net)


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
    result: BatchResult,
    changes: Sequence[Change],
    skipped: Iterable[str],
    conflicts: Iterable[str] = (),
) -> ReconcileReport:
    """``skipped``: why some peers got no entries (see :class:`ReconcileReport`)."""
    failed = {id(change) for change, _ in result.failed}
    added = sum(1 for c in changes if not c.delete and id(c) not in failed)
    removed = sum(1 for c in changes if c.delete and id(c) not in failed)
    errs = tuple(str(err) for _, err in result.failed)
    return ReconcileReport(
        added=added,
        removed=removed,
        errors=errs,
        skipped=tuple(skipped),
        conflicts=tuple(conflicts),
    )


class PeerNetwork:
    """Base of the per-peer kernel backends; subclasses say what a peer needs.

    Concurrency: ``apply`` never waits for a resync. A reconcile reads the kernel and
    computes its diff without holding the write lock; ``apply`` calls that run meanwhile
    record the entry keys they wrote, and the reconcile leaves those keys alone when it
    writes (the apply is newer than the reconcile's dump). Before this, a new lease at
    5,000 peers waited behind a whole 0.3-0.45 s resync (open-loop p99 ~450 ms).
    """

    backend_type = ""
    #: What :meth:`_identity_of` returns, for messages.
    identity_label = "value"

    def __init__(
        self, nl: Netlink, lease: Lease, config: NetworkConfig, ext: ExternalInterface
    ) -> None:
        self._nl = nl
        self._lease = lease
        self._config = config
        self._ext = ext
        #: The peers whose entries are programmed, by lease key: the lease only. Their
        #: entries are derived again when needed (~3 µs a peer): kept per peer, with
        #: their per-peer tuples and records, they were ~2 MB of the agent's memory at
        #: 5,000 peers (issue 14). ``apply`` diffs a changed lease against the entries
        #: of the lease here; the whole set is replayed when the base (the vxlan
        #: device) had to be recreated.
        self._wanted: dict[str, Lease] = {}
        #: Accepted peers that get no entries: the lease and why (or the Conflict).
        self._unwanted: dict[str, tuple[Lease, str | Conflict]] = {}
        #: The lease key of every programmed entry by :func:`ident`: the lookup of kernel
        #: notifications. None until a notification needs it (then built from
        #: ``_wanted``); never built when the agent does not listen to the kernel.
        self._by_ident: dict[object, str] | None = None
        #: Held while writing to the kernel and updating the bookkeeping above.
        self._lock = asyncio.Lock()
        #: One reconcile at a time (the snapshot one and the periodic one may overlap).
        self._resync_lock = asyncio.Lock()
        #: While a reconcile reads and diffs: entry keys and peers ``apply`` wrote.
        self._touched_keys: set[Key] | None = None
        self._touched_peers: set[str] = set()
        #: Peers that claim our identity, by lease key (see :class:`Conflict`).
        self._conflicts: dict[str, str] = {}
        #: Values (VTEP MACs) that several other nodes advertise, with the report line.
        self._shared: dict[str, str] = {}
        self._warned: set[str] = set()
        #: Route lookups of peer public IPs, valid while the routes that are not ours
        #: (connected subnets, gateways: what decides how an underlay IP is reached)
        #: stay the same. One lookup costs a netlink round trip; 5,000 cost ~0.2 s.
        self._lookup_cache: dict[IPAddress, RouteLookup | None] = {}
        self._lookup_basis: frozenset[tuple[object, ...]] | None = None
        #: Admin state (up) of the links watched by :meth:`watch_kernel`.
        self._links_up: dict[int, bool] = {}
        #: Neighbour and FDB entries this object deleted whose notification has not come
        #: back yet (see :meth:`_echo_of_own_write`).
        self._own_deletions: set[Key] = set()
        #: Bumped whenever what the kernel should hold may change (see
        #: :meth:`_expect_changed`).
        self._generation = 0
        #: (generation, digest of the dumps) of the last no-change pass that found the
        #: kernel exactly as wanted: while both still match, the next no-change pass
        #: only fingerprints the dumps (~25 ms at 5,000 vxlan peers instead of ~130 ms
        #: deriving, hashing and decoding 15,000 entries each way: issue 14).
        self._quiet: tuple[int, int] | None = None

    @property
    def lease(self) -> Lease:
        return self._lease

    # -- hooks ---------------------------------------------------------------------

    async def _ensure_base(self) -> bool:
        """Repair what the peers' entries depend on (the vxlan device); True if it was
        recreated, i.e. every entry that hung off it is gone."""
        return False

    async def _base_intact(self) -> bool:
        """A cheap check, made before each ``apply``, that :meth:`_ensure_base` has
        nothing to do; the full check runs with every reconcile."""
        return True

    def _entries_for(self, lease: Lease, lookups: Mapping[IPAddress, RouteLookup | None]) -> Wanted:
        """The entries ``lease`` needs, or a one-line reason it cannot have any, or
        the :class:`Conflict` it is (it claims this node's identity)."""
        raise NotImplementedError

    def _needs_lookup(self) -> bool:
        """Whether :meth:`_entries_for` uses route lookups of peer public IPs."""
        return False

    def _identity_of(self, lease: Lease) -> str | None:
        """The per-node value ``lease`` advertises that no other node may share (vxlan:
        its VTEP MAC), or None if the backend has none."""
        return None

    # -- identity ------------------------------------------------------------------------

    def _check_shared(self, programmed: Iterable[Lease]) -> None:
        """Find values several programmed peers with different public IPs advertise (a
        copied state directory, a cloned image): every node's forwarding holds one
        destination per value, so one of those peers is unreachable. Checked when the
        peer set changed; peers that got no entries (ours, skipped) are not counted."""
        by_value: dict[str, list[Lease]] = {}
        for lease in programmed:
            value = self._identity_of(lease)
            if value is not None:
                by_value.setdefault(value, []).append(lease)
        shared: dict[str, str] = {}
        for value, holders in by_value.items():
            if len(holders) > 1 and len({h.attrs.public_ip for h in holders}) > 1:
                names = ", ".join(
                    f"{h.key} ({h.attrs.public_ip})" for h in sorted(holders, key=lambda h: h.key)
                )
                shared[value] = (
                    f"{self.backend_type}: peers {names} all advertise {self.identity_label}"
                    f" {value}: only one of"
                    " them is reachable. Restart the agent on all but one of them (each picks"
                    " a fresh value)"
                )
                if self._shared.get(value) != shared[value]:
                    log.error("%s", shared[value])
        self._shared = shared

    def _all_conflicts(self) -> tuple[str, ...]:
        return (*self._conflicts.values(), *self._shared.values())

    async def _kernel(self, skip: Skip | None = None, digest: Digest | None = None) -> list[Entry]:
        """Every kernel entry this backend might own (dumped once per reconcile); with
        ``skip`` (entry hashes), those whose hash is in it are left out and their hash
        removed from it (a :class:`Tally` takes them all); ``digest`` gets every dumped
        message (see :class:`Digest`)."""
        entries: list[Entry] = list(await self._nl.routes(skip=skip, digest=digest))
        if self._config.enable_ipv6:
            entries += await self._nl.routes(family=socket.AF_INET6, skip=skip, digest=digest)
        return entries

    def _owns(self, entry: Entry) -> bool:
        return isinstance(entry, Route) and owned_route(
            entry, self._config, self._lease.subnet, self._lease.ipv6_subnet
        )

    def _warn_once(self, reason: str) -> None:
        """One warning per reason (a peer whose IPv6 side is broken but IPv4 side works
        is programmed for IPv4 and reported here, not skipped)."""
        if reason not in self._warned:
            if len(self._warned) > 10000:
                self._warned.clear()
            log.warning("%s", reason)
            self._warned.add(reason)

    def _forget_entries(self) -> None:
        """The kernel lost what hung off the base: nothing is programmed any more."""
        self._wanted.clear()
        self._by_ident = None
        self._expect_changed()

    def _expect_changed(self) -> None:
        """What the kernel should hold may have changed (programmed peers, devices):
        the digest of the last quiet pass no longer proves anything."""
        self._generation += 1
        self._quiet = None

    def _entries_of(self, lease: Lease | None) -> tuple[Entry, ...]:
        """The entries ``lease`` needs now (none if it cannot have any)."""
        if lease is None:
            return ()
        result = self._entries_for(lease, self._lookup_cache)
        return result if isinstance(result, tuple) else ()

    def _programmed(self, key: str) -> tuple[Entry, ...]:
        return self._entries_of(self._wanted.get(key))

    def _build_index(self) -> dict[object, str]:
        return {
            ident(e): key for key, lease in self._wanted.items() for e in self._entries_of(lease)
        }

    def _watched_links(self) -> set[int]:
        """Links whose loss flushes this backend's entries (the kernel sends no
        RTM_DELROUTE for routes it drops with their device)."""
        return {self._ext.index}

    # -- the Network API ---------------------------------------------------------------

    def accepts(self, lease: Lease) -> bool:
        return lease.attrs.backend_type == self.backend_type and not lease.overlaps_lease(
            self._lease
        )

    async def _lookups(self, leases: Iterable[Lease]) -> Mapping[IPAddress, RouteLookup | None]:
        if not self._needs_lookup():
            return {}
        missing = [ip for lease in leases for ip in self._public_ips(lease)]
        missing = [ip for ip in missing if ip not in self._lookup_cache]
        if missing:
            self._lookup_cache.update(await self._nl.route_get_many(missing))
        return self._lookup_cache

    def _public_ips(self, lease: Lease) -> list[IPAddress]:
        """The underlay addresses of ``lease`` this node routes to, per enabled family."""
        ips: list[IPAddress] = []
        if self._config.enable_ipv4 and int(lease.attrs.public_ip):
            ips.append(lease.attrs.public_ip)
        if self._config.enable_ipv6 and lease.attrs.public_ipv6 is not None:
            ips.append(lease.attrs.public_ipv6)
        return ips

    def _check_lookup_basis(self, kernel: Iterable[Entry]) -> bool:
        """Drop the route lookups if the routes they depend on changed (True then)."""
        basis = frozenset(
            (e.dst, e.gateway, e.oif, e.priority, e.type)
            for e in kernel
            if isinstance(e, Route) and e.protocol != RTPROT_LODEN
        )
        if basis == self._lookup_basis:
            return False
        self._lookup_cache.clear()
        self._lookup_basis = basis
        return True

    def _compute(
        self,
        leases: Iterable[tuple[str, Lease]],
        lookups: Mapping[IPAddress, RouteLookup | None],
        into: dict[str, tuple[Entry, ...]] | set[Entry],
        programmed: dict[str, Lease],
    ) -> tuple[dict[str, tuple[Lease, str | Conflict]], list[str]]:
        """What each lease needs: its entries go ``into`` (by key, or all in one set),
        its lease into ``programmed``; returns the peers that get none (with why) and
        the reasons (warned once each; conflicts logged when they change)."""
        unwanted: dict[str, tuple[Lease, str | Conflict]] = {}
        skipped: list[str] = []
        for key, lease in leases:
            result = self._entries_for(lease, lookups)
            if isinstance(result, tuple):
                if isinstance(into, set):
                    into.update(result)
                else:
                    into[key] = result
                programmed[key] = lease
                self._conflicts.pop(key, None)
                continue
            unwanted[key] = (lease, result)
            if isinstance(result, Conflict):
                if self._conflicts.get(key) != result.reason:
                    log.error("%s", result.reason)
                self._conflicts[key] = result.reason
                continue
            self._conflicts.pop(key, None)
            skipped.append(result)
            if result not in self._warned:
                if len(self._warned) > 10000:  # bounded: a hostile store cannot grow it
                    self._warned.clear()
                log.warning("%s", result)
                self._warned.add(result)
        return unwanted, skipped

    async def reconcile(self, peers: Mapping[str, Lease]) -> ReconcileReport:
        """Make the kernel hold exactly what ``peers`` need.

        ``peers`` is read once the base is repaired, so a live mapping (the agent's
        lease watcher) yields the newest peer set; events applied after that are
        honoured through ``apply``'s record, not overwritten.
        """
        async with self._resync_lock:
            async with self._lock:
                if await self._ensure_base():
                    self._forget_entries()
                # A dict, not 5,000 (key, lease) pairs: one allocation (see ``_reconcile``).
                wanted = {key: lease for key, lease in peers.items() if self.accepts(lease)}
                self._touched_keys = set()
                self._touched_peers = set()
            try:
                return await self._reconcile(wanted)
            finally:
                self._touched_keys = None
                self._touched_peers = set()

    def _unchanged(self, wanted: dict[str, Lease]) -> bool:
        """Is ``wanted`` exactly what the last pass and the applied events recorded,
        and can nothing else change a peer's entries (no route lookups)?"""
        if self._needs_lookup() or not self._wanted:
            return False
        if len(wanted) != len(self._wanted) + len(self._unwanted):
            return False
        for key, lease in wanted.items():
            known = self._wanted.get(key)
            if known is None:
                other = self._unwanted.get(key)
                if other is None or other[0] != lease or isinstance(other[1], Conflict):
                    return False
            elif known != lease:
                return False
        return True

    async def _verify(self) -> ReconcileReport:
        """A no-change pass: the entries of the programmed leases against one dump,
        first as two sums (:class:`Tally`), entry by entry only if they differ
        (:meth:`_drift`). Nothing per entry is held while the sums are made; 15,000
        entries, or their hashes, held for a moment were what the allocator kept
        (~3 MB, then ~1 MB, after each such pass at 5,000 peers, issue 14).

        If nothing this side changed since a pass that found the kernel exactly as
        wanted, the dumps are only fingerprinted: the same digest means the same
        kernel entries, so nothing is derived or decoded (the digest comes from the
        very dumps that pass checked, never from another moment's)."""
        generation = self._generation
        # The index from kernel entries to leases (1.3 MB at 5,000 vxlan peers) lives
        # from the notification that needed it to the next periodic pass: drift comes in
        # bursts, and an index kept for good is memory an idle agent never gets back.
        self._by_ident = None
        skipped = [why for _, why in self._unwanted.values() if isinstance(why, str)]
        if self._quiet is not None and self._quiet[0] == generation:
            fingerprints = Digest(decode=False)
            await self._kernel(digest=fingerprints)
            if self._quiet is not None and self._quiet == (generation, fingerprints.value):
                return ReconcileReport(skipped=tuple(skipped), conflicts=self._all_conflicts())
        started = time.monotonic()
        # First the sums: the wanted entries' hashes against the kernel's owned ones,
        # each derived or decoded, added and dropped at once. Equal: nothing drifted, and
        # no 15,000 hashes were held (their ints pinned ~1 MB of the allocator's arenas
        # after each such pass under churn, issue 14).
        wanted = Tally(self._owns)
        for lease in self._wanted.values():
            for entry in self._entries_of(lease):
                wanted.add(entry)
        found = Tally(self._owns)
        digest = Digest()
        await self._kernel(skip=found, digest=digest)
        changes: list[Change] = []
        if not found.same(wanted):
            changes, digest = await self._drift()
        async with self._lock:
            touched = self._touched_keys or set()
            if touched:
                changes = [c for c in changes if entry_key(c.entry) not in touched]
            result = await self._write(changes)
            if not changes and not touched and self._generation == generation:
                self._quiet = (generation, digest.value)
        out = report(result, changes, skipped, self._all_conflicts())
        if changes or out.errors:
            log.info(
                "%s reconcile: %d peers (%d skipped), %d written, %d removed, %d errors, %.3fs",
                self.backend_type,
                len(self._wanted),
                len(skipped),
                out.added,
                out.removed,
                len(out.errors),
                time.monotonic() - started,
            )
        return out

    async def _drift(self) -> tuple[list[Change], Digest]:
        """The sums differ: the changes, from one more dump checked entry by entry,
        and that dump's digest. It holds the hashes of the wanted entries, not the
        entries (each is derived, hashed and dropped at once); a kernel entry with one
        of these hashes is taken for that wanted entry. What is missing is derived
        again from the hashes left over."""
        expected = {hash(e) for lease in self._wanted.values() for e in self._entries_of(lease)}
        digest = Digest()
        kernel = await self._kernel(skip=expected, digest=digest)
        missing: set[Entry] = set()
        if expected:
            missing = {
                e
                for lease in self._wanted.values()
                for e in self._entries_of(lease)
                if hash(e) in expected
            }
        del expected
        return diff(missing, kernel, self._owns), digest

    async def _reconcile(self, wanted: dict[str, Lease]) -> ReconcileReport:
        if self._unchanged(wanted):
            return await self._verify()
        started = time.monotonic()
        kernel = await self._kernel()
        # A changed route lookup may turn a direct route into vxlan entries for the same
        # lease: the index is rebuilt then, as when the peer set changed.
        rebuild = self._needs_lookup() and self._check_lookup_basis(kernel)
        lookups = await self._lookups(wanted.values())
        self._conflicts = {k: v for k, v in self._conflicts.items() if k in wanted}
        if len(self._lookup_cache) > 2 * len(wanted) + 64:  # keep the cache bounded
            keep = {ip for lease in wanted.values() for ip in self._public_ips(lease)}
            self._lookup_cache = {k: v for k, v in self._lookup_cache.items() if k in keep}
        programmed: dict[str, Lease] = {}
        if not self._wanted and not any(self._owns(e) for e in kernel):
            # A fresh start (nothing of ours in the kernel, nothing programmed): no
            # diff is needed, so peers are written a chunk at a time instead of all
            # 15,000 entries and their changes at once. That short-lived peak decided
            # how much memory the allocator kept for good (~2 MB, issue 14).
            unwanted, skipped, result = await self._fresh(wanted, lookups, set(kernel), programmed)
            changes: list[Change] = []
        else:
            # One set of entries, no per-peer tuples (the same peak).
            desired: set[Entry] = set()
            unwanted, skipped = self._compute(wanted.items(), lookups, desired, programmed)
            changes = diff(desired, kernel, self._owns)
            del desired
            result = None
        if programmed != self._wanted:
            rebuild = True
            self._check_shared(programmed.values())
        async with self._lock:
            if result is None:
                touched = self._touched_keys or set()
                if touched:
                    changes = [c for c in changes if entry_key(c.entry) not in touched]
                result = await self._write(changes)
            # Peers an ``apply`` wrote while this pass read and diffed: its record wins.
            for key in self._touched_peers:
                rebuild = True
                programmed.pop(key, None)
                unwanted.pop(key, None)
                if key in self._wanted:
                    programmed[key] = self._wanted[key]
                elif key in self._unwanted:
                    unwanted[key] = self._unwanted[key]
            self._wanted = programmed
            self._unwanted = unwanted
            self._expect_changed()
            if rebuild:
                self._by_ident = None  # built again when a notification needs it
        out = report(result, changes, skipped, self._all_conflicts())
        if not changes and result.applied:  # a fresh start wrote without a change list
            out = dataclasses.replace(out, added=result.applied)
        if out.added or out.removed or out.errors:
            log.info(
                "%s reconcile: %d peers (%d skipped), %d written (%d adopted), %d removed, "
                "%d errors, %.3fs",
                self.backend_type,
                len(programmed),
                len(skipped),
                out.added,
                adopted(changes, kernel),
                out.removed,
                len(out.errors),
                time.monotonic() - started,
            )
        return out

    async def _fresh(
        self,
        wanted: dict[str, Lease],
        lookups: Mapping[IPAddress, RouteLookup | None],
        kernel: set[Entry],
        programmed: dict[str, Lease],
    ) -> tuple[dict[str, tuple[Lease, str | Conflict]], list[str], BatchResult]:
        """Write what ``wanted`` needs and the kernel lacks, :data:`FRESH_CHUNK` peers
        at a time (each chunk ordered as :func:`ordered` says): the peers that get no
        entries, why, and every write's outcome in one result."""
        unwanted: dict[str, tuple[Lease, str | Conflict]] = {}
        skipped: list[str] = []
        failed: list[tuple[Change, DataplaneError]] = []
        applied = 0
        keys = list(wanted)
        for start in range(0, len(keys), FRESH_CHUNK):
            desired: set[Entry] = set()
            chunk = [(key, wanted[key]) for key in keys[start : start + FRESH_CHUNK]]
            more_unwanted, more_skipped = self._compute(chunk, lookups, desired, programmed)
            unwanted.update(more_unwanted)
            skipped += more_skipped
            changes = ordered([Change(e) for e in desired if e not in kernel])
            del desired
            async with self._lock:
                touched = self._touched_keys or set()
                if touched:
                    changes = [c for c in changes if entry_key(c.entry) not in touched]
                result = await self._write(changes)
            applied += result.applied
            failed += result.failed
        return unwanted, skipped, BatchResult(applied, tuple(failed))

    async def apply(self, events: Sequence[LeaseEvent]) -> ReconcileReport:
        latest: dict[str, Lease | None] = {}
        fallback: dict[str, Lease] = {}
        for event in events:
            key = event.lease.key
            if event.lease.overlaps_lease(self._lease):
                continue
            if event.kind is EventKind.ADDED and self.accepts(event.lease):
                latest[key] = event.lease
            else:
                latest[key] = None
                if self.accepts(event.lease):
                    fallback[key] = event.lease
        if not latest:
            return ReconcileReport(conflicts=self._all_conflicts())
        # A chunk of peers at a time: a batch of thousands (a node joining a big cluster
        # as events, a mass churn) held all their old and new entries and changes at
        # once, a peak the allocator then kept (issue 14). Each peer's changes stay in
        # one chunk, in order.
        keys = list(latest)
        out = ReconcileReport()
        for start in range(0, len(keys), FRESH_CHUNK):
            chunk = {key: latest[key] for key in keys[start : start + FRESH_CHUNK]}
            done, broken = await self._apply_chunk(chunk, fallback)
            out += done
            if broken:
                async with self._lock:
                    peers = dict(self._wanted)
                    peers.update((key, lease) for key, (lease, _) in self._unwanted.items())
                    for key, lease in latest.items():  # the chunks not applied yet too
                        if lease is None:
                            peers.pop(key, None)
                        else:
                            peers[key] = lease
                log.warning(
                    "%s: writes failed and the device is gone: replaying every peer",
                    self.backend_type,
                )
                return await self.reconcile(peers)
        return dataclasses.replace(out, conflicts=self._all_conflicts())

    async def _apply_chunk(
        self, latest: dict[str, Lease | None], fallback: Mapping[str, Lease]
    ) -> tuple[ReconcileReport, bool]:
        """:meth:`apply` for some peers: what it did, and whether the base is gone."""
        async with self._lock:
            alive = [(key, lease) for key, lease in latest.items() if lease is not None]
            guessed = [fallback[key] for key in latest if key in fallback]
            lookups = await self._lookups([*(lease for _, lease in alive), *guessed])
            old = self._entries_before(latest, fallback, lookups)
            new: dict[str, tuple[Entry, ...]] = {}
            unwanted, skipped = self._compute(alive, lookups, new, {})
            changes: list[Change] = []
            for key in latest:
                changes += transition(old[key], new.get(key, ()))
            changes = ordered(changes)
            result = await self._write(changes)
            # The base (vxlan device) is only checked when a write failed: a check per
            # event would cost a round trip on the busy lane. Gone -> replay everything.
            broken = bool(result.failed) and not await self._base_intact()
            if self._touched_keys is not None:
                self._touched_keys.update(entry_key(c.entry) for c in changes)
                self._touched_peers.update(latest)
            self._record(latest, old, new, unwanted)
            return report(result, changes, skipped), broken

    def _entries_before(
        self,
        latest: Mapping[str, Lease | None],
        fallback: Mapping[str, Lease],
        lookups: Mapping[IPAddress, RouteLookup | None],
    ) -> dict[str, tuple[Entry, ...]]:
        """What each peer of ``latest`` has in the kernel now: what we programmed, or for
        a peer we never programmed, what its ``fallback`` lease would have (a peer that
        was there before this agent started)."""
        old = {key: self._programmed(key) for key in latest}
        for key in latest:
            if key not in self._wanted and key not in self._unwanted and key in fallback:
                guess = self._entries_for(fallback[key], lookups)
                old[key] = guess if isinstance(guess, tuple) else ()
        return old

    def _record(
        self,
        latest: Mapping[str, Lease | None],
        old: Mapping[str, tuple[Entry, ...]],
        new: Mapping[str, tuple[Entry, ...]],
        unwanted: Mapping[str, tuple[Lease, str | Conflict]],
    ) -> None:
        """Remember what an apply programmed (the index follows, peer by peer)."""
        self._expect_changed()
        for key, lease in latest.items():
            self._unindex(old[key], key)
            self._wanted.pop(key, None)
            self._unwanted.pop(key, None)
            if lease is None:
                self._conflicts.pop(key, None)
            elif key in new:
                self._wanted[key] = lease
                self._reindex(new[key], key)
            else:
                self._unwanted[key] = unwanted[key]

    # -- kernel notifications -------------------------------------------------------------

    async def watch_kernel(self, *, rcvbuf: int = 16 << 20) -> AsyncIterator[KernelDrift]:
        """See :class:`loden.backend.base.KernelWatcher`; ``rcvbuf``: the notification
        socket's receive buffer (16 MiB holds the echo of a 15,000-entry cold start, in
        case the event loop is busy meanwhile: each one costs ~1 KiB while queued).

        Level-triggered still: a notification only says *where* to look; the repair
        writes the wanted entry whatever the event was (an idempotent replace), and a
        lost notification (ENOBUFS) or a change to a device the entries hang off asks
        for a full reconcile at once.
        """
        monitor = await self._nl.monitor(rcvbuf=rcvbuf)
        try:
            while True:
                try:
                    changes = await monitor.read()
                except NotificationsLost as exc:
                    yield KernelDrift(resync=f"{exc}; running a full reconcile")
                    continue
                why = self._links_changed(changes)
                if why is not None:
                    yield KernelDrift(resync=why)
                    continue
                report = await self._repair(changes)
                if report is not None:
                    yield KernelDrift(report=report)
        finally:
            monitor.close()

    def _links_changed(self, changes: Sequence[KernelChange]) -> str | None:
        watched = self._watched_links()
        why = None
        for change in changes:
            if not isinstance(change, LinkChange) or change.index not in watched:
                continue
            up = change.up and not change.deleted
            if self._links_up.get(change.index, True) != up or change.deleted:
                state = "deleted" if change.deleted else ("up" if up else "down")
                why = f"link #{change.index} went {state}; running a full reconcile"
            self._links_up[change.index] = up
        return why

    def _unindex(self, entries: Iterable[Entry], key: str) -> None:
        """Keep the index in step with one peer (an apply touches a few peers;
        rebuilding it for 15,000 entries each time would cost milliseconds)."""
        if self._by_ident is not None:
            for entry in entries:
                if self._by_ident.get(ident(entry)) == key:
                    del self._by_ident[ident(entry)]

    def _reindex(self, entries: Iterable[Entry], key: str) -> None:
        if self._by_ident is not None:
            self._by_ident.update((ident(e), key) for e in entries)

    def _wanted_entry(self, have: Entry) -> Entry | None:
        """The programmed entry in the place of kernel entry ``have``, if one is ours."""
        if self._by_ident is None:
            self._by_ident = self._build_index()
        key = self._by_ident.get(ident(have))
        if key is None:
            return None
        slot = ident(have)
        for entry in self._programmed(key):
            if ident(entry) == slot and same_slot(entry, have):
                return entry
        return None

    async def _repair(self, changes: Sequence[KernelChange]) -> ReconcileReport | None:
        """Rewrite the wanted entries that ``changes`` deleted or altered."""
        async with self._lock:
            todo: dict[object, Entry] = {}
            for change in changes:
                if not isinstance(change, EntryChange) or not self._may_hold(change.entry):
                    continue
                have = change.entry
                if self._echo_of_own_write(change):
                    continue
                want = self._wanted_entry(have)
                if want is None:
                    continue  # not ours: left alone
                if change.deleted or not in_sync(want, have):
                    todo[ident(want)] = want
                else:
                    todo.pop(ident(want), None)  # back in place by a later event
            if not todo:
                return None
            repairs = ordered(Change(e) for e in todo.values())
            result = await self._write(repairs)
            if self._touched_keys is not None:
                self._touched_keys.update(entry_key(c.entry) for c in repairs)
        out = report(result, repairs, ())
        log.info(
            "%s: %d drifted entries restored after kernel notifications (%d errors)",
            self.backend_type,
            out.added,
            len(out.errors),
        )
        return out

    def _may_hold(self, entry: Entry) -> bool:
        """Could ``entry`` be (in the place of) one of ours? Cheap, and before the index
        is looked at: the neighbour group reports every ARP/ND change on every device,
        and answering those from the index would build it (~1.3 MB at 5,000 vxlan
        peers) at the first one. Our routes are in the main table: the local table's
        (a device's own address) never are. Another protocol's route may stand in the
        place of one of ours only inside the family's Network and outside our own
        subnet (the bridge's route, cni0): not an IPv4-only node's link-local routes."""
        if isinstance(entry, Route):
            if entry.table != RT_TABLE_MAIN:
                return False
            if entry.protocol == RTPROT_LODEN:
                return True
            dst = entry.dst
            v4 = isinstance(dst, IPv4Network)
            net = self._config.network if v4 else self._config.ipv6_network
            own = self._lease.ipv4_subnet if v4 else self._lease.ipv6_subnet
            return (
                net is not None and within(dst, net) and not (own is not None and overlap(dst, own))
            )
        return entry.ifindex in self._entry_devices()

    def _entry_devices(self) -> set[int]:
        """The devices this backend's neighbour and FDB entries live on."""
        return set()

    def _echo_of_own_write(self, change: EntryChange) -> bool:
        """Notifications of our own writes that carry no port id to filter on: FDB
        changes (the vxlan driver sends them; the socket filter drops permanent ones
        written, this check is for a kernel that refused the filter and for
        deletions), and the "failed" state a neighbour passes through when deleted. A
        permanent FDB entry written needs no repair (one whose remote somebody changed
        is left to the periodic pass, see :func:`ident`); a deletion we made is
        recognised from :meth:`_write`'s record, so none of them builds the index."""
        entry = change.entry
        if isinstance(entry, FdbEntry):
            if not change.deleted:
                return entry.permanent
        elif not isinstance(entry, Neighbour) or not (change.deleted or entry.state & NUD_FAILED):
            return False
        key = entry_key(entry)
        if key in self._own_deletions:
            self._own_deletions.discard(key)
            return True
        return False

    async def _write(self, changes: list[Change]) -> BatchResult:
        """Every kernel write of the peers' entries (see :meth:`_echo_of_own_write`)."""
        for change in changes:
            if change.delete and isinstance(change.entry, FdbEntry | Neighbour):
                if len(self._own_deletions) >= 20000:  # echoes lost (ENOBUFS): bounded
                    self._own_deletions.clear()
                self._own_deletions.add(entry_key(change.entry))
        result = await self._nl.apply(changes)
        for change, _ in result.failed:  # nothing deleted: no notification will come
            if change.delete:
                self._own_deletions.discard(entry_key(change.entry))
        return result

    async def aclose(self) -> None:
        await self._nl.aclose()
