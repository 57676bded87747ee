"""Agent settings: flanneld's flags (spec §1.2) plus Loden's few additions, frozen.

``cli.py`` is the only place that reads ``argv`` and the environment; it builds an
:class:`AgentSettings` once and passes it down.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import TypeVar

from loden.errors import UsageError
from loden.flags import Flag, FlagSet, ParsedFlags

AGENT_FLAGS: tuple[Flag, ...] = (
    Flag(
        "etcd-endpoints",
        "http://127.0.0.1:4001,http://127.0.0.1:2379",
        "a comma-delimited list of etcd endpoints",
    ),
    Flag("etcd-prefix", "/coreos.com/network", "etcd prefix"),
    Flag("etcd-keyfile", "", "SSL key file used to secure etcd communication"),
    Flag("etcd-certfile", "", "SSL certification file used to secure etcd communication"),
    Flag("etcd-cafile", "", "SSL Certificate Authority file used to secure etcd communication"),
    Flag("etcd-username", "", "username for BasicAuth to etcd"),
    Flag("etcd-password", "", "password for BasicAuth to etcd"),
    Flag(
        "etcd-api",
        "auto",
        "etcd API to use: auto (v3 if <prefix>/config exists there, else v2), v3 or v2",
    ),
    Flag(
        "kube-subnet-mgr",
        False,
        "contact the Kubernetes API for subnet assignment instead of etcd",
        kind="bool",
    ),
    Flag(
        "kube-api-url",
        "",
        "Kubernetes API server URL. Does not need to be specified if flannel is running in a pod.",
    ),
    Flag(
        "kubeconfig-file",
        "",
        "kubeconfig file location. Does not need to be specified if flannel is running in a pod.",
    ),
    Flag(
        "kube-annotation-prefix",
        "flannel.alpha.coreos.com",
        'Kubernetes annotation prefix. Can contain single slash "/", otherwise it will be '
        "appended at the end.",
    ),
    Flag(
        "net-config-path",
        "/etc/kube-flannel/net-conf.json",
        "path to the network configuration file",
    ),
    Flag(
        "set-node-network-unavailable", True, "set NodeNetworkUnavailable after ready", kind="bool"
    ),
    Flag(
        "iface",
        [],
        "interface to use (IP or name) for inter-host communication. "
        "Can be specified multiple times to check each option in order.",
        kind="list",
    ),
    Flag(
        "iface-regex",
        [],
        "regex expression to match the first interface to use (IP or "
        "name) for inter-host communication. Can be specified multiple times.",
        kind="list",
    ),
    Flag(
        "iface-can-reach",
        "",
        "detect interface to use (IP or name) for inter-host "
        "communication based on which will be used for provided IP.",
    ),
    Flag("public-ip", "", "IP accessible by other nodes for inter-host communication"),
    Flag("public-ipv6", "", "IPv6 accessible by other nodes for inter-host communication"),
    Flag(
        "subnet-file",
        "/run/flannel/subnet.env",
        "filename where env variables (subnet, MTU, ... ) will be written to",
    ),
    Flag(
        "subnet-lease-renew-margin",
        60,
        "subnet lease renewal margin, in minutes, ranging from 1 to 1439",
        kind="int",
    ),
    Flag(
        "ip-masq",
        False,
        "setup IP masquerade rule for traffic destined outside of overlay network",
        kind="bool",
    ),
    Flag(
        "ip-masq-fully-random-disable",
        False,
        "disable fully random source port for IP masquerade",
        kind="bool",
    ),
    Flag("iptables-resync", 5, "resync period for iptables rules, in seconds", kind="int"),
    Flag(
        "iptables-forward-rules",
        True,
        "add default accept rules to FORWARD chain in iptables",
        kind="bool",
    ),
    Flag(
        "ip-blackhole-route",
        False,
        "install a blackhole route for the node's own subnet",
        kind="bool",
    ),
    Flag("healthz-ip", "0.0.0.0", "the IP address for healthz server to listen"),
    Flag("healthz-port", 0, "the port for healthz server to listen(0 to disable)", kind="int"),
    Flag("version", False, "print version and exit", kind="bool", env=False),
    Flag("v", 0, "log level for V logs", kind="int"),
    Flag("vmodule", "", "comma-separated list of pattern=N settings for file-filtered logging"),
    Flag("log_backtrace_at", "", "when logging hits line file:N, emit a stack trace"),
    # Loden additions.
    Flag(
        "resync-period",
        300,
        "Loden: seconds between full data-plane reconciles (dump and diff). A safety net "
        "while -kernel-events repairs drift as it happens; backends without kernel "
        "notifications (udp, wireguard, aws-vpc, gce) pass at least every 10 s",
        kind="int",
    ),
    Flag(
        "kernel-events",
        True,
        "Loden: repair owned routes, neighbours and FDB entries as soon as the kernel "
        "reports them changed (netlink notifications); false: only -resync-period finds drift",
        kind="bool",
    ),
    Flag(
        "state-dir",
        "/var/lib/loden",
        "Loden: directory for state that must survive reboots (VTEP MAC)",
    ),
    Flag(
        "cleanup-on-exit",
        False,
        "Loden: remove masquerade/forward rules on a clean shutdown (flannel leaves them)",
        kind="bool",
    ),
    Flag(
        "subnet-lease-ttl",
        86400,
        "Loden: lease TTL in seconds (flannel: 24h; lower only for tests and labs)",
        kind="int",
        hidden=True,
    ),
    Flag("log-format", "text", "Loden: log format, text or json"),
    Flag(
        "cloud-metadata-endpoint",
        "",
        "Loden: aws-vpc/gce instance metadata URL (default: AWS_EC2_METADATA_SERVICE_ENDPOINT"
        " or GCE_METADATA_HOST, else http://169.254.169.254)",
    ),
)


def agent_flagset(prog: str) -> FlagSet:
    return FlagSet(prog, AGENT_FLAGS)


@dataclass(frozen=True, slots=True)
class EtcdSettings:
    endpoints: tuple[str, ...]
    prefix: str
    keyfile: str
    certfile: str
    cafile: str
    username: str
    password: str
    api: str  # auto | v3 | v2

    @property
    def tls_client(self) -> bool:
        # flannel (compat, spec §11 item 5): client TLS only with both cert and key.
        return bool(self.keyfile and self.certfile)

    def __repr__(self) -> str:  # never print the password
        return (
            f"EtcdSettings(endpoints={self.endpoints!r}, prefix={self.prefix!r}, "
            f"api={self.api!r}, tls_client={self.tls_client}, "
            f"username={self.username!r}, password={'***' if self.password else ''!r})"
        )


@dataclass(frozen=True, slots=True)
class KubeSettings:
    enabled: bool
    api_url: str
    kubeconfig_file: str
    annotation_prefix: str
    net_config_path: str
    set_node_network_unavailable: bool


@dataclass(frozen=True, slots=True)
class IfaceSettings:
    ifaces: tuple[str, ...]
    iface_regexes: tuple[str, ...]
    can_reach: IPv4Address | IPv6Address | None
    public_ip: IPv4Address | None
    public_ipv6: IPv6Address | None


#: flanneld's WireGuard private key file (``WIREGUARD_KEY_FILE`` overrides it).
DEFAULT_WIREGUARD_KEY_FILE = Path("/run/flannel/wgkey")


@dataclass(frozen=True, slots=True)
class BackendSettings:
    """The data plane's knobs that belong to the agent, not to the network config:
    where the data plane runs and what it names. The agent sets ``wireguard_key_file``
    from ``WIREGUARD_KEY_FILE`` (as flanneld); the lab, tests and benchmarks set the rest.
    """

    #: Run the data plane inside this network namespace (lab, tests, benchmarks).
    netns: str | None = None
    wireguard_key_file: Path = DEFAULT_WIREGUARD_KEY_FILE
    wireguard_device: str = "flannel-wg"
    wireguard_device_v6: str = "flannel-wg-v6"
    #: udp data-plane worker processes; None: one per CPU, at most 4.
    udp_workers: int | None = None
    #: udp TUN segmentation offload; None: on where the C loops exist.
    udp_tso: bool | None = None
    #: aws-vpc/gce: the instance metadata service's URL (tests, the lab); None: the
    #: standard variable (AWS_EC2_METADATA_SERVICE_ENDPOINT, GCE_METADATA_HOST), else
    #: 169.254.169.254.
    cloud_metadata_endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class RulesSettings:
    ip_masq: bool
    fully_random_disable: bool
    resync_seconds: int
    forward_rules: bool
    blackhole_route: bool
    cleanup_on_exit: bool


@dataclass(frozen=True, slots=True)
class AgentSettings:
    etcd: EtcdSettings
    kube: KubeSettings
    iface: IfaceSettings
    rules: RulesSettings
    subnet_file: Path
    renew_margin_minutes: int
    lease_ttl_seconds: int
    healthz_ip: str
    healthz_port: int
    resync_seconds: int
    kernel_events: bool
    state_dir: Path
    verbosity: int
    log_format: str
    backend: BackendSettings = BackendSettings()

    @classmethod
    def from_flags(cls, parsed: ParsedFlags, env: Mapping[str, str] | None = None) -> AgentSettings:
        """Validate and group parsed flags (``env``: the variables that are not flags,
        such as ``WIREGUARD_KEY_FILE``).

        :raises UsageError: a value is out of range or malformed (names the flag).
        """
        v = parsed.values
        margin = v["subnet-lease-renew-margin"]
        if not 1 <= margin <= 1439:
            raise UsageError(
                f"Invalid subnet-lease-renew-margin option, out of acceptable range: {margin} "
                "(minutes, 1..1439)"
            )
        if v["etcd-api"] not in ("auto", "v3", "v2"):
            raise UsageError(f"invalid -etcd-api {v['etcd-api']!r}: use auto, v3 or v2")
        if v["log-format"] not in ("text", "json"):
            raise UsageError(f"invalid -log-format {v['log-format']!r}: use text or json")
        for name in ("iptables-resync", "resync-period", "subnet-lease-ttl"):
            if v[name] <= 0:
                raise UsageError(f"invalid -{name} {v[name]}: must be a positive number")
        if not 0 <= v["healthz-port"] <= 65535:
            raise UsageError(f"invalid -healthz-port {v['healthz-port']}: must be 0..65535")
        endpoints = tuple(e for e in v["etcd-endpoints"].split(",") if e)
        for endpoint in endpoints:
            if not endpoint.startswith(("http://", "https://")):
                raise UsageError(
                    f"invalid etcd endpoint {endpoint!r} in -etcd-endpoints: "
                    "expected http://host:port or https://host:port"
                )
        return cls(
            etcd=EtcdSettings(
                endpoints=endpoints,
                prefix=posixpath.normpath("/" + v["etcd-prefix"]).replace("//", "/"),
                keyfile=v["etcd-keyfile"],
                certfile=v["etcd-certfile"],
                cafile=v["etcd-cafile"],
                username=v["etcd-username"],
                password=v["etcd-password"],
                api=v["etcd-api"],
            ),
            kube=KubeSettings(
                enabled=v["kube-subnet-mgr"],
                api_url=v["kube-api-url"],
                kubeconfig_file=v["kubeconfig-file"],
                annotation_prefix=v["kube-annotation-prefix"],
                net_config_path=v["net-config-path"],
                set_node_network_unavailable=v["set-node-network-unavailable"],
            ),
            iface=IfaceSettings(
                ifaces=tuple(v["iface"]),
                iface_regexes=tuple(v["iface-regex"]),
                can_reach=_can_reach(v["iface-can-reach"]),
                public_ip=_ip(v["public-ip"], "-public-ip", IPv4Address),
                public_ipv6=_ip(v["public-ipv6"], "-public-ipv6", IPv6Address),
            ),
            rules=RulesSettings(
                ip_masq=v["ip-masq"],
                fully_random_disable=v["ip-masq-fully-random-disable"],
                resync_seconds=v["iptables-resync"],
                forward_rules=v["iptables-forward-rules"],
                blackhole_route=v["ip-blackhole-route"],
                cleanup_on_exit=v["cleanup-on-exit"],
            ),
            subnet_file=Path(v["subnet-file"]),
            renew_margin_minutes=margin,
            lease_ttl_seconds=v["subnet-lease-ttl"],
            healthz_ip=v["healthz-ip"],
            healthz_port=v["healthz-port"],
            resync_seconds=v["resync-period"],
            kernel_events=v["kernel-events"],
            state_dir=Path(v["state-dir"]),
            verbosity=v["v"],
            log_format=v["log-format"],
            backend=BackendSettings(
                wireguard_key_file=Path(
                    (env or {}).get("WIREGUARD_KEY_FILE") or DEFAULT_WIREGUARD_KEY_FILE
                ),
                cloud_metadata_endpoint=v["cloud-metadata-endpoint"] or None,
            ),
        )


_IP = TypeVar("_IP", IPv4Address, IPv6Address)


def _ip(text: str, flag: str, kind: type[_IP]) -> _IP | None:
    if not text:
        return None
    try:
        return kind(text)
    except ValueError:
        family = "IPv4" if kind is IPv4Address else "IPv6"
        raise UsageError(f"invalid {flag} {text!r}: not an {family} address") from None


def _can_reach(text: str) -> IPv4Address | IPv6Address | None:
    if not text:
        return None
    try:
        return ip_address(text)
    except ValueError:
        raise UsageError(f"invalid -iface-can-reach {text!r}: not an IP address") from None


def parse_agent_args(
    argv: Sequence[str], env: Mapping[str, str], prog: str = "flanneld"
) -> AgentSettings:
    return AgentSettings.from_flags(agent_flagset(prog).parse(argv, env), env)
