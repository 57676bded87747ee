"""LeaseWatcher: turn store snapshots and events into the peer set and its changes.

Pure and synchronous (flannel's ``pkg/lease``). It keeps the set of known remote
leases, keyed by subnet key, and filters out our own. Unlike flannel (spec §11 item
22), a malformed item never empties the peer set: the store layer drops it with a
warning and everything else stays. Leases outside the configured Network are
refused here, with one warning per key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Network

from loden.model.lease import EventKind, Lease, LeaseEvent
from loden.model.net import NO_IPV4, within

log = logging.getLogger(__name__)


class LeaseWatcher:
    def __init__(
        self, own: Lease, network: IPv4Network | None, network6: IPv6Network | None = None
    ) -> None:
        self._own_key = own.key
        self._own = own
        self._network = network
        #: IPv6Network when IPv6 is enabled: a lease whose IPv6 subnet lies outside it
        #: would make the backends route a foreign prefix (even ``::/0``) that no resync
        #: could ever sweep, since only routes inside IPv6Network count as Loden's.
        self._network6 = network6
        self._peers: dict[str, Lease] = {}
        #: Public IP -> the key of the lease claiming it, or a set when several do (the
        #: common single owner costs no set: ~250 bytes per peer at 5,000 peers).
        self._by_ip: dict[IPv4Address, str | set[str]] = {}
        self._warned: set[str] = set()

    @property
    def peers(self) -> Mapping[str, Lease]:
        return self._peers

    def set_own(self, own: Lease) -> None:
        self._own_key = own.key
        self._own = own
        dropped = self._peers.pop(own.key, None)
        if dropped is not None:
            self._forget_ip(dropped)

    def _acceptable(self, lease: Lease) -> bool:
        if lease.key == self._own_key:
            return False
        if (
            self._network is not None
            and lease.subnet != NO_IPV4
            and not within(lease.subnet, self._network)
        ):
            self._warn_once(
                lease.key,
                "lease %s is outside Network %s: ignored (remove it with "
                "`loden leases --delete %s` if stale)",
                lease.key,
                self._network,
                lease.key,
            )
            return False
        v6 = lease.ipv6_subnet
        if self._network6 is not None and v6 is not None and not within(v6, self._network6):
            self._warn_once(
                lease.key,
                "lease %s is outside IPv6Network %s: ignored (remove it with "
                "`loden leases --delete %s` if stale)",
                lease.key,
                self._network6,
                lease.key,
            )
            return False
        # On one of our own subnets (the doctor's [leases/overlap] names such pairs). The
        # IPv6 side only counts when IPv6 is on: otherwise it is never programmed.
        own = self._own
        return not lease.overlaps(own.subnet, own.ipv6_subnet if self._network6 else None)

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key in self._warned:
            return
        if len(self._warned) > 10000:  # bounded: a hostile store cannot grow it forever
            self._warned.clear()
        self._warned.add(key)
        log.warning(msg, *args)

    def reset(self, snapshot: Iterable[Lease]) -> list[LeaseEvent]:
        """Replace the peer set with ``snapshot``; return the differences as events.
        An unchanged lease stays the object we hold: the data plane holds that same
        one, and taking the snapshot's copies kept a second set of 5,000 leases after
        every relist (+2.6 MiB at the hourly relist, issue 14)."""
        fresh: dict[str, Lease] = {}
        for lease in snapshot:
            if self._acceptable(lease):
                lease = lease.reused_from(self._peers)
                fresh[lease.key] = lease
        events = [
            LeaseEvent(EventKind.REMOVED, old)
            for key, old in self._peers.items()
            if key not in fresh
        ]
        events += [
            LeaseEvent(EventKind.ADDED, lease)
            for key, lease in fresh.items()
            if self._peers.get(key) != lease
        ]
        # In place: ``peers`` is handed out as a live view (see AgentLoops._reconcile).
        self._peers.clear()
        self._peers.update(fresh)
        self._by_ip = {}
        for lease in fresh.values():
            self._add_ip(lease)
        self._check_duplicate_ips(ip for ip, keys in self._by_ip.items() if isinstance(keys, set))
        return events

    def update(self, events: Iterable[LeaseEvent]) -> list[LeaseEvent]:
        """Apply store events; return those that change the peer set."""
        out: list[LeaseEvent] = []
        touched: set[IPv4Address] = set()
        for event in events:
            lease = event.lease
            if event.kind is EventKind.ADDED:
                if not self._acceptable(lease):
                    continue
                old = self._peers.get(lease.key)
                if old == lease:
                    continue  # a renewal: nothing changed for the data plane
                if old is not None:
                    self._forget_ip(old)
                self._peers[lease.key] = lease
                self._add_ip(lease)
                touched.add(lease.attrs.public_ip)
                out.append(event)
            else:
                known = self._peers.pop(lease.key, None)
                if known is not None:
                    self._forget_ip(known)
                    out.append(LeaseEvent(EventKind.REMOVED, known))
        # Only the addresses this batch touched: a full scan per event cost ~8 ms at
        # 5,000 peers and delayed every new route behind it.
        self._check_duplicate_ips(touched)
        return out

    def _add_ip(self, lease: Lease) -> None:
        ip, key = lease.attrs.public_ip, lease.key
        have = self._by_ip.get(ip)
        if have is None or have == key:
            self._by_ip[ip] = key
        elif isinstance(have, str):
            self._by_ip[ip] = {have, key}
        else:
            have.add(key)

    def _forget_ip(self, lease: Lease) -> None:
        ip, key = lease.attrs.public_ip, lease.key
        have = self._by_ip.get(ip)
        if have is None:
            return
        if isinstance(have, str):
            if have == key:
                del self._by_ip[ip]
            return
        have.discard(key)
        if len(have) == 1:
            self._by_ip[ip] = next(iter(have))
        elif not have:
            del self._by_ip[ip]

    def _check_duplicate_ips(self, ips: Iterable[IPv4Address]) -> None:
        for ip in ips:
            keys = self._by_ip.get(ip)
            if isinstance(keys, set) and len(keys) > 1 and int(ip) != 0:
                self._warn_once(
                    "dup:" + ",".join(sorted(keys)),
                    "leases %s all claim public IP %s: only one node can own it; "
                    "delete the stale ones",
                    ", ".join(sorted(keys)),
                    ip,
                )
