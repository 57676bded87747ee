"""The subnet manager on a real etcd, through both APIs (v3 gateway and v2 keys)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest

from loden.errors import (
    ConfigError,
    LeaseRevoked,
    StoreAuthError,
    StoreUnavailable,
    SubnetsExhausted,
    WatchCompacted,
)
from loden.model.lease import EventKind, LeaseAttrs
from loden.model.subnet_env import PreviousSubnets
from loden.subnet import open_store
from loden.subnet.manager import EtcdSubnetManager
from loden.subnet.store import LeaseStore
from tests.fixtures.etcd import EtcdCluster, EtcdServer, FixturePKI, etcd_settings

CONFIG = b'{"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}}'


def attrs(n: int) -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(f"192.168.1.{n}"), "host-gw")


@pytest.fixture(params=["v3", "v2"])
def api(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(etcd: EtcdServer, api: str) -> AsyncIterator[LeaseStore]:
    opened = await open_store(etcd_settings([etcd.client_url], api))
    await opened.put_config(CONFIG)
    try:
        yield opened
    finally:
        await opened.aclose()


def manager(store: LeaseStore, seed: int = 1, ttl: int = 86400) -> EtcdSubnetManager:
    return EtcdSubnetManager(store, ttl=ttl, renew_margin=3600, rng=random.Random(seed))


async def test_acquire_restart_and_previous_subnet(store: LeaseStore, api: str) -> None:
    m = manager(store)
    first = await m.acquire_lease(attrs(1), PreviousSubnets())
    raw = await store.get(first.key)
    assert raw is not None
    expected = attrs(1).to_json(legacy=api == "v2").encode()
    assert raw.value == expected  # v2: the seed's {"PublicIP":...,"BackendType":...}
    assert (await m.acquire_lease(attrs(1), PreviousSubnets())).subnet == first.subnet
    prev = PreviousSubnets(subnet=IPv4Network("10.5.99.0/24"))
    assert (await m.acquire_lease(attrs(2), prev)).subnet == IPv4Network("10.5.99.0/24")
    assert (await m.acquire_lease(attrs(3), prev)).subnet != IPv4Network("10.5.99.0/24")


async def test_32_agents_at_once_distinct(store: LeaseStore, etcd: EtcdServer, api: str) -> None:
    # Exactly 32 subnets for 32 nodes: random picks must collide, and every lost race
    # has to be retried for all of them to fit.
    await store.put_config(
        b'{"Network": "10.5.0.0/19", "SubnetMin": "10.5.0.0", "SubnetMax": "10.5.31.0"}'
    )
    stores = [await open_store(etcd_settings([etcd.client_url], api)) for _ in range(32)]
    try:
        managers = [manager(s, seed=i) for i, s in enumerate(stores)]
        leases = await asyncio.gather(
            *(m.acquire_lease(attrs(i + 10), PreviousSubnets()) for i, m in enumerate(managers))
        )
    finally:
        for s in stores:
            await s.aclose()
    assert len({lease.subnet for lease in leases}) == 32
    assert sum(m.claim_conflicts for m in managers) > 0  # the race really happened
    assert len((await store.list()).kvs) == 32


async def test_dual_stack_agents_at_once_never_share_a_subnet(etcd: EtcdServer, api: str) -> None:
    """A dual-stack key holds both subnets, so the create's compare-and-swap does not
    stop two nodes taking the same IPv4 subnet with different IPv6 ones: the creation
    order must (it did not: 1 start in ~30 of three dual-stack agents at once shared
    one, and those two nodes could not reach each other's pods). Four agents on four
    IPv4 subnets and 256 IPv6 ones collide on IPv4 in most rounds."""
    config = (
        b'{"Network": "10.6.0.0/22", "SubnetMin": "10.6.0.0", "EnableIPv6": true,'
        b' "IPv6Network": "fd00:6::/56", "Backend": {"Type": "vxlan"}}'
    )
    conflicts = 0
    for round_ in range(6):
        prefix = f"/loden-race-{round_}-{time.monotonic_ns()}"
        stores = [
            await open_store(etcd_settings([etcd.client_url], api, prefix=prefix)) for _ in range(4)
        ]
        try:
            await stores[0].put_config(config)
            managers = [manager(s, seed=round_ * 10 + i) for i, s in enumerate(stores)]
            leases = await asyncio.gather(
                *(
                    m.acquire_lease(
                        LeaseAttrs(
                            IPv4Address(f"192.168.1.{i + 10}"),
                            "vxlan",
                            public_ipv6=IPv6Address(f"fd99::{i}"),
                        ),
                        PreviousSubnets(),
                    )
                    for i, m in enumerate(managers)
                )
            )
            listed = (await stores[0].list()).kvs
        finally:
            for s in stores:
                await s.aclose()
        assert len({lease.subnet for lease in leases}) == 4, [lease.key for lease in leases]
        assert len({lease.ipv6_subnet for lease in leases}) == 4
        assert sorted(kv.name for kv in listed) == sorted(lease.key for lease in leases)
        conflicts += sum(m.claim_conflicts for m in managers)
    assert conflicts > 0  # the races really happened


async def test_exhaustion(store: LeaseStore) -> None:
    await store.put_config(b'{"Network": "10.5.0.0/22"}')
    m = manager(store)
    for i in range(3):
        await m.acquire_lease(attrs(i), PreviousSubnets())
    with pytest.raises(SubnetsExhausted, match="3 /24 subnets"):
        await m.acquire_lease(attrs(9), PreviousSubnets())


async def test_reservation_respected(store: LeaseStore) -> None:
    await store.create("10.5.1.0-24", attrs(7).to_json().encode(), None)
    m = manager(store)
    for i in range(10):
        lease = await m.acquire_lease(
            attrs(20 + i), PreviousSubnets(subnet=IPv4Network("10.5.1.0/24"))
        )
        assert lease.subnet != IPv4Network("10.5.1.0/24")
    owner = await m.acquire_lease(attrs(7), PreviousSubnets())
    assert owner.subnet == IPv4Network("10.5.1.0/24") and owner.reserved
    stored = await store.list(with_ttl=True)
    assert [kv.ttl for kv in stored.kvs if kv.name == "10.5.1.0-24"] == [None]


async def test_short_ttl_renewal_keeps_the_subnet(store: LeaseStore) -> None:
    m = manager(store, ttl=3)
    lease = await m.acquire_lease(attrs(1), PreviousSubnets())
    deadline = time.monotonic() + 7
    while time.monotonic() < deadline:  # 7 s > 2 TTLs: it would expire without renewal
        await asyncio.sleep(1)
        lease = await m.renew_lease(lease)
    kv = await store.get(lease.key)
    assert kv is not None
    assert (await m.acquire_lease(attrs(1), PreviousSubnets())).subnet == lease.subnet


async def test_expiry_emits_removed(store: LeaseStore) -> None:
    m = manager(store)
    mine = await m.acquire_lease(attrs(1), PreviousSubnets())
    stream = m.watch_leases()
    first = await anext(stream)
    assert first.snapshot is not None and [x.key for x in first.snapshot] == [mine.key]
    short = manager(store, seed=5, ttl=2)
    peer = await short.acquire_lease(attrs(2), PreviousSubnets())
    seen: list[tuple[EventKind, str]] = []
    async with asyncio.timeout(10):
        while (EventKind.REMOVED, peer.key) not in seen:
            result = await anext(stream)
            seen += [(e.kind, e.lease.key) for e in result.events]
    assert seen[0] == (EventKind.ADDED, peer.key)
    await stream.aclose()  # type: ignore[attr-defined]


async def test_own_lease_deleted_is_recreated_or_revoked(store: LeaseStore) -> None:
    m = manager(store)
    lease = await m.acquire_lease(attrs(1), PreviousSubnets())
    await store.delete(lease.key)
    back = await m.renew_lease(lease)
    assert back.subnet == lease.subnet and await store.get(lease.key) is not None
    await store.delete(lease.key)
    await store.create(lease.key, attrs(2).to_json().encode(), 100)
    with pytest.raises(LeaseRevoked):
        await m.renew_lease(back)


async def test_garbage_is_skipped_and_peers_stay(store: LeaseStore) -> None:
    m = manager(store)
    await m.acquire_lease(attrs(1), PreviousSubnets())
    peer = await manager(store, 2).acquire_lease(attrs(2), PreviousSubnets())
    await store.create("10.5.200.0-24", b"not json", 100)
    await store.create("not-a-subnet", b"{}", 100)
    stream = m.watch_leases()
    first = await anext(stream)
    assert first.snapshot is not None
    assert peer.key in {x.key for x in first.snapshot}
    late = await manager(store, 3).acquire_lease(attrs(3), PreviousSubnets())
    await store.create("10.5.201.0-24", b'{"PublicIP":"1.2.3"}', 100)
    async with asyncio.timeout(10):
        result = await anext(stream)
    assert [(e.kind, e.lease.key) for e in result.events] == [(EventKind.ADDED, late.key)]
    await stream.aclose()  # type: ignore[attr-defined]


async def test_tls_with_client_certificates(etcd_tls: EtcdServer, api: str) -> None:
    pki = etcd_tls.pki
    assert isinstance(pki, FixturePKI)
    good = etcd_settings(
        [etcd_tls.client_url],
        api,
        cafile=str(pki.ca_cert),
        certfile=str(pki.client_cert),
        keyfile=str(pki.client_key),
    )
    store = await open_store(good)
    try:
        await store.put_config(CONFIG)
        lease = await manager(store).acquire_lease(attrs(1), PreviousSubnets())
        assert lease.subnet.prefixlen == 24
    finally:
        await store.aclose()
    # No client certificate: a clear auth error, never a plaintext retry.
    bare = await open_store(etcd_settings([etcd_tls.client_url], api, cafile=str(pki.ca_cert)))
    try:
        with pytest.raises((StoreAuthError, StoreUnavailable)) as info:
            await bare.get_config()
        assert "certificate" in str(info.value).lower() or "tls" in str(info.value).lower()
    finally:
        await bare.aclose()
    # A CA that did not sign the server: verification fails with the TLS error named.
    rogue = await open_store(
        etcd_settings(
            [etcd_tls.client_url],
            api,
            cafile=str(pki.rogue_ca_cert),
            certfile=str(pki.client_cert),
            keyfile=str(pki.client_key),
        )
    )
    try:
        with pytest.raises(StoreAuthError, match="TLS with etcd"):
            await rogue.get_config()
    finally:
        await rogue.aclose()
    with pytest.raises(ConfigError, match="not found"):
        await open_store(
            etcd_settings(
                [etcd_tls.client_url],
                api,
                cafile="/nonexistent/ca.pem",
                certfile=str(pki.client_cert),
                keyfile=str(pki.client_key),
            )
        )


async def test_ca_bundle_variables_do_not_break_tls(
    etcd_tls: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = etcd_tls.pki
    assert pki is not None
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.setenv(var, "/nonexistent/bundle.pem")
    store = await open_store(
        etcd_settings(
            [etcd_tls.client_url],
            "v3",
            cafile=str(pki.ca_cert),
            certfile=str(pki.client_cert),
            keyfile=str(pki.client_key),
        )
    )
    try:
        assert await store.get_config() is None
    finally:
        await store.aclose()


async def test_cluster_member_killed(etcd_cluster: EtcdCluster, api: str) -> None:
    store = await open_store(etcd_settings(etcd_cluster.client_urls, api))
    try:
        await store.put_config(CONFIG)
        m = manager(store)
        lease = await m.acquire_lease(attrs(1), PreviousSubnets())
        etcd_cluster.kill(0)  # the member we were talking to
        began = time.monotonic()
        async with asyncio.timeout(20):
            while True:
                try:
                    lease = await m.renew_lease(lease)
                    break
                except StoreUnavailable:
                    await asyncio.sleep(0.2)
        print(f"recovered after member kill in {time.monotonic() - began:.2f}s")
        other = await manager(store, 9).acquire_lease(attrs(2), PreviousSubnets())
        assert other.subnet != lease.subnet
    finally:
        await store.aclose()


async def test_auto_detects_the_api_that_has_the_config(etcd: EtcdServer) -> None:
    v2 = await open_store(etcd_settings([etcd.client_url], "v2", prefix="/v2only/network"))
    await v2.put_config(CONFIG)
    await v2.aclose()
    auto = await open_store(etcd_settings([etcd.client_url], "auto", prefix="/v2only/network"))
    try:
        assert auto.api == "v2"
    finally:
        await auto.aclose()
    v3 = await open_store(etcd_settings([etcd.client_url], "v3", prefix="/v3only/network"))
    await v3.put_config(CONFIG)
    await v3.aclose()
    auto = await open_store(etcd_settings([etcd.client_url], "auto", prefix="/v3only/network"))
    try:
        assert auto.api == "v3"
    finally:
        await auto.aclose()


async def test_username_password_auth_v3(etcd: EtcdServer) -> None:
    etcd.etcdctl("user", "add", "root:s3cret")
    etcd.etcdctl("auth", "enable")
    good = etcd_settings([etcd.client_url], "v3", username="root", password="s3cret")
    store = await open_store(good)
    try:
        await store.put_config(CONFIG)
        lease = await manager(store).acquire_lease(attrs(1), PreviousSubnets())
        stream = manager(store).watch_leases()
        first = await anext(stream)
        assert first.snapshot is not None and [x.key for x in first.snapshot] == [lease.key]
        await stream.aclose()  # type: ignore[attr-defined]
    finally:
        await store.aclose()
    bad = await open_store(
        etcd_settings([etcd.client_url], "v3", username="root", password="wrong")
    )
    try:
        with pytest.raises(StoreAuthError, match="authentication as 'root' failed"):
            await bad.get_config()
    finally:
        await bad.aclose()
    anonymous = await open_store(etcd_settings([etcd.client_url], "v3"))
    try:
        with pytest.raises(StoreAuthError):
            await anonymous.get_config()
    finally:
        await anonymous.aclose()


async def test_listing_reads_in_pages_at_one_revision(
    store: LeaseStore, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """etcd v3 lists in pages (issue 14: a 5,000-lease reply decoded at once cost RSS);
    every lease comes back once, and a write between pages is not half-seen."""
    if api != "v3":
        pytest.skip("v2 has no paged range")
    from loden.subnet import etcd_v3

    monkeypatch.setattr(etcd_v3, "LIST_PAGE", 4)
    names = [f"10.5.{i}.0-24" for i in range(1, 12)]
    for i, name in enumerate(names):
        await store.create(name, attrs(i).to_json().encode(), None)
    listing = await store.list()
    assert sorted(kv.name for kv in listing.kvs) == sorted(names)
    original = store._post  # type: ignore[attr-defined]
    calls = 0

    async def post_then_write(path: str, body: dict[str, object]) -> object:
        nonlocal calls
        reply = await original(path, body)
        calls += 1
        if path == "kv/range" and calls == 1:  # between the first and the second page
            await store.create("10.5.200.0-24", attrs(99).to_json().encode(), None)
        return reply

    monkeypatch.setattr(store, "_post", post_then_write)
    paged = await store.list()
    assert calls >= 3
    assert sorted(kv.name for kv in paged.kvs) == sorted(names)
    assert paged.cursor == listing.cursor
    # The agent's relist reads page by page (issue 14): pages of LIST_PAGE, one cursor.
    monkeypatch.setattr(store, "_post", original)
    pages = [page async for page in store.pages()]
    assert [len(page.kvs) for page in pages] == [4, 4, 4]
    assert {page.cursor for page in pages} == {pages[0].cursor}
    # Compacted between two pages: list() reads again from the start; pages() cannot
    # take back what it gave, so it says so (the agent relists).
    compactions = 0
    made: list[str] = []

    async def post_then_compact(path: str, body: dict[str, object]) -> object:
        nonlocal compactions
        reply = await original(path, body)
        if path == "kv/range" and compactions == 0:
            compactions += 1
            name = f"10.5.{200 + compactions + len(made)}.0-24"
            made.append(name)
            await store.create(name, attrs(98).to_json().encode(), None)
            latest = await original("kv/range", {"key": body["key"], "limit": 1})
            await original("kv/compaction", {"revision": latest["header"]["revision"]})
        return reply

    monkeypatch.setattr(store, "_post", post_then_compact)
    relisted = await store.list()
    assert made[0] in {kv.name for kv in relisted.kvs}
    assert relisted.cursor > paged.cursor
    compactions = 0
    with pytest.raises(WatchCompacted, match="compacted"):
        async for _ in store.pages():
            pass


async def test_v3_progress_notifications_are_yielded_as_signs_of_life(
    etcd_server: Callable[..., EtcdServer],
) -> None:
    """An idle watch still proves the store alive (the agent's probe then stays quiet):
    each etcd progress notification is one result without snapshot or events."""
    server = etcd_server(
        enable_v2=False, extra_args=["--experimental-watch-progress-notify-interval=500ms"]
    )
    opened = await open_store(etcd_settings([server.client_url], "v3"))
    try:
        await opened.put_config(CONFIG)
        m = manager(opened)
        await m.acquire_lease(attrs(1), PreviousSubnets())
        stream = m.watch_leases()
        first = await anext(stream)
        assert first.snapshot is not None
        async with asyncio.timeout(10):
            quiet = await anext(stream)
        assert quiet.snapshot is None and quiet.events == ()
        # A real change after it is still delivered as an event.
        peer = await manager(opened, 2).acquire_lease(attrs(2), PreviousSubnets())
        async with asyncio.timeout(10):
            while not (result := await anext(stream)).events:
                assert result.snapshot is None
        assert [e.lease.key for e in result.events] == [peer.key]
        await stream.aclose()  # type: ignore[attr-defined]
    finally:
        await opened.aclose()
