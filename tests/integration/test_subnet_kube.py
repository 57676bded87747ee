"""The Kubernetes subnet manager against the API server double (HTTPS, tokens, client
certificates, RBAC, list/watch with resourceVersion): startup, the patches it sends,
the errors it gives, and the watch through cuts, 410s and outages."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from pathlib import Path

import pytest

from loden.errors import ConfigError, StoreError, StoreForbidden, StoreUnavailable
from loden.kubeapi.auth import FLANNEL_RULES
from loden.model.lease import EventKind, Lease, LeaseAttrs
from loden.model.subnet_env import PreviousSubnets
from loden.settings import KubeSettings
from loden.subnet.base import WatchResult
from loden.subnet.kube import KubeSubnetManager, open_kube_manager
from tests.fixtures.kubeapi import KubeApiClient

P = "flannel.alpha.coreos.com/"
NET_CONF = '{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}'
VXLAN = '{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}'
PREVIOUS = PreviousSubnets(None, None, None, None)


def go_annotations(ip: str, mac: str = "12:c6:65:89:b4:e3") -> dict[str, str]:
    """Exactly what Go flanneld writes on a vxlan node (spec §4.2)."""
    return {
        P + "backend-data": json.dumps({"VNI": 1, "VtepMAC": mac}, separators=(",", ":")),
        P + "backend-type": "vxlan",
        P + "kube-subnet-manager": "true",
        P + "public-ip": ip,
    }


def settings(tmp_path: Path, **kw: object) -> KubeSettings:
    conf = tmp_path / "net-conf.json"
    if not conf.exists():
        conf.write_text(NET_CONF)
    base = KubeSettings(
        enabled=True,
        api_url="",
        kubeconfig_file="",
        annotation_prefix="flannel.alpha.coreos.com",
        net_config_path=str(conf),
        set_node_network_unavailable=True,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


async def open_in_cluster(
    kubeapi: KubeApiClient, tmp_path: Path, *, node: str = "node1", **env: str
) -> KubeSubnetManager:
    token = kubeapi.service_account()
    sa = kubeapi.write_serviceaccount_dir(tmp_path / "sa", token)
    environ = {
        "KUBERNETES_SERVICE_HOST": kubeapi.host,
        "KUBERNETES_SERVICE_PORT": str(kubeapi.port),
        "NODE_NAME": node,
        **env,
    }
    manager = await open_kube_manager(settings(tmp_path), environ, sa_dir=sa)
    assert isinstance(manager, KubeSubnetManager)
    return manager


def attrs(ip: str = "192.0.2.1", data: str | None = VXLAN) -> LeaseAttrs:
    return LeaseAttrs(public_ip=IPv4Address(ip), backend_type="vxlan", backend_data=data)


async def next_result(stream: AsyncIterator[WatchResult], timeout: float = 10.0) -> WatchResult:
    async with asyncio.timeout(timeout):
        return await anext(stream)


async def test_startup_in_cluster_pod_lookup_and_patches(
    kubeapi: KubeApiClient, tmp_path: Path
) -> None:
    kubeapi.create_node("node1", "10.244.1.0/24")
    kubeapi.create_namespace("kube-flannel")
    kubeapi.create_pod("kube-flannel", "kube-flannel-ds-abcde", "node1")
    manager = await open_in_cluster(
        kubeapi,
        tmp_path,
        node="",
        POD_NAME="kube-flannel-ds-abcde",
        POD_NAMESPACE="kube-flannel",
    )
    try:
        assert manager.node_name == "node1"
        since = max(r["seq"] for r in kubeapi.requests_log()) + 1
        lease = await manager.acquire_lease(attrs(), PREVIOUS)
        assert lease.subnet == IPv4Network("10.244.1.0/24")
        await manager.complete_lease(lease)
    finally:
        await manager.aclose()
    node = kubeapi.get("nodes", "node1")
    annotations = node["metadata"]["annotations"]
    assert annotations[P + "kube-subnet-manager"] == "true"
    assert annotations[P + "backend-data"] == VXLAN
    assert annotations[P + "public-ip"] == "192.0.2.1"
    assert annotations["node.alpha.kubernetes.io/ttl"] == "0"  # merged, not replaced
    conditions = {c["type"]: c for c in node["status"]["conditions"]}
    assert conditions["Ready"]["status"] == "True"  # strategic merge by type kept it
    assert conditions["NetworkUnavailable"]["status"] == "False"
    assert conditions["NetworkUnavailable"]["reason"] == "FlannelIsUp"
    writes = [r for r in kubeapi.requests_log(since) if r["method"] != "GET"]
    assert [(r["method"], r["path"], r["contentType"]) for r in writes] == [
        ("PATCH", "/api/v1/nodes/node1/status", "application/strategic-merge-patch+json")
    ] * 2
    assert writes[0]["body"] == (
        '{"metadata":{"annotations":{"flannel.alpha.coreos.com/backend-data":'
        '"{\\"VNI\\":1,\\"VtepMAC\\":\\"12:c6:65:89:b4:e3\\"}",'
        '"flannel.alpha.coreos.com/backend-type":"vxlan",'
        '"flannel.alpha.coreos.com/kube-subnet-manager":"true",'
        '"flannel.alpha.coreos.com/public-ip":"192.0.2.1"}}}'
    )
    assert all(r["user"] == "system:serviceaccount:kube-flannel:flannel" for r in writes)


async def test_initial_requests_are_client_gos(kubeapi: KubeApiClient, tmp_path: Path) -> None:
    kubeapi.create_node("node1", "10.244.1.0/24")
    manager = await open_in_cluster(kubeapi, tmp_path)
    try:
        stream = aiter(manager.watch_leases())
        await next_result(stream)
        for _ in range(50):
            log = kubeapi.requests_log()
            if any("watch=true" in r["query"] for r in log):
                break
            await asyncio.sleep(0.1)
        await stream.aclose()  # type: ignore[attr-defined]
    finally:
        await manager.aclose()
    queries = [
        (r["path"], r["query"])
        for r in log
        if r["path"] == "/api/v1/nodes" and r["method"] == "GET"
    ]
    assert "limit=500" in queries[0][1] and "resourceVersion=0" in queries[0][1]
    watch = queries[1][1]
    assert "allowWatchBookmarks=true" in watch and "watch=true" in watch
    assert "resourceVersion=" in watch and "timeoutSeconds=" in watch


async def test_second_acquire_sends_no_patch(kubeapi: KubeApiClient, tmp_path: Path) -> None:
    kubeapi.create_node("node1", "10.244.1.0/24")
    manager = await open_in_cluster(kubeapi, tmp_path)
    try:
        await manager.acquire_lease(attrs(), PREVIOUS)
        since = max(r["seq"] for r in kubeapi.requests_log()) + 1
        lease = await manager.acquire_lease(attrs(), PREVIOUS)
        assert await manager.renew_lease(lease) == lease
    finally:
        await manager.aclose()
    assert not [r for r in kubeapi.requests_log(since) if r["method"] == "PATCH"]


async def test_renew_repairs_removed_annotations(kubeapi: KubeApiClient, tmp_path: Path) -> None:
    kubeapi.create_node("node1", "10.244.1.0/24")
    manager = await open_in_cluster(kubeapi, tmp_path)
    try:
        lease = await manager.acquire_lease(attrs(), PREVIOUS)
        kubeapi.annotate_node("node1", {P + "kube-subnet-manager": None, P + "public-ip": None})
        await manager.renew_lease(lease)
    finally:
        await manager.aclose()
    annotations = kubeapi.get("nodes", "node1")["metadata"]["annotations"]
    assert annotations[P + "kube-subnet-manager"] == "true"
    assert annotations[P + "public-ip"] == "192.0.2.1"


async def test_public_ip_overwrite_and_node_public_ip(
    kubeapi: KubeApiClient, tmp_path: Path
) -> None:
    kubeapi.create_node(
        "node1",
        "10.244.1.0/24",
        annotations={
            P + "public-ip-overwrite": "203.0.113.9",
            P + "node-public-ip": "198.51.100.4",
        },
    )
    manager = await open_in_cluster(kubeapi, tmp_path)
    try:
        override = await manager.public_ip_override()
        assert override.ipv4 == IPv4Address("198.51.100.4")
        lease = await manager.acquire_lease(attrs("198.51.100.4"), PREVIOUS)
        assert lease.attrs.public_ip == IPv4Address("198.51.100.4")  # local attrs
    finally:
        await manager.aclose()
    annotations = kubeapi.get("nodes", "node1")["metadata"]["annotations"]
    assert annotations[P + "public-ip"] == "203.0.113.9"


async def test_403_on_node_status_names_verb_and_resource(
    kubeapi: KubeApiClient, tmp_path: Path
) -> None:
    kubeapi.create_node("node1", "10.244.1.0/24")
    manager = await open_in_cluster(kubeapi, tmp_path)
    kubeapi.set_rules(
        "user:system:serviceaccount:kube-flannel:flannel",
        [r for r in FLANNEL_RULES if r["resources"] != ["nodes/status"]],
    )
    try:
        with pytest.raises(StoreForbidden) as info:
            await manager.acquire_lease(attrs(), PREVIOUS)
    finally:
        await manager.aclose()
    message = str(info.value)
    assert (info.value.verb, info.value.resource) == ("patch", "nodes/status")
    assert '"patch" on resource "nodes/status"' in message
    assert "\n" not in message


async def test_403_on_list_fails_startup_at_once(kubeapi: KubeApiClient, tmp_path: Path) -> None:
    kubeapi.create_node("node1", "10.244.1.0/24")
    token = kubeapi.service_account(rules=[r for r in FLANNEL_RULES if r["resources"] != ["nodes"]])
    sa = kubeapi.write_serviceaccount_dir(tmp_path / "sa", token)
    env = {
        "KUBERNETES_SERVICE_HOST": kubeapi.host,
        "KUBERNETES_SERVICE_PORT": str(kubeapi.port),
        "NODE_NAME": "node1",
    }
    with pytest.raises(StoreForbidden, match='"list" on resource "nodes"'):
        await open_kube_manager(settings(tmp_path), env, sa_dir=sa, sync_timeout=30)


async def test_empty_pod_cidr_is_actionable(kubeapi: KubeApiClient, tmp_path: Path) -> None:
    kubeapi.create_node("node1", None)
    manager = await open_in_cluster(kubeapi, tmp_path)
    try:
        with pytest.raises(ConfigError) as info:
            await manager.acquire_lease(attrs(), PREVIOUS)
    finally:
        await manager.aclose()
    assert 'node "node1" pod cidr not assigned' in str(info.value)
    assert "--allocate-node-cidrs" in str(info.value)
    assert "--pod-network-cidr" in str(info.value)


async def test_pod_cidr_outside_network(kubeapi: KubeApiClient, tmp_path: Path) -> None:
    kubeapi.create_node("node1", "10.99.1.0/24")
    manager = await open_in_cluster(kubeapi, tmp_path)
    try:
        with pytest.raises(ConfigError) as info:
            await manager.acquire_lease(attrs(), PREVIOUS)
    finally:
        await manager.aclose()
    assert (
        'subnet "10.244.0.0/16" specified in the flannel net config doesn\'t contain '
        '"10.99.1.0/24" PodCIDR of the "node1" node'
    ) in str(info.value)
    assert "--cluster-cidr" in str(info.value)


async def test_missing_pod_env_and_bad_queue_depth(kubeapi: KubeApiClient, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="POD_NAME and POD_NAMESPACE must be set"):
        await open_in_cluster(kubeapi, tmp_path, node="")
    with pytest.raises(ConfigError, match="EVENT_QUEUE_DEPTH='many' is not an integer"):
        await open_in_cluster(kubeapi, tmp_path / "b", EVENT_QUEUE_DEPTH="many")


async def test_kubeconfig_client_certificate_and_ca_env_ignored(
    kubeapi: KubeApiClient, tmp_path: Path, kubeapi_server: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A CA bundle in the environment that does not know the server must change nothing.
    bogus = tmp_path / "bogus-ca.pem"
    bogus.write_text("not a certificate\n")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bogus))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(bogus))
    monkeypatch.setenv("SSL_CERT_FILE", str(bogus))
    kubeapi.create_node("node1", "10.244.1.0/24")
    kubeapi.set_rules("user:etcd", FLANNEL_RULES)  # the CN of the double's client cert
    assert kubeapi.ca_file is not None
    pki = kubeapi.ca_file.parent
    path = kubeapi.write_kubeconfig(
        tmp_path / "kubeconfig",
        client_cert=pki / "server.pem",
        client_key=pki / "server-key.pem",
        embed=True,
    )
    manager = await open_kube_manager(
        settings(tmp_path, kubeconfig_file=str(path)), {"NODE_NAME": "node1"}
    )
    try:
        assert len(await manager.list_leases()) == 0  # listed fine; nobody annotated yet
    finally:
        await manager.aclose()


async def test_rotated_token_is_picked_up(kubeapi: KubeApiClient, tmp_path: Path) -> None:
    kubeapi.create_node("node1", "10.244.1.0/24")
    manager = await open_in_cluster(kubeapi, tmp_path)
    try:
        sa = tmp_path / "sa"
        old = (sa / "token").read_text()
        new = kubeapi.service_account()
        (sa / "token.tmp").write_text(new)
        os.replace(sa / "token.tmp", sa / "token")
        kubeapi.remove_token(old)
        await manager.acquire_lease(attrs(), PREVIOUS)  # would be 401 with the old token
    finally:
        await manager.aclose()


def _lists(kubeapi: KubeApiClient) -> list[dict[str, object]]:
    return [
        r
        for r in kubeapi.requests_log()
        if r["path"] == "/api/v1/nodes"
        and r["method"] == "GET"
        and "watch=true" not in str(r["query"])
    ]


def _keys(result: WatchResult) -> list[tuple[str, str]]:
    return [(e.kind.value, e.lease.key) for e in result.events]


async def test_watch_add_update_delete_skip(
    kubeapi: KubeApiClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kubeapi.create_node("node1", "10.244.1.0/24")
    kubeapi.create_node("node2", "10.244.2.0/24", annotations=go_annotations("192.0.2.2"))
    kubeapi.create_node("plain", "10.244.9.0/24")  # not flannel's: silently ignored
    manager = await open_in_cluster(kubeapi, tmp_path)
    stream = aiter(manager.watch_leases())
    try:
        first = await next_result(stream)
        assert first.snapshot is not None
        assert [lease.key for lease in first.snapshot] == ["10.244.2.0-24"]
        caplog.set_level(logging.WARNING)
        kubeapi.create_node("bad", "10.244.7.0/24", annotations=go_annotations("not-an-ip"))
        kubeapi.create_node("node3", "10.244.3.0/24", annotations=go_annotations("192.0.2.3"))
        assert _keys(await next_result(stream)) == [("added", "10.244.3.0-24")]
        kubeapi.annotate_node("bad", {"unrelated": "x"})  # still bad: no second warning
        kubeapi.annotate_node("node2", {P + "public-ip": "192.0.2.22"})
        result = await next_result(stream)
        assert _keys(result) == [("added", "10.244.2.0-24")]
        assert result.events[0].lease.attrs.public_ip == IPv4Address("192.0.2.22")
        kubeapi.delete("nodes", "node3")
        assert _keys(await next_result(stream)) == [("removed", "10.244.3.0-24")]
        bad = [r for r in caplog.records if '"bad"' in r.getMessage()]
        assert len(bad) == 1 and "public-ip='not-an-ip'" in bad[0].getMessage()
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        await manager.aclose()


async def collect(
    stream: AsyncIterator[WatchResult], want: set[str], peers: dict[str, Lease]
) -> int:
    """Apply results to ``peers`` until its keys are ``want``; returns the ADDED count."""
    added = 0
    async with asyncio.timeout(20):
        while set(peers) != want:
            result = await anext(stream)
            if result.snapshot is not None:
                fresh = {lease.key: lease for lease in result.snapshot}
                added += sum(1 for k, v in fresh.items() if peers.get(k) != v)
                peers.clear()
                peers.update(fresh)
            for event in result.events:
                if event.kind is EventKind.ADDED:
                    added += peers.get(event.lease.key) != event.lease
                    peers[event.lease.key] = event.lease
                else:
                    peers.pop(event.lease.key, None)
    return added


@pytest.mark.parametrize("abort", [False, True], ids=["clean-end", "torn-connection"])
async def test_watch_cut_resumes_without_loss_or_duplicates(
    kubeapi: KubeApiClient, tmp_path: Path, abort: bool
) -> None:
    kubeapi.create_node("node1", "10.244.1.0/24")
    manager = await open_in_cluster(kubeapi, tmp_path)
    stream = aiter(manager.watch_leases())
    peers: dict[str, Lease] = {}
    try:
        await collect(stream, set(), peers)
        kubeapi.create_node("n2", "10.244.2.0/24", annotations=go_annotations("192.0.2.2"))
        await collect(stream, {"10.244.2.0-24"}, peers)
        lists = len(_lists(kubeapi))
        # Synchronous calls: the agent's loop cannot reconnect before n3 exists.
        assert kubeapi.cut_watches(abort=abort) >= 1
        kubeapi.create_node("n3", "10.244.3.0/24", annotations=go_annotations("192.0.2.3"))
        added = await collect(stream, {"10.244.2.0-24", "10.244.3.0-24"}, peers)
        assert added == 1  # n3 once, n2 not again
        assert len(_lists(kubeapi)) == lists  # resumed from its resourceVersion: no relist
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        await manager.aclose()


async def test_410_gone_relists_without_loss_or_duplicates(
    kubeapi: KubeApiClient, tmp_path: Path
) -> None:
    kubeapi.create_node("node1", "10.244.1.0/24")
    kubeapi.create_node("n2", "10.244.2.0/24", annotations=go_annotations("192.0.2.2"))
    kubeapi.create_node("n4", "10.244.4.0/24", annotations=go_annotations("192.0.2.4"))
    manager = await open_in_cluster(kubeapi, tmp_path)
    stream = aiter(manager.watch_leases())
    peers: dict[str, Lease] = {}
    try:
        await collect(stream, {"10.244.2.0-24", "10.244.4.0-24"}, peers)
        lists = len(_lists(kubeapi))
        # Synchronous calls: the watch is torn and cannot resume before the compaction.
        kubeapi.cut_watches(abort=True)
        kubeapi.create_node("n3", "10.244.3.0/24", annotations=go_annotations("192.0.2.3"))
        kubeapi.delete("nodes", "n4")
        kubeapi.compact()  # the version the watch resumes from is gone: 410
        restarts = manager.watch_restarts
        added = await collect(stream, {"10.244.2.0-24", "10.244.3.0-24"}, peers)
        assert added == 1
        assert manager.watch_restarts > restarts
        assert len(_lists(kubeapi)) == lists + 1  # one relist after the 410
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        await manager.aclose()


async def test_api_down_probe_and_recovery(kubeapi: KubeApiClient, tmp_path: Path) -> None:
    kubeapi.create_node("node1", "10.244.1.0/24")
    manager = await open_in_cluster(kubeapi, tmp_path)
    stream = aiter(manager.watch_leases())
    peers: dict[str, Lease] = {}
    try:
        await collect(stream, set(), peers)
        await asyncio.sleep(0.5)
        await manager.probe()
        kubeapi.go_down(4.0)
        with pytest.raises(StoreUnavailable):
            async with asyncio.timeout(3):
                while True:
                    await manager.probe()
                    await asyncio.sleep(0.2)
        await asyncio.sleep(4.0)
        kubeapi.create_node("n5", "10.244.5.0/24", annotations=go_annotations("192.0.2.5"))
        await collect(stream, {"10.244.5.0-24"}, peers)
        await manager.probe()
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        await manager.aclose()


async def test_cache_sync_timeout_and_cont_when_cache_not_ready(
    kubeapi: KubeApiClient, tmp_path: Path
) -> None:
    token = kubeapi.service_account()
    sa = kubeapi.write_serviceaccount_dir(tmp_path / "sa", token)
    env = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": "1",  # nothing listens: the node list never syncs
        "NODE_NAME": "node1",
    }
    with pytest.raises(StoreError, match="CONT_WHEN_CACHE_NOT_READY=true") as info:
        await open_kube_manager(settings(tmp_path), env, sa_dir=sa, sync_timeout=1.5)
    assert "did not sync within 2s" in str(info.value)
    manager = await open_kube_manager(
        settings(tmp_path),
        {**env, "CONT_WHEN_CACHE_NOT_READY": "true"},
        sa_dir=sa,
        sync_timeout=1.5,
    )
    try:
        assert manager.node_name == "node1"
        with pytest.raises(StoreUnavailable):
            await manager.probe()
    finally:
        await manager.aclose()


def test_loden_leases_in_kube_mode(kubeapi: KubeApiClient, tmp_path: Path) -> None:
    kubeapi.create_node("node1", "10.244.1.0/24", annotations=go_annotations("192.0.2.1"))
    kubeapi.create_node("node2", "10.244.2.0/24")
    kubeapi.create_node("bad", "10.244.3.0/24", annotations=go_annotations("nope"))
    path = kubeapi.write_kubeconfig(tmp_path / "kubeconfig")
    loden = str(Path(sys.executable).parent / "loden")
    argv = [loden, "leases", "-kube-subnet-mgr", f"-kubeconfig-file={path}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}
    out = subprocess.run([*argv, "-json"], capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    rows = {row["node"]: row for row in json.loads(out.stdout)}
    assert rows["node1"]["pod_cidrs"] == ["10.244.1.0/24"]
    assert rows["node1"]["annotations"]["public-ip"] == "192.0.2.1"
    assert rows["node1"]["status"] == "peer"
    assert (
        rows["node2"]["status"].startswith("skipped: ") and "not managed" in rows["node2"]["status"]
    )
    assert "not an IPv4 address" in rows["bad"]["status"]
    table = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    assert table.returncode == 0 and "node1" in table.stdout and "10.244.1.0/24" in table.stdout


async def test_bookmarks_and_periodic_resync(
    kubeapi: KubeApiClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kubeapi.create_node("node1", "10.244.1.0/24")
    kubeapi.create_node("n2", "10.244.2.0/24", annotations=go_annotations("192.0.2.2"))
    kubeapi.set_bookmark_interval(0.2)
    manager = await open_in_cluster(kubeapi, tmp_path)
    manager.resync_seconds = 1.0
    stream = aiter(manager.watch_leases())
    caplog.set_level(logging.WARNING)
    try:
        first = await next_result(stream)
        assert first.snapshot is not None
        kubeapi.create_node("plain", "10.244.9.0/24")  # a change nobody is told about
        # Bookmarks are not nodes; the cache is re-offered as a snapshot every resync.
        again = await next_result(stream, 5.0)
        assert again.snapshot is not None and not again.events
        assert {lease.key for lease in again.snapshot} == {"10.244.2.0-24"}
        assert manager._rv == str(kubeapi.state()["resourceVersion"])
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        # Resuming from the last version seen (events and bookmarks) survives a
        # compaction up to it: no relist needed.
        lists = len(_lists(kubeapi))
        kubeapi.compact()
        kubeapi.cut_watches()
        kubeapi.create_node("n3", "10.244.3.0/24", annotations=go_annotations("192.0.2.3"))
        peers = {lease.key: lease for lease in again.snapshot}
        await collect(stream, {"10.244.2.0-24", "10.244.3.0-24"}, peers)
        assert len(_lists(kubeapi)) == lists
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        await manager.aclose()


async def test_dual_stack_lease_and_annotations(kubeapi: KubeApiClient, tmp_path: Path) -> None:
    (tmp_path / "net-conf.json").write_text(
        json.dumps(
            {
                "Network": "10.244.0.0/16",
                "EnableIPv6": True,
                "IPv6Network": "fd00:10:244::/56",
                "Backend": {"Type": "vxlan"},
            }
        )
    )
    kubeapi.create_node("node1", pod_cidrs=["10.244.1.0/24", "fd00:10:244:1::/64"])
    manager = await open_in_cluster(kubeapi, tmp_path)
    v6data = '{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e4"}'
    dual = LeaseAttrs(
        public_ip=IPv4Address("192.0.2.1"),
        backend_type="vxlan",
        backend_data=VXLAN,
        public_ipv6=IPv6Address("2001:db8::1"),
        backend_v6_data=v6data,
    )
    try:
        lease = await manager.acquire_lease(dual, PREVIOUS)
    finally:
        await manager.aclose()
    assert str(lease.subnet) == "10.244.1.0/24"
    assert str(lease.ipv6_subnet) == "fd00:10:244:1::/64"
    annotations = kubeapi.get("nodes", "node1")["metadata"]["annotations"]
    assert annotations[P + "public-ipv6"] == "2001:db8::1"
    assert annotations[P + "backend-v6-data"] == v6data
    assert annotations[P + "public-ip"] == "192.0.2.1"
