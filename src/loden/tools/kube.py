"""``loden kube manifest|install-conf`` and ``loden leases`` in kube mode.

* ``manifest``: print the DaemonSet manifest (:mod:`loden.tools.kube_manifest`);
* ``install-conf SRC DST``: copy the CNI conflist atomically, as flannel's
  ``install-conf`` (temp file ``.DST.tmp*`` beside DST, fsync, the source's mode,
  rename), so the runtime never reads half a file;
* :func:`leases`: nodes, podCIDRs and flannel annotations from the API server.
"""

from __future__ import annotations

import argparse
import json
import stat
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loden.errors import ConfigError, LodenError
from loden.files import replace_file
from loden.tools.kube_manifest import DEFAULT_IMAGE, NAMESPACE, ManifestOptions, render

USAGE = """usage:
  loden kube manifest [--image IMG] [--network CIDR] [--backend TYPE] [--namespace NS]
                      [--no-ip-masq]
  loden kube install-conf SRC DST
"""


def install_conf(src: Path, dst: Path) -> None:
    """:raises ConfigError: SRC unreadable or DST's directory not writable."""
    try:
        data = src.read_bytes()
        mode = stat.S_IMODE(src.stat().st_mode)
    except OSError as exc:
        raise ConfigError(f"cannot read {src}: {exc.strerror or exc}") from exc
    try:
        replace_file(dst, data, mode=mode)
    except OSError as exc:
        raise ConfigError(f"cannot install {dst}: {exc.strerror or exc}") from exc


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="loden kube", usage=USAGE)
    sub = parser.add_subparsers(dest="command", required=True)
    man = sub.add_parser("manifest")
    man.add_argument("--image", default=DEFAULT_IMAGE)
    man.add_argument("--network", default="10.244.0.0/16")
    man.add_argument("--backend", default="vxlan")
    man.add_argument("--namespace", default=NAMESPACE)
    man.add_argument("--no-ip-masq", action="store_true")
    inst = sub.add_parser("install-conf")
    inst.add_argument("src", type=Path)
    inst.add_argument("dst", type=Path)
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        if args.command == "manifest":
            opts = ManifestOptions(
                image=args.image,
                network=args.network,
                backend=args.backend,
                namespace=args.namespace,
                ip_masq=not args.no_ip_masq,
            )
            sys.stdout.write(render(opts))
            return 0
        install_conf(args.src, args.dst)
        return 0
    except LodenError as exc:
        sys.stderr.write(f"loden kube: {exc}\n")
        return 1


async def leases(values: Mapping[str, object], env: Mapping[str, str]) -> int:
    """``loden leases --kube-subnet-mgr``: every node, its podCIDR(s) and annotations."""
    from rich.console import Console
    from rich.table import Table

    from loden.subnet.kube import config as kubeconfig
    from loden.subnet.kube.annotations import AnnotationKeys
    from loden.subnet.kube.client import KubeClient
    from loden.subnet.kube.nodes import NodeInfo, NodeSkipped, node_to_lease

    keys = AnnotationKeys.for_flag(str(values["kube-annotation-prefix"]))
    client = KubeClient(
        kubeconfig.load(
            api_url=str(values["kube-api-url"]),
            kubeconfig_file=str(values["kubeconfig-file"]),
            env=env,
        )
    )
    try:
        listing = await client.list_nodes()
    finally:
        await client.aclose()
    rows: list[dict[str, Any]] = []
    for obj in listing.items:
        try:
            node = NodeInfo.from_object(obj, keys)
        except NodeSkipped:
            continue
        try:
            node_to_lease(node, keys)
            status = "peer"
        except NodeSkipped as exc:
            status = f"skipped: {exc}"
        ann = {k.removeprefix(keys.prefix): v for k, v in node.annotations.items()}
        rows.append(
            {
                "node": node.name,
                "pod_cidrs": list(node.pod_cidrs or ([node.pod_cidr] if node.pod_cidr else [])),
                "annotations": ann,
                "status": status,
            }
        )
    if values.get("json"):
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return 0
    table = Table(title=f"nodes (annotation prefix {keys.prefix})")
    for column in ("node", "podCIDR", "public IP", "backend", "backend data", "status"):
        table.add_column(column)
    for row in rows:
        ann = row["annotations"]
        table.add_row(
            row["node"],
            ",".join(row["pod_cidrs"]) or "-",
            ",".join(x for x in (ann.get("public-ip"), ann.get("public-ipv6")) if x) or "-",
            ann.get("backend-type", "-") or "(udp)",
            ann.get("backend-data", "-"),
            row["status"],
        )
    Console(file=sys.stdout, width=160, emoji=False, highlight=False).print(table)
    return 0
