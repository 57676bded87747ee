"""Chaos scenario 7: hostile or broken content in etcd.

Anyone who can write to etcd can put garbage there: a config that does not parse, lease
keys and values that do not parse, leases whose BackendData is wrong for their type, a
lease outside the Network, two leases claiming one public IP, a key that parses to
another node's subnet (``x/10.5.3.0-24``) and is then deleted. Loden's promise: every
valid peer keeps its routes, each bad item is warned about exactly once (not at every
resync), nothing is added and removed over and over, /healthz stays 200 and nothing
crashes.
"""

from __future__ import annotations

import json
import time
from ipaddress import IPv4Address, IPv4Network

import pytest

from tests.chaos.conftest import ChaosFactory
from tests.chaos.support import (
    SUBNETS_PREFIX,
    entries_of,
    figure,
    kernel_state,
    log_lines,
    wait_for,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

CONFIG_KEY = "/coreos.com/network/config"
WINDOW_SECONDS = 10.0


def test_hostile_store_content_is_skipped_once_without_churn(chaos: ChaosFactory) -> None:
    cluster = chaos({"Type": "vxlan"})
    cluster.start_all()
    cluster.add_pods()
    assert cluster.mesh_failures() == []
    observer, dup_owner, third = cluster.nodes
    assert observer.proc is not None
    net = cluster.network
    underlay = IPv4Network(f"{dup_owner.host.ip}/24", strict=False)

    def sub(i: int) -> IPv4Network:
        return IPv4Network((int(net.network_address) + (i << 8), 24))

    def key(subnet: IPv4Network) -> str:
        return f"{subnet.network_address}-{subnet.prefixlen}"

    def vxlan_lease(ip: IPv4Address, data: dict[str, object]) -> str:
        return json.dumps(
            {"PublicIP": str(ip), "BackendType": "vxlan", "BackendData": data},
            separators=(",", ":"),
        )

    outside = IPv4Network((int(net.network_address) + (100 << 16), 24))  # another 10.x /16
    assert not outside.subnet_of(net)
    dup_mac = "02:00:5e:00:02:03"
    # item name -> (key under subnets/, value, text that identifies its warning)
    leases: dict[str, tuple[str, str, str]] = {
        "unparsable-key": ("not-a-subnet", vxlan_lease(underlay[200], {}), "not-a-subnet"),
        "value-not-json": (key(sub(200)), "garbage{", key(sub(200))),
        "vxlan-without-vtepmac": (
            key(sub(201)),
            vxlan_lease(underlay[201], {"VNI": 1}),
            f"peer {sub(201)} ",
        ),
        "vxlan-vtepmac-zz": (
            key(sub(202)),
            vxlan_lease(underlay[202], {"VNI": 1, "VtepMAC": "zz"}),
            f"peer {sub(202)} ",
        ),
        "outside-network": (
            key(outside),
            vxlan_lease(underlay[203], {"VNI": 1, "VtepMAC": "02:00:5e:00:02:04"}),
            f"lease {key(outside)} is outside Network",
        ),
        # Parses to a valid peer's subnet: must not replace it, nor remove it when deleted.
        "key-aliasing-a-peer": (
            f"x/{key(dup_owner.subnet)}",
            vxlan_lease(underlay[204], {"VNI": 1, "VtepMAC": "02:00:5e:00:02:05"}),
            f"x/{key(dup_owner.subnet)}",
        ),
        "duplicate-public-ip": (
            key(sub(203)),
            vxlan_lease(dup_owner.host.ip, {"VNI": 1, "VtepMAC": dup_mac}),
            f"all claim public IP {dup_owner.host.ip}",
        ),
    }
    configs = {
        "config-malformed-json": ('{"Network": "10.1.0.0/16", "Backend": {', "now unusable"),
        "config-invalid-cidr": (
            '{"Network": "10.300.0.0/16", "Backend": {"Type": "vxlan"}}',
            "10.300.0.0/16",
        ),
    }
    time.sleep(1.5)  # a resync or two: the kernel state is settled
    valid_before = kernel_state(observer.host.ns)

    def warnings(needle: str) -> int:
        assert observer.proc is not None
        return sum(needle in line for line in log_lines(observer.proc))

    bad_config, bad_config_needle = configs["config-malformed-json"]
    cluster.put(CONFIG_KEY, bad_config)
    for name, value, _ in leases.values():
        cluster.put(SUBNETS_PREFIX + name, value)
    everything_warned = wait_for(
        lambda: (
            all(warnings(needle) >= 1 for _, _, needle in leases.values())
            and warnings(bad_config_needle) >= 1
        ),
        timeout=15,
    )
    assert everything_warned is not None, log_lines(observer.proc)
    cidr_config, cidr_needle = configs["config-invalid-cidr"]
    cluster.put(CONFIG_KEY, cidr_config)
    assert wait_for(lambda: warnings(cidr_needle) >= 1, timeout=10), log_lines(observer.proc)
    # The observation window: several resyncs (1 s), config checks (3 s), rule resyncs.
    monitors = [
        observer.host.ns.spawn("ip", "-o", "monitor", "route", "neigh"),
        observer.host.ns.spawn("bridge", "monitor", "fdb"),
    ]
    unhealthy = 0
    began = time.monotonic()
    cluster.delete(SUBNETS_PREFIX + f"x/{key(dup_owner.subnet)}")  # the alias goes away
    while time.monotonic() - began < WINDOW_SECONDS:
        unhealthy += sum(cluster.health(n)[0] != 200 for n in cluster.nodes)
        time.sleep(0.5)
    for monitor in monitors:
        monitor.stop()
    events = [ln for m in monitors for ln in m.output().splitlines()]
    churn = [ln for ln in events if "flannel.1" in ln or "proto 76" in ln]
    cluster.put(CONFIG_KEY, cluster.config_json)

    counts = {name: warnings(needle) for name, (_, _, needle) in leases.items()}
    counts |= {
        "config-malformed-json": sum(
            "now unusable" in ln and "10.300.0.0" not in ln for ln in log_lines(observer.proc)
        ),
        "config-invalid-cidr": warnings(cidr_needle),
    }
    after = kernel_state(observer.host.ns)
    dup_entries = entries_of(after, str(sub(203)), str(sub(203).network_address), dup_mac)
    assert all(n.proc is not None and n.proc.running() for n in cluster.nodes)
    assert counts == dict.fromkeys(counts, 1), counts
    assert churn == [], churn
    assert unhealthy == 0
    # Valid peers untouched; the only addition is the duplicate-IP lease (a valid lease).
    assert sorted(set(after) - set(dup_entries)) == valid_before
    assert len(dup_entries) == 3, dup_entries
    for peer in (dup_owner, third):
        assert cluster.programmed(observer, peer.subnet)
    assert cluster.mesh_failures() == []
    figure(
        "hostile-store-content",
        bad_items=len(counts),
        warnings_per_item=max(counts.values()),
        kernel_churn_events=len(churn),
        window_s=WINDOW_SECONDS,
        unhealthy_polls=unhealthy,
        crashes=0,
        valid_peers_kept=2,
    )
