"""The API double as a process: client certificates, cut watches, downtime, compaction.

These are the fixture features other tests build on (``tests/fixtures/kubeapi.py``);
each is checked the way a client sees it, with httpx streaming over HTTPS.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from loden.kubeapi.control import KubeApiClient, KubeApiError, KubeApiProcess
from tests.fixtures.kubeapi import KubeApiFactory
from tests.fixtures.topology import Topology


def context(ca: Path, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca))
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


class Watch:
    """A watch read on a thread: its events, and how the stream ended."""

    def __init__(self, api: KubeApiClient, params: str) -> None:
        self.events: list[dict[str, Any]] = []
        self.ended: str = ""
        self.api, self.params = api, params
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.api.token}"}
        assert self.api.ca_file is not None
        try:
            with (
                httpx.Client(verify=context(self.api.ca_file), timeout=30) as client,
                client.stream(
                    "GET", f"{self.api.url}/api/v1/nodes?watch=true&{self.params}", headers=headers
                ) as response,
            ):
                for line in response.iter_lines():
                    if line:
                        self.events.append(json.loads(line))
            self.ended = "clean"
        except httpx.HTTPError as exc:
            self.ended = f"broken: {type(exc).__name__}"

    def wait(self, timeout: float = 10.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the watch did not end"

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.events) >= count, self.events


def test_client_certificate_authentication(kubeapi_server: KubeApiFactory) -> None:
    server = kubeapi_server()
    api = server.client
    assert api is not None
    api.create_node("n1", "10.244.1.0/24")
    url = f"{api.url}/api/v1/nodes"
    with httpx.Client(verify=context(server.ca_file, server.client_cert)) as client:
        denied = client.get(url).json()
        # user = the certificate's CN, groups = its O
        assert denied["code"] == 403
        assert 'User "etcd" cannot list resource "nodes"' in denied["message"]
        api.set_rules(
            "group:loden lab", [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]}]
        )
        assert [n["metadata"]["name"] for n in client.get(url).json()["items"]] == ["n1"]
    with httpx.Client(verify=context(server.ca_file)) as anonymous:
        assert (
            anonymous.get(url)
            .json()["message"]
            .startswith('nodes is forbidden: User "system:anonymous"')
        )


def test_anonymous_off_is_401(kubeapi_server: KubeApiFactory) -> None:
    server = kubeapi_server(anonymous=False)
    with httpx.Client(verify=context(server.ca_file)) as client:
        response = client.get(f"{server.client.url if server.client else ''}/api/v1/nodes")
    assert response.status_code == 401


def test_cut_watches_clean_and_torn(kubeapi: KubeApiClient) -> None:
    kubeapi.create_node("n1", "10.244.1.0/24")
    clean = Watch(kubeapi, "resourceVersion=0")
    clean.wait_for(1)
    assert kubeapi.cut_watches() == 1
    clean.wait()
    assert clean.ended == "clean"
    torn = Watch(kubeapi, "resourceVersion=0")
    torn.wait_for(1)
    assert kubeapi.cut_watches(abort=True) == 1
    torn.wait()
    assert torn.ended.startswith("broken")


def test_down_then_back_with_the_same_versions(kubeapi: KubeApiClient) -> None:
    node = kubeapi.create_node("n1", "10.244.1.0/24")
    before = int(node["metadata"]["resourceVersion"])
    watch = Watch(kubeapi, f"resourceVersion={before}")
    time.sleep(0.2)
    kubeapi.go_down(1.5)
    watch.wait()
    assert watch.ended.startswith("broken")
    refused = None
    deadline = time.monotonic() + 5
    while refused is None and time.monotonic() < deadline:
        try:
            kubeapi.get("nodes", "n1")
        except KubeApiError as exc:
            refused = exc
    assert refused is not None and refused.status == 0, "connection refused while down"
    deadline = time.monotonic() + 10
    while True:
        try:
            kubeapi.get("nodes", "n1")
            break
        except KubeApiError:
            assert time.monotonic() < deadline, "the server did not come back"
            time.sleep(0.1)
    after = kubeapi.annotate_node("n1", {"x": "y"})
    assert int(after["metadata"]["resourceVersion"]) == before + 1, "versions go on, never restart"
    resumed = Watch(kubeapi, f"resourceVersion={before}")
    resumed.wait_for(1)
    assert resumed.events[0]["type"] == "MODIFIED"
    kubeapi.cut_watches()


def test_compaction_makes_old_watches_expire(kubeapi: KubeApiClient) -> None:
    first = kubeapi.create_node("n1", "10.244.1.0/24")
    kubeapi.create_node("n2", "10.244.2.0/24")
    assert kubeapi.compact() == kubeapi.state()["resourceVersion"]
    watch = Watch(kubeapi, f"resourceVersion={first['metadata']['resourceVersion']}")
    watch.wait()
    assert [e["type"] for e in watch.events] == ["ERROR"]
    assert watch.events[0]["object"]["code"] == 410


def test_bookmarks_on_a_short_interval(kubeapi: KubeApiClient) -> None:
    node = kubeapi.create_node("n1", "10.244.1.0/24")
    kubeapi.set_bookmark_interval(0.2)
    rv = node["metadata"]["resourceVersion"]
    watch = Watch(kubeapi, f"resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=2")
    watch.wait()
    assert watch.ended == "clean"
    assert len(watch.events) >= 3 and {e["type"] for e in watch.events} == {"BOOKMARK"}


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_runs_inside_a_network_namespace(tmp_path: Path) -> None:
    with Topology(hosts=1) as topo:
        assert topo.underlay_address is not None
        server = KubeApiProcess(
            tmp_path / "api", host=str(topo.underlay_address.ip), netns=topo.underlay.name
        )
        try:
            api = server.start()
            assert api.port == 6443
            api.create_node("n1", "10.244.1.0/24")
            host = topo.hosts[0]
            out = host.ns.run(
                "python3",
                "-c",
                "import json,ssl,sys,urllib.request as u;"
                "c=ssl.create_default_context(cafile=sys.argv[1]);"
                "r=u.Request(sys.argv[2],headers={'Authorization':'Bearer '+sys.argv[3]});"
                "print(json.load(u.urlopen(r,context=c))['items'][0]['metadata']['name'])",
                str(server.ca_file),
                f"{api.url}/api/v1/nodes",
                api.token,
            )
            assert out.stdout.strip() == "n1"
        finally:
            server.stop()


def test_bulk_create_is_many_posts(kubeapi: KubeApiClient) -> None:
    from loden.kubeapi.control import node_body

    bodies = [node_body(f"n{i:04d}", f"10.{i // 256}.{i % 256}.0/24") for i in range(1200)]
    start = kubeapi.state()["resourceVersion"]
    rv = kubeapi.bulk_create("nodes", bodies)
    assert rv == start + 1200, "one version per object"
    listed = kubeapi.list_objects("nodes", limit="500")
    assert listed["metadata"]["remainingItemCount"] == 700
    assert listed["items"][0]["spec"]["podCIDRs"] == ["10.0.0.0/24"]
    with pytest.raises(KubeApiError) as error:
        kubeapi.bulk_create("nodes", [node_body("n0000", "10.9.9.0/24")])
    assert error.value.status == 409


def test_insecure_port_is_plain_http_and_admin(kubeapi_server: KubeApiFactory) -> None:
    server = kubeapi_server(insecure=True)
    assert server.client is not None and server.client.url.startswith("http://")
    response = httpx.post(
        f"{server.client.url}/api/v1/nodes", json={"metadata": {"name": "n1"}}, timeout=10
    )
    assert response.status_code == 201, "no credentials needed"
    posts = [r for r in server.client.requests_log() if r["method"] == "POST"]
    assert [(r["path"], r["user"]) for r in posts] == [("/api/v1/nodes", "system:admin")]


def test_restart_starts_a_new_watch_cache(kubeapi: KubeApiClient) -> None:
    first = kubeapi.create_node("n1", "10.244.1.0/24")
    last = kubeapi.create_node("n2", "10.244.2.0/24")
    kubeapi.go_down(0.5, restart=True)
    time.sleep(0.2)
    deadline = time.monotonic() + 10
    while True:
        try:
            kubeapi.state()
            break
        except KubeApiError:
            assert time.monotonic() < deadline, "the server did not come back"
            time.sleep(0.1)
    current = Watch(kubeapi, f"resourceVersion={last['metadata']['resourceVersion']}")
    kubeapi.annotate_node("n1", {"x": "y"})
    current.wait_for(1)
    assert current.events[0]["type"] == "MODIFIED", "a client that was up to date resumes"
    old = Watch(kubeapi, f"resourceVersion={first['metadata']['resourceVersion']}")
    old.wait()
    assert old.events[0]["object"]["code"] == 410, "one that was behind relists"
    kubeapi.cut_watches()


def test_state_file_survives_a_crash(kubeapi_server: KubeApiFactory, tmp_path: Path) -> None:
    server = kubeapi_server(state_file=tmp_path / "state.json")
    api = server.client
    assert api is not None
    api.create_namespace("kube-flannel")
    node = api.create_node("n1", "10.244.1.0/24")
    time.sleep(0.6)  # the debounced save
    server.kill()
    api = server.start()
    again = api.get("nodes", "n1")
    assert again["metadata"]["uid"] == node["metadata"]["uid"]
    assert again["metadata"]["resourceVersion"] == node["metadata"]["resourceVersion"]
    assert api.get("namespaces", "kube-flannel")["metadata"]["name"] == "kube-flannel"
    later = api.create_node("n2", "10.244.2.0/24")
    assert int(later["metadata"]["resourceVersion"]) > int(node["metadata"]["resourceVersion"])
    behind = Watch(api, "resourceVersion=1")
    behind.wait()
    assert behind.events[0]["object"]["code"] == 410, "a new watch cache after the restart"


def test_issued_client_certificates(kubeapi_server: KubeApiFactory) -> None:
    server = kubeapi_server()
    assert server.client is not None
    url = f"{server.client.url}/api/v1/nodes"
    with httpx.Client(verify=context(server.ca_file, server.admin_cert)) as admin:
        assert admin.get(url).status_code == 200, "system:masters may do everything"
    cert = server.issue_client_cert("system:node:n1", "system:nodes")
    with httpx.Client(verify=context(server.ca_file, cert)) as node:
        denied = node.get(url).json()
        assert 'User "system:node:n1" cannot list resource "nodes"' in denied["message"]
        server.client.set_rules(
            "group:system:nodes", [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]}]
        )
        assert node.get(url).status_code == 200
