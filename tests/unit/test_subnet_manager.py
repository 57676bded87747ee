"""Subnet manager policy on the in-memory store (the same cases run on real etcd in
tests/integration/test_subnet_etcd.py)."""

from __future__ import annotations

import asyncio
import logging
import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest

from loden.errors import LeaseRevoked, StoreUnavailable, SubnetsExhausted
from loden.model.lease import EventKind, LeaseAttrs
from loden.model.subnet_env import PreviousSubnets
from loden.subnet import allocator
from loden.subnet.manager import EtcdSubnetManager
from loden.subnet.memory import MemoryStore
from loden.subnet.store import Listing, StoredKV

CONFIG = b'{"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}}'


def attrs(n: int) -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(f"192.168.1.{n}"), "host-gw")


async def manager(store: MemoryStore, seed: int = 1, ttl: int = 86400) -> EtcdSubnetManager:
    return EtcdSubnetManager(store, ttl=ttl, renew_margin=3600, rng=random.Random(seed))


async def test_acquire_reuse_and_previous() -> None:
    store = MemoryStore()
    await store.put_config(CONFIG)
    m = await manager(store)
    first = await m.acquire_lease(attrs(1), PreviousSubnets())
    assert first.subnet.subnet_of(IPv4Network("10.5.0.0/16")) and first.subnet.prefixlen == 24
    assert first.subnet != IPv4Network("10.5.0.0/24")  # SubnetMin skips the first subnet
    again = await m.acquire_lease(attrs(1), PreviousSubnets())
    assert again.subnet == first.subnet
    prev = PreviousSubnets(subnet=IPv4Network("10.5.77.0/24"))
    other = await m.acquire_lease(attrs(2), prev)
    assert other.subnet == IPv4Network("10.5.77.0/24")
    # A third node with the same previous subnet must NOT get it (pain point 3).
    third = await m.acquire_lease(attrs(3), prev)
    assert third.subnet != IPv4Network("10.5.77.0/24")
    assert len({first.subnet, other.subnet, third.subnet}) == 3


async def test_config_change_moves_to_the_new_range() -> None:
    store = MemoryStore()
    await store.put_config(CONFIG)
    m = await manager(store)
    old = await m.acquire_lease(attrs(1), PreviousSubnets())
    await store.put_config(b'{"Network": "10.5.0.0/16", "SubnetLen": 26}')
    new = await m.acquire_lease(attrs(1), PreviousSubnets(subnet=old.subnet))
    assert new.subnet.prefixlen == 26
    names = [kv.name for kv in (await store.list()).kvs]
    assert names == [new.key]


async def test_many_agents_at_once_get_distinct_subnets() -> None:
    store = MemoryStore()
    await store.put_config(CONFIG)
    managers = [await manager(store, seed=0) for _ in range(32)]  # same seed: max collisions
    leases = await asyncio.gather(
        *(m.acquire_lease(attrs(i), PreviousSubnets()) for i, m in enumerate(managers))
    )
    assert len({lease.subnet for lease in leases}) == 32


async def test_exhaustion_names_the_limits() -> None:
    store = MemoryStore()
    await store.put_config(b'{"Network": "10.5.0.0/22"}')  # SubnetLen 24: 3 usable subnets
    m = await manager(store)
    for i in range(3):
        await m.acquire_lease(attrs(i), PreviousSubnets())
    with pytest.raises(SubnetsExhausted, match="all 3 /24 subnets of Network 10.5.0.0/22"):
        await m.acquire_lease(attrs(9), PreviousSubnets())


async def test_reservation_is_honoured_and_stays_a_reservation() -> None:
    store = MemoryStore()
    await store.put_config(CONFIG)
    await store.create("10.5.1.0-24", attrs(7).to_json().encode(), None)
    m = await manager(store)
    for i in range(20):
        assert (
            await m.acquire_lease(attrs(i + 20), PreviousSubnets(subnet=IPv4Network("10.5.1.0/24")))
        ).subnet != IPv4Network("10.5.1.0/24")
    owner = await m.acquire_lease(attrs(7), PreviousSubnets())
    assert owner.subnet == IPv4Network("10.5.1.0/24") and owner.reserved
    kv = await store.get("10.5.1.0-24")
    assert kv is not None and kv.ttl is None


async def test_renewal_and_vanished_lease_is_recreated() -> None:
    store = MemoryStore()
    await store.put_config(CONFIG)
    m = await manager(store)
    lease = await m.acquire_lease(attrs(1), PreviousSubnets())
    renewed = await m.renew_lease(lease)
    assert renewed.subnet == lease.subnet
    await store.delete(lease.key)
    back = await m.renew_lease(renewed)
    assert back.subnet == lease.subnet and await store.get(lease.key) is not None
    # Taken by someone else: revoked.
    await store.delete(lease.key)
    await store.create(lease.key, attrs(2).to_json().encode(), 100)
    with pytest.raises(LeaseRevoked, match="192.168.1.2"):
        await m.renew_lease(back)


async def test_watch_skips_garbage_and_keeps_peers() -> None:
    store = MemoryStore()
    await store.put_config(CONFIG)
    m = await manager(store)
    a = await m.acquire_lease(attrs(1), PreviousSubnets())
    stream = m.watch_leases()
    first = await anext(stream)
    assert first.snapshot is not None and [x.key for x in first.snapshot] == [a.key]
    await store.create("garbage-key", b"{}", 100)
    await store.create("10.5.200.0-24", b"not json", 100)
    b = await (await manager(store, 2)).acquire_lease(attrs(2), PreviousSubnets())
    result = await asyncio.wait_for(anext(stream), 5)
    assert [(e.kind, e.lease.key) for e in result.events] == [(EventKind.ADDED, b.key)]
    await store.delete(b.key)
    result = await asyncio.wait_for(anext(stream), 5)
    assert [(e.kind, e.lease.key) for e in result.events] == [(EventKind.REMOVED, b.key)]
    # Events happen while the stream is down, then history is compacted away: the
    # resumed watch cannot replay them, so the manager relists.
    await store.create("10.5.201.0-24", attrs(5).to_json().encode(), 100)
    store.compact()
    store.break_watches()
    result = await asyncio.wait_for(anext(stream), 5)
    assert result.snapshot is not None  # compaction -> relist
    assert {x.key for x in result.snapshot} == {a.key, "10.5.201.0-24"}
    await stream.aclose()  # type: ignore[attr-defined]


async def test_a_snapshot_gives_the_held_object_of_an_unchanged_lease() -> None:
    """A relist makes new objects only for what changed (issue 14): an equal lease the
    caller holds is given as that object, a changed or new one as a new object."""
    store = MemoryStore()
    await store.put_config(CONFIG)
    m = await manager(store)
    peers = [
        await (await manager(store, n)).acquire_lease(attrs(n), PreviousSubnets()) for n in (2, 3)
    ]
    first = await anext(m.watch_leases())
    assert first.snapshot is not None
    held = {lease.key: lease for lease in first.snapshot}
    await store.update(
        peers[1].key, attrs(9).to_json().encode(), 100, expect_value=attrs(3).to_json().encode()
    )
    stream = m.watch_leases(held)
    again = await anext(stream)
    assert again.snapshot is not None
    by_key = {lease.key: lease for lease in again.snapshot}
    assert by_key[peers[0].key] is held[peers[0].key]
    assert by_key[peers[1].key] is not held[peers[1].key]
    assert by_key[peers[1].key].attrs == attrs(9)
    await stream.aclose()  # type: ignore[attr-defined]


class FlakyStore(MemoryStore):
    """Answers ``list`` only after ``failures`` calls have failed (a quorum loss)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def list(self, *, with_ttl: bool = False) -> Listing:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("etcd cluster is unavailable or misconfigured")
        return await super().list(with_ttl=with_ttl)


async def test_watch_outage_is_one_warning_and_one_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FlakyStore(failures=3)
    await store.put_config(CONFIG)
    m = await manager(store)
    stream = m.watch_leases()
    with caplog.at_level(logging.DEBUG, logger="loden.subnet.manager"):
        first = await asyncio.wait_for(anext(stream), 10)
    assert first.snapshot == ()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("lease watch interrupted: etcd cluster is unavailable")
    assert (
        warnings[1].startswith("lease watch resumed after") and "(3 failed attempts)" in warnings[1]
    )
    assert m.watch_restarts == 3
    await stream.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("margin_minutes", "expected"),
    [(60, 23 * 3600), (1439, 60), (1, 86400 - 60)],
)
async def test_renewal_honours_the_margin_as_flanneld(margin_minutes: int, expected: int) -> None:
    """Spec §3.3: renew ``margin`` before expiry, whatever the margin (a margin of 1439
    minutes used to be overridden by a third of the TTL: 8 h instead of 60 s)."""
    store = MemoryStore()
    await store.put_config(CONFIG)
    m = EtcdSubnetManager(store, ttl=86400, renew_margin=margin_minutes * 60)
    lease = await m.acquire_lease(attrs(1), PreviousSubnets())
    assert m.renew_delay(lease) == pytest.approx(expected, abs=5)


async def test_renewal_floor_only_against_a_busy_loop() -> None:
    """A margin longer than a (test-only) TTL renews at the floor, not in a loop, and
    still several times before the lease expires."""
    store = MemoryStore()
    await store.put_config(CONFIG)
    m = EtcdSubnetManager(store, ttl=3, renew_margin=3600)
    lease = await m.acquire_lease(attrs(1), PreviousSubnets())
    assert 0.5 <= m.renew_delay(lease) <= 1.0


class CountingStore(MemoryStore):
    """Counts full listings (each one costs ~0.15 s of parsing at 5,000 leases)."""

    def __init__(self) -> None:
        super().__init__()
        self.lists = 0

    async def list(self, *, with_ttl: bool = False) -> Listing:
        self.lists += 1
        return await super().list(with_ttl=with_ttl)


async def test_acquire_reuses_the_start_listing_and_the_watch_lists_afresh() -> None:
    """The agent's start: list (identity check), acquire, watch. Acquiring plans from
    the start's listing; the watch lists afresh, so its snapshot, which is acted on
    before any replayed change, holds a peer that joined in between (the cloud
    backends delete every route a snapshot lacks)."""
    store = CountingStore()
    await store.put_config(CONFIG)
    peers = [
        await (await manager(store, n)).acquire_lease(attrs(n), PreviousSubnets()) for n in (2, 3)
    ]
    store.lists = 0
    m = await manager(store)
    listed = await m.list_leases()
    assert {x.key for x in listed} == {p.key for p in peers} and store.lists == 1
    late = await (await manager(store, 9)).acquire_lease(attrs(9), PreviousSubnets())
    store.lists = 1
    ours = await m.acquire_lease(attrs(1), PreviousSubnets())
    assert ours.subnet not in {p.subnet for p in peers}
    assert store.lists == 1  # acquire reused the listing
    stream = m.watch_leases()
    first = await anext(stream)
    assert store.lists == 2
    assert first.snapshot is not None
    assert {x.key for x in first.snapshot} == {p.key for p in peers} | {ours.key, late.key}
    await stream.aclose()  # type: ignore[attr-defined]


async def test_an_old_listing_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("loden.subnet.manager.RECENT_SECONDS", 0.0)
    store = CountingStore()
    await store.put_config(CONFIG)
    m = await manager(store)
    await m.list_leases()
    await asyncio.sleep(0.01)
    await m.acquire_lease(attrs(1), PreviousSubnets())
    stream = m.watch_leases()
    await anext(stream)
    assert store.lists == 3
    await stream.aclose()  # type: ignore[attr-defined]


async def test_watch_is_reissued_from_its_cursor_and_relists_only_when_due() -> None:
    """A watch request is re-issued every ``relist_seconds`` (an idle stream may be cut
    on the way without notice); a full listing only every ``full_relist_seconds``."""
    store = CountingStore()
    await store.put_config(CONFIG)
    m = EtcdSubnetManager(store, relist_seconds=0.05, full_relist_seconds=3600)
    stream = m.watch_leases()
    first = await anext(stream)
    assert first.snapshot == () and store.lists == 1
    await asyncio.sleep(0.3)  # several re-issues, nothing changed meanwhile
    peer = await (await manager(store, 2)).acquire_lease(attrs(2), PreviousSubnets())
    result = await asyncio.wait_for(anext(stream), 5)
    assert result.snapshot is None
    assert [(e.kind, e.lease.key) for e in result.events] == [(EventKind.ADDED, peer.key)]
    assert store.lists == 2  # only the peer's own acquire listed, the watch did not
    await stream.aclose()  # type: ignore[attr-defined]

    due = EtcdSubnetManager(store, relist_seconds=0.05, full_relist_seconds=0.0)
    stream = due.watch_leases()
    await anext(stream)
    again = await asyncio.wait_for(anext(stream), 5)
    assert again.snapshot is not None and {x.key for x in again.snapshot} == {peer.key}
    await stream.aclose()  # type: ignore[attr-defined]


DUAL = (
    b'{"Network": "10.5.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:5::/56",'
    b' "Backend": {"Type": "vxlan"}}'
)


def attrs6(n: int) -> LeaseAttrs:
    return LeaseAttrs(
        IPv4Address(f"192.168.1.{n}"), "host-gw", public_ipv6=IPv6Address(f"fd99::{n}")
    )


def pick_once(monkeypatch: pytest.MonkeyPatch, subnet: str, subnet6: str) -> None:
    """The allocator's first plan is ``subnet``/``subnet6`` (as if a listing older than a
    rival's create said it was free); later plans are the real ones."""
    real = allocator.plan
    calls = []

    def plan(*args: Any, **kwargs: Any) -> allocator.Plan:
        calls.append(1)
        if len(calls) == 1:
            fresh = allocator.Fresh(IPv4Network(subnet), IPv6Network(subnet6), "test pick")
            return allocator.Plan(fresh)
        return real(*args, **kwargs)

    monkeypatch.setattr(allocator, "plan", plan)


async def test_dual_stack_rival_created_first_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """The create's compare-and-swap is on the key, which holds both subnets: a rival on
    our IPv4 subnet with another IPv6 one is found by the creation order, and the later
    lease (ours) is deleted and chosen again."""
    store = MemoryStore()
    await store.put_config(DUAL)
    m = await manager(store)
    await m.list_leases()  # the listing acquire plans from: before the rival
    rival = "10.5.7.0-24&fd00:5:0:9::-64"
    await store.create(rival, attrs6(9).to_json().encode(), 86400)
    pick_once(monkeypatch, "10.5.7.0/24", "fd00:5:0:3::/64")
    lease = await m.acquire_lease(attrs6(1), PreviousSubnets())
    assert lease.subnet != IPv4Network("10.5.7.0/24")
    assert m.claim_conflicts == 1
    assert sorted(kv.name for kv in (await store.list()).kvs) == sorted([rival, lease.key])


async def test_dual_stack_rival_created_after_ours_is_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A rival created after our lease (a Go flanneld node, which does not check) leaves
    ours alone; the log names it. Also the IPv6 side alone overlapping counts."""
    store = MemoryStore()
    await store.put_config(DUAL)
    m = await manager(store)
    rival = "10.5.8.0-24&fd00:5:0:3::-64"
    create = store.create

    async def create_then_rival(name: str, value: bytes, ttl: int | None) -> StoredKV:
        kv = await create(name, value, ttl)
        if name != rival:
            await create(rival, attrs6(9).to_json().encode(), 86400)
        return kv

    monkeypatch.setattr(store, "create", create_then_rival)
    pick_once(monkeypatch, "10.5.7.0/24", "fd00:5:0:3::/64")
    with caplog.at_level(logging.WARNING):
        lease = await m.acquire_lease(attrs6(1), PreviousSubnets())
    assert lease.key == "10.5.7.0-24&fd00:5:0:3::-64" and m.claim_conflicts == 0
    assert f"lease {rival} was created just after ours" in caplog.text
    assert sorted(kv.name for kv in (await store.list()).kvs) == sorted([rival, lease.key])


async def test_keys_whose_value_does_not_parse_still_hold_their_subnets() -> None:
    """Skipped as peers, but not free: another IPv6 subnet with the same IPv4 one makes
    another key, which the create's compare-and-swap would let through."""
    store = MemoryStore()
    await store.put_config(
        b'{"Network": "10.5.0.0/22", "SubnetMin": "10.5.0.0", "EnableIPv6": true,'
        b' "IPv6Network": "fd00:5::/62", "Backend": {"Type": "vxlan"}}'
    )
    for n in range(3):
        await store.create(f"10.5.{n}.0-24&fd00:5:0:{n}::-64", b"{not json", 86400)
    m = await manager(store)
    lease = await m.acquire_lease(attrs6(1), PreviousSubnets())
    assert lease.key == "10.5.3.0-24&fd00:5:0:3::-64"


async def test_vanished_dual_stack_lease_is_not_recreated_over_a_rival() -> None:
    store = MemoryStore()
    await store.put_config(DUAL)
    m = await manager(store)
    lease = await m.acquire_lease(attrs6(1), PreviousSubnets())
    await store.delete(lease.key)
    assert lease.ipv6_subnet is not None
    rival = f"{lease.subnet.network_address}-24&fd00:5:0:ff::-64"
    await store.create(rival, attrs6(9).to_json().encode(), 86400)
    with pytest.raises(LeaseRevoked, match="was created just before our"):
        await m.renew_lease(lease)
    assert [kv.name for kv in (await store.list()).kvs] == [rival]


async def test_probe_and_config_check_on_one_tick_share_one_read() -> None:
    """They wake on the same tick and read the same key: one read answers both; a read
    older than max_age, or a caller without it (acquire, start), asks again."""
    store = MemoryStore()
    await store.put_config(CONFIG)
    m = await manager(store)
    before = store.requests
    await asyncio.gather(m.probe(), m.get_network_config(max_age=1.0))
    assert store.requests - before == 1
    await m.get_network_config(max_age=1.0)  # answered just now: no second read
    assert store.requests - before == 1
    await m.get_network_config()
    assert store.requests - before == 2
    await asyncio.sleep(0.05)
    await m.get_network_config(max_age=0.01)
    assert store.requests - before == 3
    await store.put_config(b'{"Network": "10.6.0.0/16"}')
    assert str((await m.get_network_config()).network) == "10.6.0.0/16"
