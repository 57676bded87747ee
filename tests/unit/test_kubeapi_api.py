"""The API double's HTTP semantics, in-process: list/watch versions, 410, bookmarks, 409, 403.

The server runs on this test's event loop (plain HTTP on loopback, token auth) and is
driven with httpx the way a client library would drive kube-apiserver.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from loden.kubeapi.auth import FLANNEL_RULES, Authenticator, Authorizer, User, service_account
from loden.kubeapi.server import KubeApiServer

ADMIN = "admin-token"
FLANNEL = "flannel-token"
SMP = "application/strategic-merge-patch+json"


@pytest.fixture
async def server() -> AsyncIterator[KubeApiServer]:
    sa = service_account("kube-flannel", "flannel")
    authn = Authenticator(
        tokens={ADMIN: User("admin", ("system:masters", "system:authenticated")), FLANNEL: sa}
    )
    authz = Authorizer()
    authz.set_rules(f"user:{sa.name}", FLANNEL_RULES)
    srv = KubeApiServer(authenticator=authn, authorizer=authz)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def api(server: KubeApiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{server.port}",
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=10,
    ) as client:
        yield client


async def create_node(
    api: httpx.AsyncClient, name: str, cidr: str = "10.244.1.0/24"
) -> dict[str, Any]:
    body = {
        "metadata": {"name": name, "annotations": {"node.alpha.kubernetes.io/ttl": "0"}},
        "spec": {"podCIDR": cidr},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }
    response = await api.post("/api/v1/nodes", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def read_events(
    api: httpx.AsyncClient, params: str, count: int, timeout: float = 10.0
) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []

    async def collect() -> None:
        async with api.stream("GET", f"/api/v1/nodes?watch=true&{params}") as response:
            assert response.status_code == 200
            assert response.headers.get("transfer-encoding") == "chunked"
            async for line in response.aiter_lines():
                if line:
                    events.append(json.loads(line))
                if len(events) >= count:
                    return

    await asyncio.wait_for(collect(), timeout)
    return events


async def test_versions_and_list(api: httpx.AsyncClient) -> None:
    a = await create_node(api, "a")
    b = await create_node(api, "b", "10.244.2.0/24")
    assert int(b["metadata"]["resourceVersion"]) == int(a["metadata"]["resourceVersion"]) + 1
    assert a["spec"]["podCIDRs"] == ["10.244.1.0/24"], "podCIDR is mirrored into podCIDRs"
    listed = (await api.get("/api/v1/nodes")).json()
    assert listed["kind"] == "NodeList"
    assert listed["metadata"]["resourceVersion"] == b["metadata"]["resourceVersion"]
    assert [n["metadata"]["name"] for n in listed["items"]] == ["a", "b"]
    assert "kind" not in listed["items"][0], "list items carry no kind, as from the real server"
    one = (await api.get("/api/v1/nodes", params={"fieldSelector": "metadata.name=b"})).json()
    assert [n["metadata"]["name"] for n in one["items"]] == ["b"]
    missing = await api.get("/api/v1/nodes/zz")
    assert missing.status_code == 404
    assert missing.json() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'nodes "zz" not found',
        "reason": "NotFound",
        "details": {"name": "zz", "kind": "nodes"},
        "code": 404,
    }


async def test_paginated_list_is_consistent(api: httpx.AsyncClient) -> None:
    for i in range(5):
        await create_node(api, f"n{i}", f"10.244.{i}.0/24")
    first = (await api.get("/api/v1/nodes", params={"limit": "2"})).json()
    assert len(first["items"]) == 2 and first["metadata"]["remainingItemCount"] == 3
    await api.delete("/api/v1/nodes/n4")  # after the first page: the list stays at its version
    second = (
        await api.get(
            "/api/v1/nodes", params={"limit": "10", "continue": first["metadata"]["continue"]}
        )
    ).json()
    assert [n["metadata"]["name"] for n in second["items"]] == ["n2", "n3", "n4"]
    assert second["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]


async def test_watch_replays_after_a_version_then_streams(api: httpx.AsyncClient) -> None:
    a = await create_node(api, "a")
    rv = a["metadata"]["resourceVersion"]
    await create_node(api, "b", "10.244.2.0/24")
    await api.patch(
        "/api/v1/nodes/a", json={"metadata": {"labels": {"x": "y"}}}, headers={"Content-Type": SMP}
    )

    async def later() -> None:
        await asyncio.sleep(0.3)
        await api.delete("/api/v1/nodes/b")

    task = asyncio.create_task(later())
    events = await read_events(api, f"resourceVersion={rv}", 3)
    await task
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "b"),
        ("MODIFIED", "a"),
        ("DELETED", "b"),
    ]
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and versions[0] > int(rv)
    assert events[0]["object"]["kind"] == "Node"


async def test_watch_without_version_sends_current_state(api: httpx.AsyncClient) -> None:
    await create_node(api, "a")
    await create_node(api, "b", "10.244.2.0/24")
    events = await read_events(api, "", 2)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
    ]


async def test_compacted_version_is_410_expired_in_the_stream(
    api: httpx.AsyncClient, server: KubeApiServer
) -> None:
    a = await create_node(api, "a")
    await create_node(api, "b", "10.244.2.0/24")
    server.store.compact()
    events = await read_events(api, f"resourceVersion={a['metadata']['resourceVersion']}", 1)
    assert events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")
    assert status["message"].startswith("too old resource version: ")
    exact = await api.get(
        "/api/v1/nodes",
        params={
            "resourceVersion": a["metadata"]["resourceVersion"],
            "resourceVersionMatch": "Exact",
        },
    )
    assert exact.status_code == 410


async def test_bookmarks_and_timeout(api: httpx.AsyncClient, server: KubeApiServer) -> None:
    server.settings.bookmark_interval = 0.3
    a = await create_node(api, "a")
    loop = asyncio.get_running_loop()
    started = loop.time()
    events: list[dict[str, Any]] = []
    rv = a["metadata"]["resourceVersion"]
    params = f"resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=2"
    async with api.stream("GET", f"/api/v1/nodes?watch=true&{params}") as response:
        async for line in response.aiter_lines():
            if line:
                events.append(json.loads(line))
    assert 1.5 < loop.time() - started < 15, "the stream ends at timeoutSeconds"
    assert events and all(e["type"] == "BOOKMARK" for e in events)
    assert events[0]["object"] == {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "resourceVersion": a["metadata"]["resourceVersion"],
            "creationTimestamp": None,
        },
    }


async def test_send_initial_events_ends_with_an_annotated_bookmark(api: httpx.AsyncClient) -> None:
    await create_node(api, "a")
    events = await read_events(
        api, "sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true", 2
    )
    assert events[0]["type"] == "ADDED"
    assert events[1]["type"] == "BOOKMARK"
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


async def test_selector_watch_sends_deleted_when_an_object_stops_matching(
    api: httpx.AsyncClient,
) -> None:
    a = await create_node(api, "a")
    await api.patch(
        "/api/v1/nodes/a",
        json={"metadata": {"labels": {"flannel": "yes"}}},
        headers={"Content-Type": SMP},
    )
    await api.patch(
        "/api/v1/nodes/a",
        json={"metadata": {"labels": {"flannel": None}}},
        headers={"Content-Type": SMP},
    )
    events = await read_events(
        api, f"resourceVersion={a['metadata']['resourceVersion']}&labelSelector=flannel", 2
    )
    assert [e["type"] for e in events] == ["ADDED", "DELETED"]


async def test_status_subresource_strategy(api: httpx.AsyncClient) -> None:
    await create_node(api, "a")
    patch = {
        "metadata": {"annotations": {"flannel.alpha.coreos.com/backend-type": "vxlan"}},
        "spec": {"unschedulable": True},
        "status": {
            "conditions": [
                {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}
            ]
        },
    }
    response = await api.patch("/api/v1/nodes/a/status", json=patch, headers={"Content-Type": SMP})
    assert response.status_code == 200, response.text
    node = response.json()
    assert node["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-type"] == "vxlan"
    assert "unschedulable" not in node["spec"], "/status keeps the old spec"
    assert [c["type"] for c in node["status"]["conditions"]] == ["Ready", "NetworkUnavailable"]
    main = await api.patch(
        "/api/v1/nodes/a", json={"status": {"conditions": []}}, headers={"Content-Type": SMP}
    )
    assert [c["type"] for c in main.json()["status"]["conditions"]] == [
        "Ready",
        "NetworkUnavailable",
    ]
    same = await api.patch("/api/v1/nodes/a/status", json=patch, headers={"Content-Type": SMP})
    assert same.json()["metadata"]["resourceVersion"] == node["metadata"]["resourceVersion"], (
        "no-op"
    )


async def test_put_with_stale_version_is_409(api: httpx.AsyncClient) -> None:
    node = await create_node(api, "a")
    node["metadata"]["labels"] = {"x": "1"}
    first = await api.put("/api/v1/nodes/a", json=node)
    assert first.status_code == 200
    stale = await api.put("/api/v1/nodes/a", json=node)
    assert stale.status_code == 409
    assert stale.json()["message"] == (
        'Operation cannot be fulfilled on nodes "a": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    assert stale.json()["reason"] == "Conflict"
    again = await api.post("/api/v1/nodes", json={"metadata": {"name": "a"}})
    assert again.status_code == 409 and again.json()["reason"] == "AlreadyExists"


async def test_pod_cidr_rules(api: httpx.AsyncClient) -> None:
    await create_node(api, "a")
    change = await api.patch(
        "/api/v1/nodes/a",
        json={"spec": {"podCIDR": "10.244.9.0/24", "podCIDRs": ["10.244.9.0/24"]}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert change.status_code == 422
    assert "node updates may not change podCIDR" in change.json()["message"]
    three = await api.post(
        "/api/v1/nodes",
        json={
            "metadata": {"name": "b"},
            "spec": {"podCIDRs": ["10.1.0.0/24", "10.2.0.0/24", "fd00::/64"]},
        },
    )
    assert three.status_code == 422 and three.json()["reason"] == "Invalid"


async def test_authorization_messages(api: httpx.AsyncClient, server: KubeApiServer) -> None:
    await create_node(api, "a")
    await api.post("/api/v1/namespaces", json={"metadata": {"name": "kube-flannel"}})
    sa = {"Authorization": f"Bearer {FLANNEL}"}
    assert (await api.get("/api/v1/nodes", headers=sa)).status_code == 200
    ok = await api.patch(
        "/api/v1/nodes/a/status",
        json={"metadata": {"annotations": {"x": "y"}}},
        headers={**sa, "Content-Type": SMP},
    )
    assert ok.status_code == 200
    denied = await api.patch(
        "/api/v1/nodes/a",
        json={"metadata": {"annotations": {"x": "z"}}},
        headers={**sa, "Content-Type": SMP},
    )
    assert denied.status_code == 403
    assert denied.json()["message"] == (
        'nodes "a" is forbidden: User "system:serviceaccount:kube-flannel:flannel" cannot patch '
        'resource "nodes" in API group "" at the cluster scope'
    )
    assert denied.json()["details"] == {"name": "a", "kind": "nodes"}
    server.authorizer.set_rules(
        "user:system:serviceaccount:kube-flannel:flannel", FLANNEL_RULES[:2]
    )
    status = await api.patch("/api/v1/nodes/a/status", json={}, headers={**sa, "Content-Type": SMP})
    assert status.json()["message"].endswith(
        'cannot patch resource "nodes/status" in API group "" at the cluster scope'
    )
    pods = await api.get("/api/v1/namespaces/kube-flannel/pods", headers=sa)
    assert pods.json()["message"] == (
        'pods is forbidden: User "system:serviceaccount:kube-flannel:flannel" cannot list resource '
        '"pods" in API group "" in the namespace "kube-flannel"'
    )
    bad = await api.get("/api/v1/nodes", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["reason"] == "Unauthorized"
    anonymous = await api.get("/api/v1/nodes", headers={"Authorization": ""})
    assert anonymous.status_code == 403
    assert (await api.get("/version", headers={"Authorization": ""})).status_code == 200


async def test_pods_need_their_namespace_and_give_the_node_name(api: httpx.AsyncClient) -> None:
    pod = {
        "metadata": {"name": "p"},
        "spec": {"nodeName": "a", "containers": [{"name": "c", "image": "i"}]},
    }
    missing = await api.post("/api/v1/namespaces/kube-flannel/pods", json=pod)
    assert (
        missing.status_code == 404
        and missing.json()["message"] == 'namespaces "kube-flannel" not found'
    )
    await api.post("/api/v1/namespaces", json={"metadata": {"name": "kube-flannel"}})
    created = await api.post("/api/v1/namespaces/kube-flannel/pods", json=pod)
    assert created.status_code == 201
    got = (await api.get("/api/v1/namespaces/kube-flannel/pods/p")).json()
    assert got["spec"]["nodeName"] == "a" and got["status"]["phase"] == "Pending"
    on_node = await api.get("/api/v1/pods", params={"fieldSelector": "spec.nodeName=a"})
    assert [p["metadata"]["name"] for p in on_node.json()["items"]] == ["p"]


async def test_discovery(api: httpx.AsyncClient) -> None:
    assert (await api.get("/api")).json()["versions"] == ["v1"]
    resources = {r["name"]: r for r in (await api.get("/api/v1")).json()["resources"]}
    assert {"nodes", "nodes/status", "pods", "namespaces"} <= set(resources)
    assert resources["nodes"]["shortNames"] == ["no"] and not resources["nodes"]["namespaced"]
    assert (await api.get("/apis")).json()["groups"] == []
    assert (await api.get("/version")).json()["major"] == "1"
    assert (await api.get("/openapi/v2")).status_code == 404


async def test_pages_across_namespaces_lose_nothing(api: httpx.AsyncClient) -> None:
    pod = {"spec": {"containers": [{"name": "c", "image": "i"}]}}
    for namespace, name in (("a", "z"), ("a-b", "c"), ("a", "b")):
        if (await api.get(f"/api/v1/namespaces/{namespace}")).status_code == 404:
            await api.post("/api/v1/namespaces", json={"metadata": {"name": namespace}})
        created = await api.post(
            f"/api/v1/namespaces/{namespace}/pods", json={**pod, "metadata": {"name": name}}
        )
        assert created.status_code == 201
    seen: list[tuple[str, str]] = []
    params = {"limit": "1"}
    for _ in range(5):
        page = (await api.get("/api/v1/pods", params=params)).json()
        seen += [(p["metadata"]["namespace"], p["metadata"]["name"]) for p in page["items"]]
        if not page["metadata"].get("continue"):
            break
        params = {"limit": "1", "continue": page["metadata"]["continue"]}
    assert seen == [("a", "b"), ("a", "z"), ("a-b", "c")]
    bad = await api.get("/api/v1/pods", params={"continue": "garbage!"})
    assert bad.status_code == 400


async def test_a_client_that_leaves_ends_its_watch(
    api: httpx.AsyncClient, server: KubeApiServer
) -> None:
    await create_node(api, "a")
    await read_events(api, "resourceVersion=0", 1)  # reads one event, then hangs up
    for _ in range(500):
        if not server.store.watchers:
            break
        await asyncio.sleep(0.02)
    assert not server.store.watchers, "the watcher is gone with its client"


async def test_a_malformed_watch_version_is_400(api: httpx.AsyncClient) -> None:
    response = await api.get("/api/v1/nodes", params={"watch": "true", "resourceVersion": "x"})
    assert response.status_code == 400 and response.json()["reason"] == "BadRequest"
