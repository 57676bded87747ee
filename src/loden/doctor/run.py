"""Gather the :class:`~loden.doctor.base.Context` once, run every check, report.

``loden doctor [-json] [-docker-config F] [-sample-seconds N] [flanneld flags]``;
exit status 0 when nothing was found, 1 when something was, 2 on bad usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from loden.doctor import (
    agent,
    checksum,
    devices,
    docker,
    forward,
    leases,
    mtu,
    node_files,
    sysctl,
    tls,
)
from loden.doctor.base import Check, Context, Finding
from loden.errors import LodenError, UsageError
from loden.flags import HelpRequested
from loden.kernel.netlink import Netlink
from loden.settings import AgentSettings
from loden.status.cli import parse
from loden.status.collect import agent_status, read_store, read_subnet_env, status_url

log = logging.getLogger(__name__)

CHECKS: tuple[Check, ...] = (
    agent.check_agent,
    node_files.check_subnet_env,
    sysctl.check_forwarding,
    sysctl.check_br_netfilter,
    sysctl.check_rp_filter,
    forward.check_forward_policy,
    mtu.check_mtu,
    checksum.check_vxlan_checksum,
    leases.check_duplicates,
    leases.check_overlaps,
    leases.check_expiry,
    devices.check_vxlan_device,
    devices.check_hostgw_onlink,
    devices.check_kernel_entries,
    docker.check_docker_bip,
    tls.check_etcd_tls,
)

USAGE = """usage: loden doctor [-json] [-docker-config FILE] [-sample-seconds N] [flanneld flags]

Checks this node for flannel's known failure modes and prints, for each finding, what
is wrong, the evidence and the fix. Give it the agent's flags (or FLANNELD_* variables)
so it finds subnet.env, etcd and the health server. Only reads; changes nothing.
Exit status: 0 nothing found, 1 findings, 2 bad usage.
"""


async def diagnose(
    settings: AgentSettings,
    *,
    url: str = "",
    docker_config: Path = Path("/etc/docker/daemon.json"),
    sample_seconds: float = 2.0,
) -> list[Finding]:
    (doc, agent_error), store, env = await asyncio.gather(
        agent_status(status_url(settings, url)),
        read_store(settings),
        asyncio.to_thread(read_subnet_env, settings),
    )
    async with await Netlink.open() as nl:
        ctx = Context(
            settings=settings,
            nl=nl,
            store=store,
            env=env,
            agent=doc,
            agent_error=agent_error,
            docker_config=docker_config,
            sample_seconds=sample_seconds,
            links=await nl.links(),
        )
        results = await asyncio.gather(*(check(ctx) for check in CHECKS), return_exceptions=True)
    findings: list[Finding] = []
    for check, result in zip(CHECKS, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, LodenError | OSError):
                raise result
            findings.append(
                Finding(
                    f"doctor/{check.__name__}",
                    "a check could not run",
                    f"{type(result).__name__}: {result}",
                    "run doctor as root; report it if it persists",
                )
            )
        else:
            findings += result
    return findings


def render(findings: Sequence[Finding]) -> str:
    if not findings:
        return "no problems found\n"
    out: list[str] = []
    for finding in findings:
        out.append(f"[{finding.check}] {finding.what}")
        out.append(f"    evidence: {finding.evidence}")
        out.append(f"    fix:      {finding.fix}")
    out.append(f"{len(findings)} problem(s) found")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str]) -> int:
    try:
        own, settings = parse(argv, extra=("docker-config", "sample-seconds"))
        sample = float(own.get("sample-seconds", "2"))
    except HelpRequested:
        sys.stdout.write(USAGE)
        return 0
    except (UsageError, ValueError) as exc:
        sys.stderr.write(f"loden doctor: {exc}\n{USAGE}")
        return 2
    findings = asyncio.run(
        diagnose(
            settings,
            url=own.get("status-url", ""),
            docker_config=Path(own.get("docker-config", "/etc/docker/daemon.json")),
            sample_seconds=sample,
        )
    )
    if own.get("json") == "true":
        sys.stdout.write(json.dumps([f.as_dict() for f in findings], indent=2) + "\n")
    else:
        sys.stdout.write(render(findings))
    return 1 if findings else 0
