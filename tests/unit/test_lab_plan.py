"""Lab naming, addressing, state records and unit-file handling (no root needed)."""

from __future__ import annotations

import os
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import pytest

from loden import sdnotify
from loden.errors import UsageError
from loden.lab import netns as lab_netns_mod
from loden.lab import plan as plan_mod
from loden.lab import state as state_mod
from loden.lab import teardown, units
from loden.lab.node import CNI_DROPIN, DOCKER_OPTS_FILE
from loden.lab.plan import LabPlan, check_name, pick_addresses
from loden.lab.state import ContainerRecord, LabState, NodeRecord, PodRecord, ProcRecord
from loden.model.config import NetworkConfig
from loden.tools.systemd import RenderOptions, write_files
from loden.tools.systemd_files import exec_argv, unit_environment


def make_plan(name: str = "demo", **changes: Any) -> LabPlan:
    underlay, network = pick_addresses(name, [])
    values: dict[str, Any] = dict(
        name=name,
        nodes=3,
        backend="vxlan",
        runtime="cni",
        etcd="single",
        tls=False,
        etcd_api="v3",
        pods_per_node=2,
        underlay=underlay,
        network=network,
    )
    values.update(changes)
    return LabPlan(**values)


@pytest.mark.parametrize("name", ["demo", "a", "lab-2", "abcdefghij0123456789"])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "Demo", "2lab", "a_b", "a--b", "lab-", "a" * 21, "a/b"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(UsageError, match="invalid lab name"):
        check_name(name)


def test_addresses_are_stable_private_and_avoid_taken() -> None:
    underlay, network = pick_addresses("demo", [])
    assert (underlay, network) == pick_addresses("demo", [])
    assert underlay.subnet_of(IPv4Network("172.16.0.0/12")) and underlay.prefixlen == 24
    assert network.subnet_of(IPv4Network("10.64.0.0/10")) and network.prefixlen == 16
    other_underlay, other_network = pick_addresses("demo", [underlay, network])
    assert not other_underlay.overlaps(underlay) and not other_network.overlaps(network)


def test_plan_names_addresses_and_config() -> None:
    plan = make_plan(etcd="cluster", tls=True)
    assert plan.node_names() == ["node1", "node2", "node3"]
    assert plan.node_ns("node2") == "loden-demo-node2"
    assert plan.pod_ns(plan.pod_name("node2", 1)) == "loden-demo-node2-pod1"
    assert plan.node_address("node3").ip == plan.underlay.network_address + 13
    assert plan.gateway.ip == plan.underlay.network_address + 1
    assert plan.etcd_addresses() == [plan.underlay.network_address + i for i in (2, 3, 4)]
    assert plan.etcd_endpoints().count("https://") == 3
    config = NetworkConfig.parse(plan.network_config())
    assert config.network == plan.network and config.backend_type == "vxlan"
    assert LabPlan.from_json(plan.to_json()) == plan
    # Interface names inside the lab's namespaces stay short whatever the lab name.
    assert all(len(n) <= 15 for n in make_plan(nodes=50).node_names())


@pytest.mark.parametrize(
    ("field", "value"), [("nodes", 0), ("backend", "ipip"), ("runtime", "crio"), ("etcd", "x")]
)
def test_plan_rejects_bad_options(field: str, value: Any) -> None:
    with pytest.raises(UsageError):
        make_plan(**{field: value})


@pytest.mark.parametrize(
    ("mode", "families", "ipv4_enabled"), [("dual", (4, 6), True), ("only", (6,), False)]
)
def test_ipv6_plan_addresses_and_config(
    mode: str, families: tuple[int, ...], ipv4_enabled: bool
) -> None:
    plan = make_plan(ipv6=mode)
    assert plan.families == families
    assert plan.underlay6.prefixlen == 64 and plan.network6.prefixlen == 56
    assert plan.underlay6.subnet_of(IPv6Network("fc00::/7"))
    assert plan.network6.subnet_of(IPv6Network("fc00::/7"))
    assert plan.node_address6("node2").ip == plan.underlay6.network_address + 12
    assert plan.gateway6.ip == plan.underlay6.network_address + 1
    config = NetworkConfig.parse(plan.network_config())
    assert config.enable_ipv6 and config.ipv6_network == plan.network6
    assert config.enable_ipv4 is ipv4_enabled
    assert LabPlan.from_json(plan.to_json()) == plan
    # Another lab's addresses differ in both families.
    other = make_plan("other", ipv6=mode)
    assert not other.underlay6.overlaps(plan.underlay6) or other.underlay == plan.underlay


def test_ipv4_plan_is_unchanged_by_ipv6() -> None:
    plan = make_plan()
    assert plan.families == (4,) and plan.ipv6 == "off"
    assert plan.network_config() == (
        f'{{"Network": "{plan.network}", "Backend": {{"Type": "vxlan"}}}}'
    )
    data = plan.to_json()
    del data["ipv6"]  # a state.json written before --ipv6 existed
    assert LabPlan.from_json(data) == plan


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"ipv6": "dual", "backend": "udp"}, "udp backend is IPv4-only"),
        ({"ipv6": "only", "runtime": "docker"}, "Docker's default bridge always needs an IPv4"),
        ({"ipv6": "both"}, "use dual or only"),
        ({"ipv6": "dual", "with_agent": False}, "needs the agent"),
        ({"ipv6": "dual", "store": "kube"}, "not implemented by the lab yet"),
    ],
)
def test_ipv6_plan_refusals(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        make_plan(**changes)


def test_dual_stack_records_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_mod, "LAB_ROOT", tmp_path)
    monkeypatch.setattr(state_mod, "LAB_ROOT", tmp_path)
    state = LabState(make_plan(ipv6="dual"))
    state.set_node(NodeRecord("node1", "ns1", "172.16.0.11/24", "/m1", address6="fd6c::11/64"))
    state.update_node("node1", subnet="10.64.3.0/24", subnet6="fd6e:40:0:3::/64")
    state.add_pod(PodRecord("node1-pod0", "node1", "10.64.3.2", "/p", (), ip6="fd6e:40:0:3::2"))
    loaded = LabState.load("demo")
    node = loaded.nodes["node1"]
    assert (node.subnet_of(4), node.subnet_of(6)) == ("10.64.3.0/24", "fd6e:40:0:3::/64")
    assert node.address_of(6) == "fd6c::11/64"
    assert loaded.pods[0].address(6) == "fd6e:40:0:3::2"
    assert loaded.pods[0].address(4) == "10.64.3.2"


def test_state_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_mod, "LAB_ROOT", tmp_path)
    monkeypatch.setattr(state_mod, "LAB_ROOT", tmp_path)
    state = LabState(make_plan())
    state.record_netns("loden-demo-underlay")
    state.record_mount("/x")
    state.record_process(ProcRecord("etcd", "etcd1", 42, 7, ("etcd", "--x"), "/log"))
    state.set_node(NodeRecord("node2", "ns2", "172.16.0.12/24", "/m2"))
    state.set_node(NodeRecord("node1", "ns1", "172.16.0.11/24", "/m1"))
    state.update_node("node1", subnet="10.64.3.0/24", mtu=1450)
    state.add_pod(PodRecord("node1-pod1", "node1", "10.64.3.3", "/p", ()))
    state.add_pod(
        PodRecord("node1-pod0", "node1", "10.64.3.2", "/p", (ContainerRecord("app", 5, 6),))
    )
    loaded = LabState.load("demo")
    assert loaded.plan == state.plan
    assert list(loaded.nodes) == ["node1", "node2"]
    assert loaded.nodes["node1"].subnet == "10.64.3.0/24"
    assert [p.name for p in loaded.pods] == ["node1-pod0", "node1-pod1"]
    assert loaded.pods[0].containers[0].name == "app"
    assert loaded.processes == state.processes and loaded.netns == state.netns


def test_lab_netns_never_matches_another_lab(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for entry in (
        "loden-a-underlay",
        "loden-a-node1",
        "loden-a-node1-pod0",
        "loden-a-b-node1",
        "loden-a-b-underlay",
        "loden-ab-node1",
        "other",
    ):
        (tmp_path / entry).touch()
    monkeypatch.setattr(lab_netns_mod, "NETNS_DIR", tmp_path)
    assert teardown.lab_netns("a") == ["loden-a-node1-pod0", "loden-a-underlay", "loden-a-node1"]
    assert teardown.lab_netns("a-b") == ["loden-a-b-underlay", "loden-a-b-node1"]


# -- the tiny systemd ---------------------------------------------------------------------------


def rendered_root(tmp_path: Path) -> Path:
    write_files(
        tmp_path,
        RenderOptions(
            etcd_endpoints="http://172.16.0.2:2379",
            etcd_cafile="",
            etcd_certfile="",
            etcd_keyfile="",
            extra_options="-healthz-port=8471",
        ),
    )
    return tmp_path


def test_dropin_resets_exec_start_post(tmp_path: Path) -> None:
    root = rendered_root(tmp_path)
    seed = units.load_unit(root, "flanneld.service")
    assert units.exec_lines(seed, "ExecStartPost") == [
        "/opt/kubernetes/bin/mk-docker-opts.sh -k DOCKER_NETWORK_OPTIONS -d /run/flannel/subnet.env"
    ]
    units.write_dropin(root, "flanneld.service", "10-lab-cni", CNI_DROPIN)
    merged = units.load_unit(root, "flanneld.service")
    posts = units.exec_lines(merged, "ExecStartPost")
    assert len(posts) == 1 and posts[0].endswith(f"-d {DOCKER_OPTS_FILE}")
    env = unit_environment(merged, root=root, base_env=units.BASE_ENV)
    argv = exec_argv(units.exec_lines(merged, "ExecStart")[0], env)
    assert argv == [
        "/opt/kubernetes/bin/flanneld",
        "--ip-masq",
        "--etcd-endpoints=http://172.16.0.2:2379",
        "-healthz-port=8471",
    ]


def test_exec_lines_reset_and_append() -> None:
    text = (
        "[Service]\nExecStart=/a\nExecStartPost=/b\nExecStartPost=/c\nExecStartPost=\n"
        "ExecStartPost=/d\n"
    )
    assert units.exec_lines(text, "ExecStartPost") == ["/d"]
    assert units.exec_lines(text, "ExecStart") == ["/a"]
    assert units.exec_lines(text, "ExecReload") == []


def test_notify_socket_reports_sender_pid(tmp_path: Path) -> None:
    listener = units.NotifySocket(tmp_path / "notify.sock")
    try:
        assert sdnotify.notify("READY=1\nSTATUS=ok", socket_path=str(listener.path))
        message = listener.receive(2.0)
        assert message == (os.getpid(), ["READY=1", "STATUS=ok"])
        assert listener.receive(0.05) is None
    finally:
        listener.close()
    assert not (tmp_path / "notify.sock").exists()
