"""gce backend against the Compute Engine double, driven in-process (spec §3)."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

import loden.backend.cloud as cloud
import loden.backend.gce as gce
from loden.backend import create_backend
from loden.backend.base import BackendContext, ExternalInterface, Network
from loden.model.config import NetworkConfig
from loden.model.lease import EventKind, Lease, LeaseAttrs, LeaseEvent
from loden.settings import BackendSettings
from tests.fixtures.cloud_gce import GceDouble

NETWORK = "10.40.0.0/16"


async def start(double: GceDouble, instance: str, sub: str, ip: str = "10.128.0.2") -> Network:
    double.default_instance = instance
    cfg = NetworkConfig.parse(f'{{"Network":"{NETWORK}","Backend":{{"Type":"gce"}}}}')
    ext = ExternalInterface("ens4", 2, 1460, IPv4Address(ip), IPv4Address(ip))
    ctx = BackendContext(
        cfg, ext, Path("/nonexistent"), BackendSettings(cloud_metadata_endpoint=double.url)
    )
    backend = create_backend("gce", ctx)
    attrs = await backend.lease_attrs()
    assert attrs.to_json(legacy=True) == f'{{"PublicIP":"{ip}"}}'
    return await backend.activate(Lease(IPv4Network(sub), attrs))


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gce, "POLL_INTERVAL", 0.01)


def test_route_name() -> None:
    assert gce.route_name(IPv4Network("10.40.5.0/24")) == "flannel-10-40-5-0-24"


async def test_route_inserted_exactly_as_flannel(gce_double: GceDouble) -> None:
    net = await start(gce_double, "node-a", "10.40.5.0/24")
    report = await net.reconcile({})
    assert not report.errors, report.errors
    route = gce_double.routes["flannel-10-40-5-0-24"]
    assert route["destRange"] == "10.40.5.0/24"
    assert route["nextHopInstance"] == gce_double.instance_link("node-a")
    assert route["network"] == gce_double.network_link()
    assert route["priority"] == 1000
    # The operation was polled through PENDING -> RUNNING -> DONE.
    assert [k for k, _ in gce_double.calls].count("operation") >= 2
    assert net.mtu == 1460
    # Sent by google-api-python-client (issue 15), not by hand.
    assert {c.split()[0] for c in gce_double.api_clients} == {"gdcl/2.202.0"}


async def test_restart_leaves_exact_route_alone(gce_double: GceDouble) -> None:
    net = await start(gce_double, "node-a", "10.40.5.0/24")
    assert not (await net.reconcile({})).errors
    gce_double.calls.clear()
    again = await start(gce_double, "node-a", "10.40.5.0/24")
    report = await again.reconcile({})
    assert not report.errors and report.added == 0
    assert gce_double.mutations() == []


async def test_conflicting_route_replaced(
    gce_double: GceDouble, caplog: pytest.LogCaptureFixture
) -> None:
    other = await start(gce_double, "node-old", "10.40.5.0/24")
    assert not (await other.reconcile({})).errors
    net = await start(gce_double, "node-a", "10.40.5.0/24")
    gce_double.calls.clear()
    assert not (await net.reconcile({})).errors
    assert gce_double.mutations() == ["delete", "insert"]
    assert gce_double.routes["flannel-10-40-5-0-24"]["nextHopInstance"].endswith("/node-a")
    assert any("node-old" in r.getMessage() for r in caplog.records)


async def test_stale_route_removed_other_clusters_kept(gce_double: GceDouble) -> None:
    b = await start(gce_double, "node-b", "10.40.6.0/24")
    assert not (await b.reconcile({})).errors
    # Another cluster in the same project: another Network (and one route of another
    # network with a flannel name inside ours).
    gce_double.routes["flannel-10-50-1-0-24"] = {
        "name": "flannel-10-50-1-0-24",
        "destRange": "10.50.1.0/24",
        "network": gce_double.network_link(),
        "nextHopInstance": gce_double.instance_link("x"),
    }
    gce_double.routes["flannel-10-40-9-0-24"] = {
        "name": "flannel-10-40-9-0-24",
        "destRange": "10.40.9.0/24",
        "network": gce_double.link("global/networks/other"),
        "nextHopInstance": gce_double.instance_link("x"),
    }
    lease_b = Lease(IPv4Network("10.40.6.0/24"), LeaseAttrs(public_ip=IPv4Address("10.128.0.3")))
    a = await start(gce_double, "node-a", "10.40.5.0/24")
    assert not (await a.reconcile({lease_b.key: lease_b})).errors
    assert "flannel-10-40-6-0-24" in gce_double.routes
    report = await a.apply([LeaseEvent(EventKind.REMOVED, lease_b)])
    assert not report.errors and report.removed == 1
    assert set(gce_double.routes) == {
        "flannel-10-40-5-0-24",
        "flannel-10-50-1-0-24",
        "flannel-10-40-9-0-24",
    }


async def test_full_pass_removes_a_leaseless_route_only_after_the_grace(
    gce_double: GceDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that just joined has published its lease and written its route, but a peer
    whose watch has not delivered that lease yet must not delete the route: a full pass
    removes a leaseless route only if an earlier pass, the grace before, found it so."""
    monkeypatch.setattr(cloud, "STALE_GRACE_SECONDS", 0.3)
    lease_b = Lease(IPv4Network("10.40.6.0/24"), LeaseAttrs(public_ip=IPv4Address("10.128.0.3")))
    b = await start(gce_double, "node-b", "10.40.6.0/24")
    assert not (await b.reconcile({})).errors
    a = await start(gce_double, "node-a", "10.40.5.0/24")
    assert not (await a.reconcile({})).errors  # b's lease not seen yet
    assert "flannel-10-40-6-0-24" in gce_double.routes
    await a.apply([LeaseEvent(EventKind.ADDED, lease_b)])  # it arrives: no longer suspect
    await asyncio.sleep(0.4)
    assert not (await a.reconcile({lease_b.key: lease_b})).errors
    assert "flannel-10-40-6-0-24" in gce_double.routes
    # Gone while a was not watching (no event): found leaseless twice, the grace apart.
    report = await a.reconcile({})
    assert not report.errors and report.removed == 0
    await asyncio.sleep(0.4)
    report = await a.reconcile({})
    assert not report.errors and report.removed == 1
    assert "flannel-10-40-6-0-24" not in gce_double.routes
    assert "flannel-10-40-5-0-24" in gce_double.routes


async def test_failures_retried_reported_recovered(
    gce_double: GceDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gce, "POLL_LIMIT", 5)
    net = await start(gce_double, "node-a", "10.40.5.0/24")
    gce_double.faults["*"] = 500
    report = await net.reconcile({})
    assert report.errors and "HTTP 500" in report.errors[0]
    gce_double.faults.clear()
    gce_double.ops_never_finish = True
    net._retry_at = 0  # type: ignore[attr-defined]  # skip the backoff wait
    report = await net.reconcile({})
    assert report.errors and "operation-1 still" in report.errors[0]
    gce_double.ops_never_finish = False
    net._retry_at = 0  # type: ignore[attr-defined]
    report = await net.reconcile({})
    assert not report.errors, report.errors
    assert "flannel-10-40-5-0-24" in gce_double.routes


async def test_failed_operation_reported(gce_double: GceDouble) -> None:
    net = await start(gce_double, "node-a", "10.40.5.0/24")
    gce_double.ops_fail = True
    report = await net.reconcile({})
    assert report.errors and "INJECTED" in report.errors[0]


async def test_missing_permission_named(gce_double: GceDouble) -> None:
    net = await start(gce_double, "node-a", "10.40.5.0/24")
    gce_double.faults["insert"] = 403
    report = await net.reconcile({})
    assert report.errors
    assert "compute.routes.create" in report.errors[0]
    assert f"projects/{gce_double.project}/global/routes" in report.errors[0]


async def test_event_removes_only_the_removed_subnet(gce_double: GceDouble) -> None:
    lease_b = Lease(IPv4Network("10.40.6.0/24"), LeaseAttrs(public_ip=IPv4Address("10.128.0.3")))
    lease_c = Lease(IPv4Network("10.40.7.0/24"), LeaseAttrs(public_ip=IPv4Address("10.128.0.4")))
    both = {lease_b.key: lease_b, lease_c.key: lease_c}
    for name, sub in (("node-b", "10.40.6.0/24"), ("node-c", "10.40.7.0/24")):
        assert not (await (await start(gce_double, name, sub)).reconcile(both)).errors
    a = await start(gce_double, "node-a", "10.40.5.0/24")
    # No reconcile yet: a knows no peers, which must not make c's route look stale.
    report = await a.apply([LeaseEvent(EventKind.REMOVED, lease_b)])
    assert not report.errors and report.removed == 1
    assert "flannel-10-40-7-0-24" in gce_double.routes
    assert "flannel-10-40-6-0-24" not in gce_double.routes
