"""The etcd subnet manager: config, lease acquisition, renewal and peer watching.

Policy lives in :mod:`loden.subnet.allocator`, storage behind
:class:`loden.subnet.store.LeaseStore` (etcd v3, v2 or memory). What this module adds
over flannel:

* every claim is a compare-and-swap; a lost race retries with a fresh candidate
  (flannel v3's loser exited, spec §11 item 2);
* a reservation (key without TTL) stays a reservation when its node claims it
  (flannel v3 silently turned it into a 24 h lease, spec §11 item 3);
* our own lease vanishing is repaired by re-creating the same key if it is still
  free; only if another node took it do we give up (:class:`LeaseRevoked`);
* a malformed key or value is skipped with one warning, never drops other peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Network

from loden.errors import (
    ConfigNotFound,
    LeaseConflict,
    LeaseRevoked,
    ParseError,
    StoreError,
    StoreUnavailable,
    SubnetKeyError,
    WatchCompacted,
)
from loden.model.config import NetworkConfig
from loden.model.lease import EventKind, Lease, LeaseAttrs, LeaseEvent
from loden.model.net import NO_IPV4, parse_subnet_key, subnet_key
from loden.model.subnet_env import PreviousSubnets
from loden.subnet import allocator
from loden.subnet.base import SHARED_READ_SECONDS, PublicIPOverride, WatchResult
from loden.subnet.store import LeaseStore, StoredKV, StoreEvent, StoreEventKind, WatchBatch

log = logging.getLogger(__name__)

#: Every lost race means another node won a subnet, so the storm as a whole always
#: progresses; the cap only guards against a store that keeps changing under us.
MAX_CLAIM_ATTEMPTS = 200
#: The shortest pause between renewals, whatever the margin: a margin as long as the
#: TTL (possible with the hidden ``--subnet-lease-ttl``) must not renew in a busy loop.
RENEW_FLOOR_SECONDS = 1.0
#: How long a listing made at start is reused by acquiring (the watch lists afresh).
RECENT_SECONDS = 10.0


def parse_lease_name(name: str) -> tuple[IPv4Network, IPv6Network | None]:
    """The subnets of a key under ``<prefix>/subnets/``, which must be exactly the key
    flannel writes for them. ``x/10.5.3.0-24`` or ``10.5.3.0-24&0F::-64`` would parse to
    the same subnets as a real lease and so alias it: a writer could then replace or, by
    deleting the alias, remove another node's routes everywhere without that node ever
    noticing. Such keys are skipped like any other malformed item.

    :raises SubnetKeyError: not a lease key, or not in the canonical form.
    """
    subnet, ipv6_subnet = parse_subnet_key(name)
    canonical = subnet_key(subnet, ipv6_subnet)
    if name != canonical:
        raise SubnetKeyError(name, f"not the canonical key {canonical!r} (it would alias it)")
    return subnet, ipv6_subnet


def lease_from_kv(kv: StoredKV | StoreEvent, *, now: float | None = None) -> Lease:
    """Parse a stored key/value into a Lease.

    :raises ParseError: the key or value does not parse.
    """
    subnet, ipv6_subnet = parse_lease_name(kv.name)
    attrs = LeaseAttrs.parse(kv.value, key=kv.name)
    now = time.time() if now is None else now
    known_ttl = kv.ttl is not None and not math.isnan(kv.ttl)
    return Lease(
        subnet=subnet,
        ipv6_subnet=ipv6_subnet,
        attrs=attrs,
        expiration=now + kv.ttl if known_ttl and kv.ttl is not None else None,
        reserved=kv.ttl is None,
        # No store_ref: nothing reads it for a listed or watched lease, and each etcd
        # lease id is a 36-byte integer per peer the agent kept (issue 14).
    )


Subnet = IPv4Network | IPv6Network


@dataclass(frozen=True, slots=True)
class _Planning:
    """A listing to plan an acquire from: when it was made (monotonic), its cursor, its
    leases, and the subnets of its keys whose value does not parse."""

    when: float
    cursor: int
    leases: tuple[Lease, ...]
    occupied: set[Subnet]


class EtcdSubnetManager:
    """Subnet manager over a :class:`LeaseStore` (both etcd APIs share it)."""

    def __init__(
        self,
        store: LeaseStore,
        *,
        ttl: int = 86400,
        renew_margin: float = 3600,
        rng: random.Random | None = None,
        relist_seconds: float = 300.0,
        full_relist_seconds: float = 3600.0,
    ) -> None:
        self.store = store
        self.ttl = ttl
        self.renew_margin = renew_margin
        self.rng = rng or random.Random()
        #: How long one watch request lives before it is re-issued from its cursor: an
        #: idle watch stream may be cut silently on the way (a load balancer's or NAT's
        #: idle timeout, 4-6 minutes in the clouds), and nothing would ever arrive again.
        self.relist_seconds = relist_seconds
        #: How often the watch starts over from a full listing instead (a level-triggered
        #: safety net against missed events, pain point 9). Not every re-issue: parsing
        #: 5,000 leases and reconciling them again cost ~0.3 s of CPU, most of an idle
        #: agent's budget if done every 5 minutes (issue 14).
        self.full_relist_seconds = full_relist_seconds
        self.claim_conflicts = 0
        self._watch_restarts = 0
        self._warned: set[str] = set()
        #: The last full listing while it is young: the agent's start lists the leases
        #: for its identity check, then acquires; each listed and parsed all of them
        #: (~0.15 s apiece at 5,000 leases). Acquiring now plans from that listing (its
        #: create is a compare-and-swap, checked for rivals created since: a listing a
        #: moment old is safe). The watch still lists afresh: its snapshot is acted on
        #: before the changes since are replayed, so an old one would make the data plane
        #: drop, for a moment, a peer that joined in between.
        self._recent: _Planning | None = None
        #: The last (or current) config read, and when it was answered (monotonic).
        self._config_read: asyncio.Future[bytes | None] | None = None
        self._config_read_at = 0.0

    @property
    def name(self) -> str:
        # What the operator calls it ("etcd is not answering"); the API is logged once
        # when the agent picks it.
        return "etcd"

    @property
    def watch_restarts(self) -> int:
        return self._watch_restarts

    async def probe(self) -> None:
        await self._read_config(max_age=SHARED_READ_SECONDS)

    async def _read_config(self, *, max_age: float = 0.0) -> bytes | None:
        """The config value. With ``max_age``, a read in flight or one answered that
        recently serves this asker too: the store probe and the 30-s config check wake
        on the same tick and read the same key, one read and one wake-up less."""
        task = self._config_read
        if max_age and task is not None:
            if not task.done():
                return await asyncio.shield(task)
            fresh = time.monotonic() - self._config_read_at <= max_age
            if fresh and not task.cancelled() and task.exception() is None:
                return task.result()
        task = self._config_read = asyncio.ensure_future(self._read_config_now())
        return await asyncio.shield(task)

    async def _read_config_now(self) -> bytes | None:
        """The kept-open connection answers the steady state for a fraction of httpx's
        CPU; any failure there is asked again the full way, so errors and failover
        stay the same."""
        answered, raw = await self.store.quick_config()
        if not answered:
            raw = await self.store.get_config()
        self._config_read_at = time.monotonic()
        return raw

    async def public_ip_override(self) -> PublicIPOverride:
        return PublicIPOverride()  # etcd has no per-node settings

    async def complete_lease(self, lease: Lease) -> None:
        return None  # renewal is the agent's lease loop; nothing to announce

    async def aclose(self) -> None:
        if self._config_read is not None and not self._config_read.done():
            self._config_read.cancel()
        await self.store.aclose()

    # -- config ---------------------------------------------------------------------------

    async def get_network_config(self, *, max_age: float = 0.0) -> NetworkConfig:
        """Read and validate ``<prefix>/config``.

        :raises ConfigNotFound: the key is absent.
        :raises NetworkConfigError: it does not parse or validate.
        :raises StoreUnavailable: etcd did not answer.
        """
        raw = await self._read_config(max_age=max_age)
        if raw is None:
            raise ConfigNotFound(
                f"network config not found in etcd ({self.store.api} API) at the config key; "
                'create it, e.g. `loden config set \'{"Network": "10.244.0.0/16", '
                '"Backend": {"Type": "vxlan"}}\'`'
            )
        return NetworkConfig.parse(raw)

    # -- leases ---------------------------------------------------------------------------

    def _parse_listing(
        self, kvs: tuple[StoredKV, ...], occupied: set[Subnet] | None = None
    ) -> list[Lease]:
        """The leases that parse; ``occupied`` gets the subnets of lease keys whose value
        does not: somebody holds them all the same, and a dual-stack key's create does
        not collide with a key on the same IPv4 subnet but another IPv6 one."""
        now = time.time()
        leases: list[Lease] = []
        for kv in kvs:
            try:
                leases.append(lease_from_kv(kv, now=now))
            except ParseError as exc:
                self._warn_bad(kv.name, kv.value, exc)
                if occupied is not None:
                    with contextlib.suppress(ParseError):
                        subnet, ipv6_subnet = parse_lease_name(kv.name)
                        if subnet != NO_IPV4:
                            occupied.add(subnet)
                        if ipv6_subnet is not None:
                            occupied.add(ipv6_subnet)
        return leases

    def _warn_bad(self, name: str, value: bytes, exc: ParseError) -> None:
        """One warning per bad item (key and value), whether a listing or a watch event
        brought it, however often it is seen again (relists, resyncs)."""
        self._warn_once(
            f"{name}\0{hash(value)}",
            "skipping %s: %s (peers are unaffected; fix or delete it)",
            _clip(name),
            _clip(str(exc)),
        )

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            if len(self._warned) > 10000:
                self._warned.clear()
            self._warned.add(key)
            log.warning(msg, *args)

    async def list_leases(self, *, with_ttl: bool = False) -> list[Lease]:
        listing = await self.store.list(with_ttl=with_ttl)
        occupied: set[Subnet] = set()
        leases = self._parse_listing(listing.kvs, occupied)
        if not with_ttl:
            self._recent = _Planning(time.monotonic(), listing.cursor, tuple(leases), occupied)
        return leases

    def _take_recent(self) -> _Planning | None:
        """The recent listing if younger than :data:`RECENT_SECONDS`; forgotten either way."""
        recent, self._recent = self._recent, None
        if recent is None or time.monotonic() - recent.when > RECENT_SECONDS:
            return None
        return recent

    def _value(self, attrs: LeaseAttrs) -> bytes:
        return attrs.to_json(legacy=self.store.legacy_values).encode()

    async def acquire_lease(self, attrs: LeaseAttrs, previous: PreviousSubnets) -> Lease:
        """Claim a subnet for ``attrs`` (compare-and-swap, retried on lost races).

        :raises SubnetsExhausted: nothing free. :raises StoreUnavailable: etcd down.
        """
        lost: set[Subnet] = set()
        for attempt in range(1, MAX_CLAIM_ATTEMPTS + 1):
            config = await self.get_network_config()
            recent = self._take_recent() if attempt == 1 else None
            if recent is not None:
                cursor, leases, occupied = recent.cursor, list(recent.leases), recent.occupied
            else:
                listing = await self.store.list()
                occupied = set()
                cursor = listing.cursor
                leases = self._parse_listing(listing.kvs, occupied)
                del listing
            plan = allocator.plan(
                config,
                leases,
                attrs,
                previous,
                rng=self.rng,
                exclude=frozenset(lost | occupied),
                window=allocator.CANDIDATE_WINDOW << min(len(lost), 6),
            )
            for dup in plan.duplicates_of_ours:
                log.warning(
                    "lease %s also claims our public IP %s; keeping %s. Delete the "
                    "stale lease if that node is gone",
                    dup.key,
                    attrs.public_ip,
                    plan.choice.lease.key
                    if isinstance(plan.choice, allocator.Reuse)
                    else "a new one",
                )
            for stale in plan.stale_own:
                log.info("deleting our old lease %s: it does not fit the network config", stale.key)
                await self.store.delete(stale.key)
            try:
                if isinstance(plan.choice, allocator.Reuse):
                    old = plan.choice.lease
                    current = await self.store.get(old.key)
                    if current is None:
                        raise LeaseConflict(f"{old.key} vanished")
                    ttl = None if old.reserved else self.ttl
                    kv = await self.store.update(
                        old.key, self._value(attrs), ttl, expect_value=current.value
                    )
                    lease = Lease(
                        old.subnet,
                        attrs,
                        old.ipv6_subnet,
                        expiration=None if ttl is None else time.time() + ttl,
                        reserved=ttl is None,
                        store_ref=kv.ref,
                    )
                    log.info(
                        "found lease %s for current IP %s, reusing%s",
                        old.key,
                        attrs.public_ip,
                        " (a reservation)" if old.reserved else "",
                    )
                    return lease
                choice = plan.choice
                lease = Lease(choice.subnet, attrs, choice.ipv6_subnet)
                kv = await self.store.create(lease.key, self._value(attrs), self.ttl)
                await self._check_rivals(lease, cursor)
                log.info(
                    "allocated lease %s to current node %s (%s)",
                    lease.key,
                    attrs.public_ip if int(attrs.public_ip) else attrs.public_ipv6,
                    choice.reason,
                )
                lease = Lease(
                    lease.subnet,
                    attrs,
                    lease.ipv6_subnet,
                    expiration=time.time() + self.ttl,
                    store_ref=kv.ref,
                )
                return lease
            except LeaseConflict as exc:
                self._recent = None  # somebody else wrote meanwhile: list afresh
                self.claim_conflicts += 1
                if isinstance(plan.choice, allocator.Fresh):
                    lost.add(plan.choice.subnet)
                    if plan.choice.ipv6_subnet is not None:
                        lost.add(plan.choice.ipv6_subnet)
                log.info(
                    "lost the race for a subnet (%s); retrying with another candidate (attempt %d)",
                    exc,
                    attempt,
                )
                await asyncio.sleep(self.rng.uniform(0.0, min(0.02 * attempt, 1.0)))
        raise StoreError(
            f"could not claim a subnet after {MAX_CLAIM_ATTEMPTS} lost races; "
            "is something rewriting <prefix>/subnets?"
        )

    async def _check_rivals(self, lease: Lease, cursor: int) -> None:
        """Did a lease on one of our new subnets appear after the listing we planned from?

        The create's compare-and-swap is on the key, and a dual-stack key holds both
        subnets: two nodes picking the same IPv4 subnet with different IPv6 ones (or the
        other way round, or one of them single-stack) write different keys, and both
        creates succeed. Then each node ignores the other's lease as its own subnet
        and the two can reach nobody through it (seen: 1 start in ~30 of three
        dual-stack nodes at once). The store's creation order decides: the earlier
        lease stays, the later one is deleted by its own node, which picks again.
        Go flanneld does not check: a rival it creates after ours is reported.

        :raises LeaseConflict: we came second (our key is deleted again).
        """
        rivals: list[tuple[int, str]] = []
        mine = 0
        for kv in await self.store.created_since(cursor):
            if kv.name == lease.key:
                mine = kv.created
                continue
            try:
                subnet, ipv6_subnet = parse_lease_name(kv.name)
            except ParseError:
                continue
            if lease.overlaps(subnet, ipv6_subnet):
                rivals.append((kv.created, kv.name))
        if not mine:
            raise LeaseConflict(f"{lease.key} vanished right after we created it")
        first = min(rivals, default=None)
        if first is not None and first[0] < mine:
            await self.store.delete(lease.key, expect_value=self._value(lease.attrs))
            raise LeaseConflict(
                f"{first[1]} was created just before our {lease.key} and overlaps it"
            )
        for _, name in rivals:
            log.warning(
                "lease %s was created just after ours (%s) and overlaps it: its node must "
                "pick another subnet (Loden does by itself; Go flanneld does not check, "
                "restart it there)",
                name,
                lease.key,
            )

    async def renew_lease(self, lease: Lease) -> Lease:
        """Extend our lease (a fresh TTL); re-create it if it vanished and is still free.

        :raises LeaseRevoked: another node now holds our subnet.
        """
        value = self._value(lease.attrs)
        current = await self.store.get(lease.key)
        ttl = None if lease.reserved else self.ttl
        if current is None:
            try:
                kv = await self.store.create(lease.key, value, ttl)
            except LeaseConflict:
                current = await self.store.get(lease.key)
                if current is None:
                    raise LeaseRevoked(f"our lease {lease.key} keeps vanishing") from None
            else:
                try:  # meanwhile another node may hold one of its subnets under another key
                    await self._check_rivals(lease, 0)
                except LeaseConflict as exc:
                    raise LeaseRevoked(
                        f"our lease {lease.key} had vanished, and {exc}; restart to get a "
                        "new subnet"
                    ) from None
                log.warning("our lease %s had vanished from etcd; re-created it", lease.key)
                return _with_expiry(lease, ttl, kv.ref)
        try:
            attrs = LeaseAttrs.parse(current.value, key=lease.key)
        except ParseError:
            attrs = None
        if attrs is None or not allocator.same_owner(lease.attrs, attrs):
            holder = "a malformed lease"
            if attrs is not None:
                holder = str(attrs.public_ip if int(attrs.public_ip) else attrs.public_ipv6)
            raise LeaseRevoked(
                f"our subnet {lease.key} is now held by {holder}; restart to get a new one"
            )
        kv = await self.store.update(lease.key, value, ttl, expect_value=current.value)
        return _with_expiry(lease, ttl, kv.ref)

    def renew_delay(self, lease: Lease) -> float:
        """Seconds until the next renewal: ``--subnet-lease-renew-margin`` before expiry,
        as flanneld (spec §3.3: margin 1439 min renews a 24 h lease after 60 s). The only
        floor is against a busy loop, kept below a third of the TTL so that short test
        TTLs still renew before they expire."""
        floor = min(RENEW_FLOOR_SECONDS, self.ttl / 3)
        remaining = self.ttl if lease.reserved else lease.ttl_remaining()
        if remaining is None:
            remaining = float(self.ttl)
        return max(remaining - self.renew_margin, floor)

    # -- watching -------------------------------------------------------------------------

    def _to_events(self, batch: tuple[StoreEvent, ...]) -> list[LeaseEvent]:
        events: list[LeaseEvent] = []
        for item in batch:
            try:
                if item.kind is StoreEventKind.PUT:
                    events.append(LeaseEvent(EventKind.ADDED, lease_from_kv(item)))
                else:
                    subnet, v6 = parse_lease_name(item.name)
                    events.append(
                        LeaseEvent(
                            EventKind.REMOVED, Lease(subnet, LeaseAttrs(public_ip=_ZERO), v6)
                        )
                    )
            except ParseError as exc:
                if item.kind is StoreEventKind.PUT:
                    self._warn_bad(item.name, item.value, exc)
                else:  # a bad key going away: nothing was ever programmed for it
                    log.debug("ignoring the deletion of %s: %s", item.name, exc)
        return events

    async def watch_leases(
        self, held: Mapping[str, Lease] | None = None
    ) -> AsyncIterator[WatchResult]:
        """Snapshot first, then events; relists after compaction and periodically.

        A listed lease equal to the one ``held`` under its key is given as that object:
        a relist then allocates only what changed (see :meth:`_snapshot`)."""
        backoff = 0.1
        snapshot_needed = True
        cursor = 0
        relist_at = 0.0
        #: While the store is unreachable: when it started and how many retries failed.
        #: One warning per outage, one line when it ends; the retries in between are debug
        #: (a quorum loss used to print a warning every backoff step).
        outage: tuple[float, int] | None = None
        loop = asyncio.get_running_loop()

        def recovered() -> None:
            nonlocal outage
            if outage is not None:
                began, failures = outage
                log.warning(
                    "lease watch resumed after %.0fs (%d failed attempts)",
                    loop.time() - began,
                    failures,
                )
                outage = None

        while True:
            try:
                if snapshot_needed:
                    relist_at = loop.time() + self.full_relist_seconds
                    cursor, snapshot = await self._snapshot(held or {})
                    snapshot_needed = False
                    recovered()
                    yield WatchResult(snapshot=snapshot)
                    del snapshot
                async for batch in self._watch_until_relist(cursor):
                    backoff = 0.1
                    recovered()
                    cursor = batch.cursor
                    events = self._to_events(batch.events)
                    if events or not batch.events:  # none at all: a progress notification
                        yield WatchResult(events=tuple(events))
                # The watch request's time is up: re-issue it from the cursor (nothing is
                # missed: the store replays every change since), or relist when due.
                snapshot_needed = loop.time() >= relist_at
            except WatchCompacted as exc:
                log.info("watch fell behind compaction (%s): relisting", exc)
                self._watch_restarts += 1
                snapshot_needed = True
            except StoreUnavailable as exc:
                self._watch_restarts += 1
                if outage is None:
                    outage = (loop.time(), 1)
                    log.warning(
                        "lease watch interrupted: %s; retrying with backoff up to 5s (peer "
                        "changes are picked up once etcd answers; routes stay as they are)",
                        exc,
                    )
                else:
                    outage = (outage[0], outage[1] + 1)
                    log.debug("lease watch still failing: %s; retry in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _snapshot(self, held: Mapping[str, Lease]) -> tuple[int, tuple[Lease, ...]]:
        """Every lease and the cursor to watch from, read page by page.

        A relist of 5,000 unchanged leases used to make a second set of them all (~4 MB
        with their raw values) for a moment. Freed, it stayed resident: the few objects
        made meanwhile that live on (the new watch request, timers) pinned pymalloc's
        arenas, +3-4 MiB per relist (issue 14). Now each page's raw values go before the
        next page is read, and an unchanged lease is the object already held."""
        cursor = 0
        leases: list[Lease] = []
        async for page in self.store.pages():
            cursor = page.cursor
            leases += (lease.reused_from(held) for lease in self._parse_listing(page.kvs))
            del page
        return cursor, tuple(leases)

    async def _watch_until_relist(self, cursor: int) -> AsyncIterator[WatchBatch]:
        """Store watch batches until ``relist_seconds`` pass.

        The deadline wraps each wait for the next batch only, never the consumer's work
        between batches (a timeout around a ``yield`` would cancel the consumer).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.relist_seconds
        stream = aiter(self.store.watch(cursor))
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        batch = await anext(stream)
                except (TimeoutError, StopAsyncIteration):
                    return
                yield batch
        finally:
            closer = getattr(stream, "aclose", None)
            if closer is not None:
                await closer()


def _with_expiry(lease: Lease, ttl: int | None, ref: int) -> Lease:
    return Lease(
        lease.subnet,
        lease.attrs,
        lease.ipv6_subnet,
        expiration=None if ttl is None else time.time() + ttl,
        reserved=ttl is None,
        store_ref=ref,
    )


_ZERO = IPv4Address("0.0.0.0")


def _clip(text: str, limit: int = 300) -> str:
    """Bound what a hostile key or value can put into one log line, and keep it one
    line (a key with a newline must not forge log lines)."""
    if not text.isprintable():
        text = repr(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
