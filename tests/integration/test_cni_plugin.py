"""The ``flannel`` CNI plugin run exactly as a runtime runs it, with real delegates.

Each test makes two network namespaces, a "host" (where the plugin, the ``bridge`` and
``host-local`` plugins from /usr/lib/cni run, so the bridge never touches the machine's
own namespace) and a "pod" (``CNI_NETNS``). The plugin is the installed ``flannel``
console script, started with ``CNI_*`` variables and the config on stdin.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_interface, ip_network
from pathlib import Path
from typing import Any

import pytest

CNI_DIR = Path("/usr/lib/cni")
pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(
        not all((CNI_DIR / p).exists() for p in ("bridge", "host-local")),
        reason="needs the CNI reference plugins in /usr/lib/cni",
    ),
]


def plugin_argv() -> list[str]:
    script = Path(sys.executable).parent / "flannel"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "loden.cni.plugin"]


@dataclass(frozen=True, slots=True)
class Lab:
    token: str
    host: str
    pod: str
    bridge: str
    tmp: Path

    @property
    def data_dir(self) -> Path:
        return self.tmp / "flannel"

    @property
    def ipam_dir(self) -> Path:
        return self.tmp / "ipam"

    @property
    def subnet_file(self) -> Path:
        return self.tmp / "subnet.env"

    @property
    def container_id(self) -> str:
        return f"ctr-{self.token}"

    def netconf(self, cni_version: str = "0.3.1", **extra: Any) -> dict[str, Any]:
        return {
            "cniVersion": cni_version,
            "name": "cbr-loden",
            "type": "flannel",
            "subnetFile": str(self.subnet_file),
            "dataDir": str(self.data_dir),
            "delegate": {"bridge": self.bridge, "isDefaultGateway": True},
            "ipam": {"dataDir": str(self.ipam_dir)},
            **extra,
        }

    def cni(
        self,
        command: str,
        stdin: bytes | dict[str, Any],
        *,
        container_id: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id or self.container_id,
            "CNI_NETNS": f"/var/run/netns/{self.pod}",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": str(CNI_DIR),
        }
        data = stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode()
        return subprocess.run(
            ["ip", "netns", "exec", self.host, *plugin_argv()],
            input=data,
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )

    def ip(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "-n", ns, *args], capture_output=True, text=True, timeout=20, check=check
        )


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    token = secrets.token_hex(3)
    lab = Lab(token, f"ldch{token}", f"ldcp{token}", f"ldbr{token}", tmp_path)
    created: list[str] = []
    try:
        for ns in (lab.host, lab.pod):
            subprocess.run(["ip", "netns", "add", ns], check=True, timeout=20)
            created.append(ns)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, timeout=20)
        yield lab
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=20)
        shutil.rmtree(tmp_path, ignore_errors=True)


def write_subnet_env(lab: Lab, *, v4: bool = True, v6: bool = False) -> None:
    lines = []
    if v4:
        lines += ["FLANNEL_NETWORK=10.213.0.0/16", "FLANNEL_SUBNET=10.213.7.1/24"]
    if v6:
        lines += ["FLANNEL_IPV6_NETWORK=fd00:213::/48", "FLANNEL_IPV6_SUBNET=fd00:213:0:7::1/64"]
    lines += ["FLANNEL_MTU=1450", "FLANNEL_IPMASQ=true"]
    lab.subnet_file.write_text("\n".join(lines) + "\n")


def cni_error(result: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    assert result.returncode != 0
    reply = json.loads(result.stdout)
    assert isinstance(reply, dict)
    assert set(reply) == {"cniVersion", "code", "msg", "details"}
    return reply


def test_add_del_lifecycle_ipv4(lab: Lab) -> None:
    write_subnet_env(lab)
    add = lab.cni("ADD", lab.netconf())
    assert add.returncode == 0, add.stdout + add.stderr
    result = json.loads(add.stdout)

    # The result: one address from FLANNEL_SUBNET, gateway .1, the cluster route.
    assert len(result["ips"]) == 1
    address = ip_interface(result["ips"][0]["address"])
    assert address.network == ip_network("10.213.7.0/24")
    assert str(address.ip) != "10.213.7.1"
    assert result["ips"][0]["gateway"] == "10.213.7.1"
    assert {"dst": "10.213.0.0/16"} in result["routes"]

    # The saved delegate config is exactly what flannel renders.
    saved = lab.data_dir / lab.container_id
    expected = (
        '{"cniVersion":"0.3.1","name":"cbr-loden","type":"bridge",'
        f'"bridge":"{lab.bridge}","isDefaultGateway":true,"isGateway":true,'
        '"ipMasq":false,"mtu":1450,"ipam":{"type":"host-local",'
        f'"dataDir":"{lab.ipam_dir}","ranges":[[{{"subnet":"10.213.7.0/24"}}]],'
        '"routes":[{"dst":"10.213.0.0/16"}]}}'
    )
    assert saved.read_text() == expected
    assert oct(saved.stat().st_mode & 0o777) == "0o600"

    # The kernel state: pod address and routes, gateway on the bridge, reachable.
    pod_addr = lab.ip(lab.pod, "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert str(address) in pod_addr
    routes = lab.ip(lab.pod, "-4", "route", "show").stdout
    assert "10.213.0.0/16" in routes
    assert "default via 10.213.7.1" in routes
    assert "10.213.7.1/24" in lab.ip(lab.host, "-4", "-o", "addr", "show", "dev", lab.bridge).stdout
    link = lab.ip(lab.pod, "-o", "link", "show", "dev", "eth0").stdout
    assert "mtu 1450" in link
    ping = subprocess.run(
        ["ip", "netns", "exec", lab.host, "ping", "-c", "1", "-W", "2", str(address.ip)],
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert ping.returncode == 0, ping.stdout

    # CHECK succeeds (flannel implements it as a no-op), for a version that allows it.
    check = lab.cni("CHECK", lab.netconf("1.0.0"))
    assert (check.returncode, check.stdout) == (0, b""), check.stdout

    # DEL removes the saved file, the pod's veth and the IP reservation.
    veths_before = lab.ip(lab.host, "-o", "link", "show", "type", "veth").stdout
    assert veths_before.strip()
    delete = lab.cni("DEL", lab.netconf())
    assert delete.returncode == 0, delete.stdout + delete.stderr
    assert not saved.exists()
    assert lab.ip(lab.pod, "link", "show", "dev", "eth0", check=False).returncode != 0
    assert lab.ip(lab.host, "-o", "link", "show", "type", "veth").stdout.strip() == ""
    assert not (lab.ipam_dir / "cbr-loden" / str(address.ip)).exists()

    # A second DEL, and a DEL for a container that never existed, both succeed.
    again = lab.cni("DEL", lab.netconf())
    assert (again.returncode, again.stdout) == (0, b"")
    never = lab.cni("DEL", lab.netconf(), container_id=f"other-{lab.token}")
    assert (never.returncode, never.stdout) == (0, b"")


def test_add_del_two_networks(lab: Lab) -> None:
    lab.subnet_file.write_text(
        "FLANNEL_NETWORK=10.213.0.0/16,10.214.0.0/16\nFLANNEL_SUBNET=10.213.7.1/24\n"
        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
    )
    add = lab.cni("ADD", lab.netconf())
    assert add.returncode == 0, add.stdout + add.stderr
    saved = json.loads((lab.data_dir / lab.container_id).read_text())
    assert saved["ipam"]["routes"] == [{"dst": "10.213.0.0/16"}, {"dst": "10.214.0.0/16"}]
    routes = lab.ip(lab.pod, "-4", "route", "show").stdout
    assert "10.213.0.0/16" in routes and "10.214.0.0/16" in routes
    assert lab.cni("DEL", lab.netconf()).returncode == 0
    assert not (lab.data_dir / lab.container_id).exists()


def test_add_del_dual_stack(lab: Lab) -> None:
    write_subnet_env(lab, v6=True)
    add = lab.cni("ADD", lab.netconf("1.0.0"))
    assert add.returncode == 0, add.stdout + add.stderr
    result = json.loads(add.stdout)
    addresses = [ip_interface(entry["address"]) for entry in result["ips"]]
    assert sorted(a.version for a in addresses) == [4, 6]
    assert any(a.network == ip_network("fd00:213:0:7::/64") for a in addresses)
    saved = json.loads((lab.data_dir / lab.container_id).read_text())
    assert saved["ipam"]["ranges"] == [
        [{"subnet": "10.213.7.0/24"}],
        [{"subnet": "fd00:213:0:7::/64"}],
    ]
    assert saved["ipam"]["routes"] == [{"dst": "10.213.0.0/16"}, {"dst": "fd00:213::/48"}]
    assert lab.cni("DEL", lab.netconf("1.0.0")).returncode == 0
    assert lab.ip(lab.pod, "link", "show", "dev", "eth0", check=False).returncode != 0


def test_del_after_saved_file_is_gone(lab: Lab) -> None:
    write_subnet_env(lab)
    assert lab.cni("ADD", lab.netconf()).returncode == 0
    (lab.data_dir / lab.container_id).unlink()
    delete = lab.cni("DEL", lab.netconf())
    assert (delete.returncode, delete.stdout) == (0, b"")


def test_version(lab: Lab) -> None:
    result = lab.cni("VERSION", b"")
    assert result.returncode == 0
    assert json.loads(result.stdout) == {
        "cniVersion": "1.1.0",
        "supportedVersions": ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }


def test_malformed_stdin(lab: Lab) -> None:
    reply = cni_error(lab.cni("ADD", b'{"name": "cbr-loden", '))
    assert reply["code"] == 6
    assert reply["msg"].startswith("error unmarshall network config:")


def test_missing_subnet_env(lab: Lab) -> None:
    reply = cni_error(lab.cni("ADD", lab.netconf()))
    assert reply["code"] == 11
    assert reply["msg"] == (
        f"failed to load flannel 'subnet.env' file: open {lab.subnet_file}: no such file or "
        "directory. Check the flannel pod log for this node."
    )
    assert not (lab.data_dir / lab.container_id).exists()


def test_status_follows_subnet_env(lab: Lab) -> None:
    not_ready = cni_error(lab.cni("STATUS", lab.netconf("1.1.0")))
    assert not_ready["code"] == 50
    write_subnet_env(lab)
    ready = lab.cni("STATUS", lab.netconf("1.1.0"))
    assert (ready.returncode, ready.stdout) == (0, b"")


def test_unknown_command(lab: Lab) -> None:
    reply = cni_error(lab.cni("FROB", lab.netconf()))
    assert (reply["code"], reply["msg"]) == (4, "unknown CNI_COMMAND: FROB")


def test_delegate_error_is_the_reply(lab: Lab) -> None:
    write_subnet_env(lab)
    # A non-bridge device already holds the bridge's name: the bridge plugin's ADD
    # fails and its error reply must come back unchanged.
    lab.ip(lab.host, "link", "add", lab.bridge, "type", "veth", "peer", "name", f"ldpe{lab.token}")
    reply = cni_error(lab.cni("ADD", lab.netconf()))
    assert reply["cniVersion"] == "0.3.1"
    assert lab.bridge in reply["msg"] and "not a bridge" in reply["msg"], reply
    saved = lab.data_dir / lab.container_id
    assert saved.exists()  # left for the runtime's DEL after a failed ADD
    delete = lab.cni("DEL", lab.netconf())
    assert delete.returncode == 0, delete.stdout
    assert not saved.exists()
