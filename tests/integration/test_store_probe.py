"""The /healthz probe's fast path (a kept-open h11 connection) on a real etcd: it reads
the config without httpx while etcd answers, and every failure is re-asked through the
full httpx path, so outages, TLS, auth and failover behave exactly as before."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from loden.errors import StoreAuthError, StoreUnavailable
from loden.model.config import NetworkConfig
from loden.subnet import open_store
from loden.subnet.etcd_v2 import EtcdV2Store
from loden.subnet.etcd_v3 import EtcdV3Store
from loden.subnet.manager import EtcdSubnetManager
from loden.subnet.store import LeaseStore
from tests.fixtures.etcd import EtcdCluster, EtcdServer, FixturePKI, etcd_settings

CONFIG = b'{"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}}'
PROBES = 25


@pytest.fixture(params=["v3", "v2"])
def api(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def count_httpx(store: LeaseStore) -> Callable[[], int]:
    """Counts every request the store's httpx client sends from now on."""
    assert isinstance(store, EtcdV3Store | EtcdV2Store)
    sent: list[str] = []

    async def hook(request: httpx.Request) -> None:
        sent.append(str(request.url))

    store.http._client.event_hooks["request"].append(hook)
    return lambda: len(sent)


def connects(store: LeaseStore) -> int:
    assert isinstance(store, EtcdV3Store | EtcdV2Store)
    return store.http._quick.connects


def manager(store: LeaseStore) -> EtcdSubnetManager:
    return EtcdSubnetManager(store, ttl=86400, renew_margin=3600, rng=random.Random(1))


@pytest.fixture
async def opened(etcd: EtcdServer, api: str) -> AsyncIterator[LeaseStore]:
    store = await open_store(etcd_settings([etcd.client_url], api))
    try:
        yield store
    finally:
        await store.aclose()


async def probes_without_httpx(store: LeaseStore, n: int = PROBES) -> None:
    """``n`` probes answer on one kept-open connection and send nothing through httpx."""
    m = manager(store)
    await m.probe()  # may open the connection (or authenticate through httpx)
    sent, opened = count_httpx(store), connects(store)
    for _ in range(n):
        await m.probe()
    assert sent() == 0
    assert connects(store) == opened  # the same connection every time


async def test_fast_path_sends_nothing_through_httpx(opened: LeaseStore) -> None:
    # Absent config: an answer too (v3: no kvs; v2: 404 "Key not found").
    await probes_without_httpx(opened)
    await opened.put_config(CONFIG)
    await probes_without_httpx(opened)
    assert connects(opened) == 1


async def test_config_checks_take_the_fast_path_and_read_the_same(opened: LeaseStore) -> None:
    """The agent's config check (every 30 s) reads the config the probe reads: on the
    kept-open connection, and exactly what the full path reads."""
    await opened.put_config(CONFIG)
    m = manager(opened)
    full = NetworkConfig.parse(await opened.get_config() or b"")
    await m.get_network_config()
    sent = count_httpx(opened)
    for _ in range(5):
        assert await m.get_network_config() == full
    assert sent() == 0


async def test_outage_raises_as_before_and_recovery_is_fast_again(
    etcd: EtcdServer, opened: LeaseStore
) -> None:
    await opened.put_config(CONFIG)
    m = manager(opened)
    await probes_without_httpx(opened, 3)
    etcd.kill()
    with pytest.raises(StoreUnavailable) as probed:
        await m.probe()
    with pytest.raises(StoreUnavailable) as read:
        await opened.get_config()
    # The probe's error is the full path's, word for word.
    assert str(probed.value) == str(read.value)
    assert str(probed.value).startswith(f"etcd unreachable: {etcd.client_url}: ")
    etcd.restart()
    await m.probe()
    await probes_without_httpx(opened)


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
        await probes_without_httpx(store)
    finally:
        await store.aclose()
    # No client certificate: the fast path fails, the probe says what the full path says.
    bare = await open_store(etcd_settings([etcd_tls.client_url], api, cafile=str(pki.ca_cert)))
    try:
        with pytest.raises((StoreAuthError, StoreUnavailable)) as probed:
            await manager(bare).probe()
        with pytest.raises((StoreAuthError, StoreUnavailable)) as read:
            await bare.get_config()
        # With TLS 1.3 the server's refusal of a missing client certificate arrives
        # either during the handshake (StoreAuthError) or at the first read
        # (StoreUnavailable): two calls of the full path itself may differ, so only
        # the endpoint named in both is compared.
        endpoint = etcd_tls.client_url.split("//", 1)[1]
        assert endpoint in str(probed.value) and endpoint in str(read.value)
        assert connects(bare) == 1  # tried once, closed: nothing kept open
    finally:
        await bare.aclose()
    # A CA that did not sign the server: the TLS error, as before.
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
            await manager(rogue).probe()
    finally:
        await rogue.aclose()


async def test_v3_username_password_and_an_expired_token(etcd: EtcdServer) -> None:
    etcd.etcdctl("user", "add", "root:s3cret")
    etcd.etcdctl("auth", "enable")
    store = await open_store(
        etcd_settings([etcd.client_url], "v3", username="root", password="s3cret")
    )
    try:
        await store.put_config(CONFIG)
        await probes_without_httpx(store)
        # A token etcd no longer knows (as after its TTL): the full path authenticates
        # again, and the probe is fast again with the new token.
        assert isinstance(store, EtcdV3Store)
        store.http.headers["Authorization"] = "expired.token.value"
        sent = count_httpx(store)
        await manager(store).probe()
        assert sent() >= 2  # the refused read, authenticate, the read again
        assert store.http.headers["Authorization"] != "expired.token.value"
        await probes_without_httpx(store)
    finally:
        await store.aclose()
    bad = await open_store(
        etcd_settings([etcd.client_url], "v3", username="root", password="wrong")
    )
    try:
        with pytest.raises(StoreAuthError, match="authentication as 'root' failed"):
            await manager(bad).probe()
    finally:
        await bad.aclose()
    anonymous = await open_store(etcd_settings([etcd.client_url], "v3"))
    try:
        with pytest.raises(StoreAuthError):
            await manager(anonymous).probe()
    finally:
        await anonymous.aclose()


async def test_probe_follows_the_failover(etcd_cluster: EtcdCluster, api: str) -> None:
    store = await open_store(etcd_settings(etcd_cluster.client_urls, api))
    try:
        assert isinstance(store, EtcdV3Store | EtcdV2Store)
        await store.put_config(CONFIG)
        await probes_without_httpx(store)
        assert store.http.current == etcd_cluster.client_urls[0]
        etcd_cluster.kill(0)
        await manager(store).probe()  # the full path fails over; no error
        assert store.http.current != etcd_cluster.client_urls[0]
        await probes_without_httpx(store)  # now on the member that answered
        assert connects(store) == 2
    finally:
        await store.aclose()


async def test_v2_basic_auth(etcd: EtcdServer) -> None:
    admin = httpx.AsyncClient(base_url=etcd.client_url, trust_env=False)
    try:
        created = await admin.put("/v2/auth/users/root", json={"user": "root", "password": "pw"})
        assert created.status_code == 201, created.text
        assert (await admin.put("/v2/auth/enable")).status_code == 200
        # Without this, anonymous requests still read everything (the guest role).
        revoke = {"role": "guest", "revoke": {"kv": {"read": ["/*"], "write": ["/*"]}}}
        guest = await admin.put("/v2/auth/roles/guest", json=revoke, auth=("root", "pw"))
        assert guest.status_code == 200, guest.text
    finally:
        await admin.aclose()
    store = await open_store(etcd_settings([etcd.client_url], "v2", username="root", password="pw"))
    try:
        await store.put_config(CONFIG)
        await probes_without_httpx(store)
    finally:
        await store.aclose()
    bad = await open_store(etcd_settings([etcd.client_url], "v2", username="root", password="no"))
    try:
        with pytest.raises(StoreAuthError, match="etcd v2 refused get config") as probed:
            await manager(bad).probe()
        with pytest.raises(StoreAuthError) as read:
            await bad.get_config()
        assert str(probed.value) == str(read.value)
    finally:
        await bad.aclose()
