"""``loden status [-json] [-v] [-status-url URL] [agent flags]``.

Takes the agent's own flags and ``FLANNELD_*`` variables (so the unit file's options
work unchanged) to find subnet.env, etcd and the health server. Exit status: 0 when the
agent is up and healthy and the kernel matches the leases, 1 otherwise, 2 bad usage.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from loden.errors import UsageError
from loden.flags import HelpRequested
from loden.settings import AgentSettings, parse_agent_args
from loden.status.collect import collect

USAGE = """usage: loden status [-json] [-v] [-status-url URL] [flanneld flags]

Shows this node's subnet, backend, lease, peers, the agent's health and last
reconcile, and whether the kernel holds what the leases need. The flanneld flags
(or FLANNELD_* variables) locate subnet.env (-subnet-file), etcd (-etcd-*) and the
agent's health server (-healthz-ip, -healthz-port), which serves /status.
Exit status: 0 all well, 1 something is wrong, 2 bad usage.
"""


def split_options(argv: Sequence[str], names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Take ``-name``/``--name``/``-name=value`` options out of ``argv`` (Go style)."""
    found: dict[str, str] = {}
    rest: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        key, sep, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and key in names:
            if key in ("json", "v", "verbose"):
                found[key] = value or "true"
            elif sep:
                found[key] = value
            elif args:
                found[key] = args.pop(0)
            else:
                raise UsageError(f"-{key} needs a value")
        else:
            rest.append(arg)
    return found, rest


def parse(argv: Sequence[str], extra: Sequence[str] = ()) -> tuple[dict[str, str], AgentSettings]:
    """Own options plus the agent's settings (raises UsageError/HelpRequested)."""
    own, rest = split_options(argv, ("json", "v", "verbose", "status-url", *extra))
    if any(a in ("-h", "-help", "--help") for a in rest):
        raise HelpRequested(USAGE)
    settings = parse_agent_args(rest, os.environ, prog="loden status")
    return own, settings


def main(argv: Sequence[str]) -> int:
    try:
        own, settings = parse(argv)
    except HelpRequested:
        sys.stdout.write(USAGE)
        return 0
    except UsageError as exc:
        sys.stderr.write(f"loden status: {exc}\n{USAGE}")
        return 2
    report = asyncio.run(collect(settings, own.get("status-url", "")))
    healthy = is_healthy(report)
    if own.get("json") == "true":
        report["healthy"] = healthy
        sys.stdout.write(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    else:
        verbose = own.get("v") == "true" or own.get("verbose") == "true"
        render(report, verbose=verbose)
    return 0 if healthy else 1


def is_healthy(report: dict[str, Any]) -> bool:
    agent = report["agent"]
    kernel = report.get("kernel") or {}
    rules_ok = all(r["ok"] for r in kernel.get("rules", []))
    problems = (agent.get("status") or {}).get("problems") or []
    return bool(
        agent["up"]
        and not problems
        and report["store"]["reachable"]
        and kernel.get("checked")
        and not kernel.get("problem")
        and not kernel.get("missing")
        and not kernel.get("extra")
        and rules_ok
    )


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def lines(report: dict[str, Any]) -> list[str]:
    """The text report, one fact per line, the agent's state first."""
    out: list[str] = []
    agent = report["agent"]
    status = agent.get("status") or {}
    if not agent["up"]:
        out.append(f"agent:     DOWN: {agent['error']}")
        out.append("           (what follows is read from subnet.env, the store and the kernel)")
    else:
        info = status.get("agent") or {}
        problems = status.get("problems") or []
        health = "healthy" if not problems else "UNHEALTHY: " + "; ".join(problems)
        ready = "ready" if status.get("ready") else "NOT READY"
        out.append(
            f"agent:     up (pid {info.get('pid')}, loden v{info.get('version')}, "
            f"{ready}, {health})"
        )
    env = report["subnet_env"]
    values = env.get("values") or {}
    if "error" in env:
        out.append(f"subnet.env {env['path']}: {env['error'].upper()}")
    else:
        out.append(
            f"subnet:    {values.get('FLANNEL_SUBNET', '?')}"
            f" of {values.get('FLANNEL_NETWORK', '?')}, MTU {values.get('FLANNEL_MTU', '?')}"
            f" ({env['path']}, written {_ago(env.get('age_seconds', 0))} ago)"
        )
        if values.get("FLANNEL_IPV6_SUBNET"):
            out.append(f"subnet v6: {values['FLANNEL_IPV6_SUBNET']}")
    lease = report.get("lease")
    kernel = report.get("kernel") or {}
    config = report.get("config") or {}
    backend = config.get("backend_type") or (lease or {}).get("backend_type") or "?"
    out.append(f"backend:   {backend}")
    if lease:
        out.append(f"public IP: {lease['public_ip']}")
        if lease.get("vtep_mac"):
            device_mac = kernel.get("device_mac")
            note = ""
            if device_mac and device_mac != lease["vtep_mac"]:
                note = f"  (MISMATCH: {kernel.get('device')} has {device_mac})"
            out.append(f"VTEP MAC:  {lease['vtep_mac']} (VNI {lease.get('vni')}){note}")
        if lease.get("wireguard_key"):
            out.append(f"WG key:    {lease['wireguard_key']}")
        if report["store"]["api"] == "kube":
            out.append(f"lease:     {lease['key']}, this node's podCIDR (Kubernetes: no expiry)")
        elif lease.get("reserved"):
            out.append("lease:     reservation (never expires)")
        elif lease.get("ttl_seconds") is not None:
            ttl = lease["ttl_seconds"]
            when = f"expires in {_ago(ttl)}" if ttl > 0 else "EXPIRED"
            out.append(f"lease:     {lease['key']}, {when}")
    else:
        out.append("lease:     NONE FOUND for this node's subnet")
    store = report["store"]
    if store["reachable"]:
        if store["api"] == "kube":
            out.append("store:     reachable (Kubernetes API, -kube-subnet-mgr)")
        else:
            endpoints = ",".join(store["endpoints"])
            out.append(f"store:     reachable (etcd {store['api']} API, {endpoints})")
    else:
        out.append(f"store:     UNREACHABLE: {store['error']}")
    out.append(f"peers:     {len(report.get('peers') or [])}")
    if not kernel.get("checked"):
        out.append(f"kernel:    not checked: {kernel.get('why')}")
    elif kernel.get("problem"):
        out.append(f"kernel:    {kernel['problem'].upper()}")
    else:
        missing, extra = kernel.get("missing") or [], kernel.get("extra") or []
        if not missing and not extra:
            out.append(
                f"kernel:    in sync ({kernel['expected']} entries on "
                f"{kernel.get('device') or 'the main table'})"
            )
        else:
            out.append(f"kernel:    {len(missing)} MISSING, {len(extra)} EXTRA")
            out += [f"  missing  {m}" for m in missing[:20]]
            out += [f"  extra    {e}" for e in extra[:20]]
        for skip in kernel.get("skipped") or []:
            out.append(f"  skipped  {skip}")
    for rule in kernel.get("rules") or []:
        state = "in sync" if rule["ok"] else rule["summary"].upper()
        out.append(f"rules:     {rule['chain']} ({rule['table']}): {state}")
        out += [f"  missing  {m}" for m in rule["missing"]]
    if agent["up"]:
        rec = status.get("reconcile") or {}
        if rec.get("last_at"):
            errors = rec.get("errors") or []
            what = "no errors" if not errors else f"{len(errors)} ERRORS: {errors[0]}"
            out.append(
                f"reconcile: {_ago(time.time() - rec['last_at'])} ago ({rec.get('why')}), {what}"
            )
        else:
            out.append("reconcile: none yet")
    return out


def render(report: dict[str, Any], *, verbose: bool) -> None:
    sys.stdout.write("\n".join(lines(report)) + "\n")
    if not verbose:
        return
    table = Table(title="peers")
    for column in ("subnet", "public IP", "backend", "VTEP MAC / key", "expires in"):
        table.add_column(column)
    for peer in report.get("peers") or []:
        ttl = peer.get("ttl_seconds")
        table.add_row(
            peer["subnet"],
            peer["public_ip"],
            peer.get("backend_type") or "",
            peer.get("vtep_mac") or peer.get("wireguard_key") or "",
            "never" if peer.get("reserved") else ("?" if ttl is None else _ago(ttl)),
        )
    Console(file=sys.stdout, width=120, emoji=False, highlight=False).print(table)
