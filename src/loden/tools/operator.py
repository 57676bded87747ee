"""Operator commands: ``loden config get|set|validate`` and ``loden leases``.

They take the agent's etcd flags (and ``FLANNELD_ETCD_*`` variables), so the same
``/opt/kubernetes/cfg/flanneld`` options work for both. ``config set`` validates
before writing: a config that would stop every agent is refused with the reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from loden.errors import LodenError, NetworkConfigError, UsageError
from loden.flags import Flag, FlagSet, HelpRequested
from loden.model.config import NetworkConfig
from loden.model.lease import Lease
from loden.settings import AGENT_FLAGS, EtcdSettings
from loden.subnet import open_store
from loden.subnet.manager import EtcdSubnetManager

_ETCD_FLAGS = tuple(f for f in AGENT_FLAGS if f.name.startswith("etcd-"))
_KUBE_FLAGS = tuple(
    f
    for f in AGENT_FLAGS
    if f.name in ("kube-subnet-mgr", "kube-api-url", "kubeconfig-file", "kube-annotation-prefix")
)
_EXTRA = (
    Flag("json", False, "print JSON instead of a table", kind="bool", env=False),
    Flag("delete", "", "delete the lease with this key (e.g. 10.5.3.0-24)", env=False),
    Flag("file", "", "read the config from this file", env=False),
)

USAGE = """usage:
  loden config get [etcd flags]
  loden config set '<json>' | -file F [etcd flags]
  loden config validate ['<json>' | -file F]   (no argument: validate the stored config)
  loden leases [-json] [-delete KEY] [etcd flags]
  loden leases -kube-subnet-mgr [-json] [-kubeconfig-file F] [-kube-api-url U]
               [-kube-annotation-prefix P]   (nodes, podCIDRs and flannel annotations)
etcd flags are the agent's: -etcd-endpoints, -etcd-prefix, -etcd-cafile, -etcd-certfile,
-etcd-keyfile, -etcd-username, -etcd-password, -etcd-api (auto|v3|v2).
"""


def _etcd_settings(values: dict[str, object]) -> EtcdSettings:
    endpoints = tuple(e for e in str(values["etcd-endpoints"]).split(",") if e)
    api = str(values["etcd-api"])
    if api not in ("auto", "v3", "v2"):
        raise UsageError(f"invalid -etcd-api {api!r}: use auto, v3 or v2")
    return EtcdSettings(
        endpoints=endpoints,
        prefix="/" + str(values["etcd-prefix"]).strip("/"),
        keyfile=str(values["etcd-keyfile"]),
        certfile=str(values["etcd-certfile"]),
        cafile=str(values["etcd-cafile"]),
        username=str(values["etcd-username"]),
        password=str(values["etcd-password"]),
        api=api,
    )


def main(argv: Sequence[str]) -> int:
    command = list(argv)
    flagset = FlagSet(f"loden {command[0]}", _ETCD_FLAGS + _KUBE_FLAGS + _EXTRA)
    try:
        if command[0] == "config":
            if len(command) < 2 or command[1] not in ("get", "set", "validate"):
                raise UsageError("config needs get, set or validate")
            parsed = flagset.parse(command[2:], os.environ, interspersed=True)
            return asyncio.run(_config(command[1], parsed.positional, parsed.values))
        parsed = flagset.parse(command[1:], os.environ, interspersed=True)
        if parsed.positional:
            raise UsageError(f"unexpected argument {parsed.positional[0]!r}")
        return asyncio.run(_leases(parsed.values))
    except HelpRequested:
        sys.stdout.write(USAGE)
        return 0
    except UsageError as exc:
        sys.stderr.write(f"loden: {exc}\n{USAGE}")
        return 2
    except LodenError as exc:
        sys.stderr.write(f"loden: {exc}\n")
        return 1


def _config_text(positional: list[str], values: dict[str, object]) -> str | None:
    if values["file"]:
        try:
            with open(str(values["file"]), encoding="utf-8") as handle:
                return handle.read()
        except OSError as exc:
            raise UsageError(f"cannot read -file {values['file']}: {exc.strerror}") from exc
    if positional:
        return positional[0]
    return None


async def _config(action: str, positional: list[str], values: dict[str, object]) -> int:
    text = _config_text(positional, values)
    if action == "validate" and text is not None:
        return _report_validation(text)
    settings = _etcd_settings(values)
    store = await open_store(settings, for_write=action == "set")
    try:
        if action == "get":
            raw = await store.get_config()
            if raw is None:
                sys.stderr.write(
                    f"loden: no network config at {settings.prefix}/config ({store.api} API)\n"
                )
                return 1
            sys.stdout.write(raw.decode("utf-8", "replace").rstrip("\n") + "\n")
            return 0
        if action == "validate":
            raw = await store.get_config()
            if raw is None:
                sys.stderr.write(f"loden: no network config at {settings.prefix}/config\n")
                return 1
            return _report_validation(raw.decode("utf-8", "replace"))
        if text is None:
            raise UsageError("config set needs the JSON as an argument or -file F")
        status = _report_validation(text, quiet=True)
        if status:
            return status
        await store.put_config(text.encode())
        sys.stdout.write(f"wrote {settings.prefix}/config ({store.api} API)\n")
        return 0
    finally:
        await store.aclose()


def _report_validation(text: str, *, quiet: bool = False) -> int:
    try:
        config = NetworkConfig.parse(text)
    except NetworkConfigError as exc:
        sys.stderr.write(f"invalid network config: {exc}\n")
        return 1
    if not quiet:
        sys.stdout.write(
            f"valid: Network {config.network}, SubnetLen {config.subnet_len}, subnets "
            f"{config.subnet_min}..{config.subnet_max} ({config.subnet_capacity()} nodes), "
            f"backend {config.backend_type}\n"
        )
    return 0


async def _leases(values: dict[str, object]) -> int:
    if values["kube-subnet-mgr"]:
        from loden.tools import kube

        if values["delete"]:
            raise UsageError("-delete is for etcd leases; in kube mode a lease is a node")
        return await kube.leases(values, os.environ)
    settings = _etcd_settings(values)
    store = await open_store(settings)
    try:
        manager = EtcdSubnetManager(store)
        if values["delete"]:
            name = str(values["delete"])
            if not await store.delete(name):
                sys.stderr.write(f"loden: no lease {name}\n")
                return 1
            sys.stdout.write(f"deleted lease {name}\n")
            return 0
        leases = await manager.list_leases(with_ttl=True)
    finally:
        await store.aclose()
    if values["json"]:
        sys.stdout.write(json.dumps([_lease_json(lease) for lease in leases], indent=2) + "\n")
        return 0
    table = Table(title=f"leases under {settings.prefix}/subnets ({store.api} API)")
    for column in ("subnet", "public IP", "backend", "VTEP MAC / key", "expires in", "reserved"):
        table.add_column(column)
    for lease in leases:
        row = _lease_json(lease)
        table.add_row(
            str(row["subnet"]),
            str(row["public_ip"]),
            str(row["backend"]),
            str(row["detail"]),
            str(row["expires_in"]),
            "yes" if lease.reserved else "",
        )
    Console(file=sys.stdout, width=120, emoji=False, highlight=False).print(table)
    return 0


def _lease_json(lease: Lease) -> dict[str, object]:
    data = lease.attrs.data()
    detail = ""
    if isinstance(data, dict):
        detail = str(data.get("VtepMAC") or data.get("PublicKey") or "")
    ttl = lease.ttl_remaining(time.time())
    return {
        "key": lease.key,
        "subnet": str(lease.subnet),
        "ipv6_subnet": str(lease.ipv6_subnet) if lease.ipv6_subnet else None,
        "public_ip": str(lease.attrs.public_ip),
        "backend": lease.attrs.backend_type or "(none: udp/alloc)",
        "detail": detail,
        "reserved": lease.reserved,
        "expires_in": "never"
        if lease.reserved
        else ("?" if ttl is None else f"{int(ttl // 3600)}h{int(ttl % 3600 // 60):02d}m"),
    }
