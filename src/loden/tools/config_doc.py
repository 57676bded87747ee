"""Render docs/config.md from the agent's flag table and the config keys Loden reads.

``python -m loden.tools.config_doc > docs/config.md``. The flag rows come from
:data:`loden.settings.AGENT_FLAGS` (name, variable, default, help), so the page cannot
drift from the code: ``tests/unit/test_config_doc.py`` fails when the file on disk
differs from this output. Only the "where Loden differs" notes are written by hand here.
"""

from __future__ import annotations

import sys
from typing import Any

from loden.flags import Flag
from loden.settings import AGENT_FLAGS

#: Flag name -> how Loden differs from flanneld (absent: identical).
FLAG_NOTES: dict[str, str] = {
    "etcd-api": "Loden only. flanneld ≥ v0.18 speaks v3 only, ≤ v0.17 v2 only",
    "kube-subnet-mgr": "see docs/compat.md for the Kubernetes mode's state",
    "subnet-lease-renew-margin": "out of range: exit 2 with the reason (flanneld: exit 1)",
    "iptables-resync": "also re-checks rule order and extra rules, not only missing ones",
    "healthz-ip": "",
    "healthz-port": "/healthz checks etcd, the lease and reconciles (flanneld: always 200); "
    "adds /metrics and /status (for `loden status`)",
    "version": "prints `v<version>` to stderr like flanneld",
    "v": "0 and 1: info; 2 and up: debug",
    "vmodule": "accepted and ignored",
    "log_backtrace_at": "accepted and ignored",
    "resync-period": "Loden only: full level-triggered data-plane reconcile period",
    "state-dir": "Loden only: the VTEP MAC (bound to the public IP and VNI) survives reboots",
    "cleanup-on-exit": "Loden only: flanneld never removes its rules",
    "log-format": "Loden only: `text` or `json`, the same fields in both (see below)",
    "cloud-metadata-endpoint": "Loden only: flanneld always used 169.254.169.254",
    "iface": "IPv4 and IPv6 alike (flanneld #2081: IPv4 only)",
    "iface-regex": "IPv4 and IPv6 alike",
    "iface-can-reach": "IPv4 and IPv6 alike",
}

#: (key, JSON type, default, Loden's note) for the network config (etcd
#: ``<prefix>/config`` or ``--net-config-path``). Keys are case-insensitive, as in Go.
CONFIG_KEYS: tuple[tuple[str, str, str, str], ...] = (
    ("Network", "string (IPv4 CIDR)", "none (required with EnableIPv4)", ""),
    ("SubnetLen", "unsigned int", "24, or prefix + 2 for a network longer than /22", ""),
    ("SubnetMin", "string (IPv4)", "the second subnet of Network", ""),
    ("SubnetMax", "string (IPv4)", "the last subnet of Network", ""),
    ("EnableIPv4", "bool", "true", ""),
    ("EnableIPv6", "bool", "false", ""),
    ("IPv6Network", "string (IPv6 CIDR)", "none (required with EnableIPv6)", ""),
    ("IPv6SubnetLen", "unsigned int", "64, or prefix + 2 for a network longer than /62", ""),
    ("IPv6SubnetMin", "string (IPv6)", "the second subnet of IPv6Network", ""),
    ("IPv6SubnetMax", "string (IPv6)", "the last subnet of IPv6Network", ""),
    ("EnableNFTables", "bool", "false", "nftables is a first-class mode, not experimental"),
    ("Backend", "object", "absent: `udp` (as flanneld's code; its docs say vxlan)",
     "`Type` is lower-cased; an unknown type stops the agent with the list of known ones"),
)  # fmt: skip

#: (backend, option, type, default, note)
BACKEND_OPTIONS: tuple[tuple[str, str, str, str, str], ...] = (
    ("vxlan", "VNI", "int", "1", "device `flannel.<VNI>`"),
    ("vxlan", "Port", "int", "8472 (kernel default 0 means 8472 here too)", ""),
    ("vxlan", "GBP", "bool", "false", ""),
    ("vxlan", "Learning", "bool", "false", ""),
    ("vxlan", "DirectRouting", "bool", "false", "same L2 segment: plain route, else vxlan"),
    ("vxlan", "MTU", "int", "interface MTU − 50", ""),
    ("vxlan", "TxChecksumOffload", "bool", "auto: off before kernel 5.7, on after",
     "Loden only (flanneld ignores it); set false behind NAT if `loden doctor` reports "
     "checksum errors"),
    ("udp", "Port", "int", "8285", "wire-compatible; worker processes with GRO/GSO"),
    ("wireguard", "ListenPort", "int", "51820", ""),
    ("wireguard", "ListenPortV6", "int", "51821", ""),
    ("wireguard", "MTU", "int", "interface MTU − 80", ""),
    ("wireguard", "PSK", "string", "none", ""),
    ("wireguard", "PersistentKeepaliveInterval", "int (s)", "0", ""),
    ("wireguard", "Mode", "string", "separate", "separate, auto or ipv4/ipv6"),
    ("host-gw", "(none)", "", "", "every peer must be on-link; others are reported, not routed"),
    ("aws-vpc", "RouteTableID", "string or list of strings", "auto: the subnet's table, else "
     "the VPC's main table", "a route `<subnet> -> <ENI>` in each; see compat.md"),
    ("gce", "(none)", "", "", "route `flannel-<a-b-c-d-len>` per node; see compat.md"),
)  # fmt: skip

OTHER_ENV: tuple[tuple[str, str], ...] = (
    ("NODE_NAME, POD_NAME, POD_NAMESPACE", "Kubernetes mode: which node this is"),
    ("WIREGUARD_KEY_FILE", "wireguard private key path (default /run/flannel/wgkey)"),
    (
        "AWS_ENDPOINT_URL_EC2, AWS_ENDPOINT_URL, AWS_EC2_METADATA_SERVICE_ENDPOINT, AWS_*",
        "aws-vpc: EC2 API and metadata endpoints, credentials (boto3's standard chain)",
    ),
    (
        "GCE_METADATA_HOST, CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE",
        "gce: metadata server host, Compute API base URL",
    ),
    ("NOTIFY_SOCKET", "systemd: `READY=1` once subnet.env is written"),
)


def _default(flag: Flag) -> str:
    value: Any = flag.default
    if flag.kind == "bool":
        return "`true`" if value else "`false`"
    if flag.kind == "list":
        return "none (repeatable)"
    return f"`{value}`" if value != "" else '`""`'


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated by `python -m loden.tools.config_doc` from the agent's flag table",
        "(`src/loden/settings.py`); `tests/unit/test_config_doc.py` keeps it in step.",
        "",
        "## Flags and `FLANNELD_*` variables",
        "",
        "Every flag can be given as `-name value`, `-name=value`, `--name value` or",
        "`--name=value` (Go's flag syntax), or as the variable `FLANNELD_<NAME>` (upper",
        "case, `-` becomes `_`); a flag on the command line wins over the variable. Bad",
        "values stop the agent with exit status 2 and the reason. Flags not listed here",
        "are errors.",
        "",
        "| flag | variable | default | meaning | where Loden differs |",
        "|---|---|---|---|---|",
    ]
    for flag in AGENT_FLAGS:
        if flag.hidden:
            continue
        env = f"`{flag.env_name}`" if flag.env else "(none)"
        note = FLAG_NOTES.get(flag.name, "")
        out.append(f"| `-{flag.name}` | {env} | {_default(flag)} | {flag.help} | {note} |")
    out += [
        "",
        "## Other environment variables",
        "",
        "| variable | meaning |",
        "|---|---|",
        *(f"| `{name}` | {meaning} |" for name, meaning in OTHER_ENV),
        "",
        "## Network config keys",
        "",
        "The JSON at etcd key `<etcd-prefix>/config` (default `/coreos.com/network/config`;",
        "`loden config set|get|validate`), or the file `-net-config-path` in Kubernetes",
        "mode. Keys are case-insensitive. Unknown keys are ignored, as in flanneld.",
        "",
        "| key | type | default | where Loden differs |",
        "|---|---|---|---|",
        *(f"| `{k}` | {t} | {d} | {n} |" for k, t, d, n in CONFIG_KEYS),
        "",
        "## Backend options (`Backend` object, besides `Type`)",
        "",
        "| backend | option | type | default | note |",
        "|---|---|---|---|---|",
        *(f"| {b} | `{o}` | {t} | {d} | {n} |" for b, o, t, d, n in BACKEND_OPTIONS),
        "",
        "## Log format",
        "",
        "`-log-format text` (default) prints one line per record:",
        "`2026-01-02T03:04:05.678Z INFO    loden.agent: message`.",
        "`-log-format json` prints the same fields as one JSON object per line:",
        '`{"ts": 1767323045.678, "level": "info", "logger": "loden.agent", "msg": "message"}`',
        "(`ts` in Unix seconds; plus `exc` with the traceback when there is one).",
        "",
    ]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
