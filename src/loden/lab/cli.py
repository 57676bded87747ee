"""``loden lab up|check|status|exec|down`` and ``loden demo`` (output module: writes stdout).

``args[0]`` is ``"lab"`` or ``"demo"`` (see :func:`loden.cli.main`). Exit status: 0 on
success, 1 when a step failed or ``check`` found a broken rule, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loden.errors import ConfigError, LodenError, UsageError
from loden.lab import check as checks
from loden.lab import picture, teardown
from loden.lab import status as statuses
from loden.lab.node import etcd_flags, loden_executable
from loden.lab.plan import BACKENDS, ETCD_APIS, ETCD_MODES, RUNTIMES, STORES, check_name
from loden.lab.report import Reporter
from loden.lab.state import LabState, lab_names
from loden.lab.up import create_state, up

DEFAULT_NAME = "lab"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loden lab",
        description="A flannel lab cluster made "
        "of network namespaces on this machine (needs root).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="build a lab: underlay, etcd, nodes, agents, pods")
    p_up.add_argument("--nodes", type=int, default=2)
    p_up.add_argument("--backend", choices=BACKENDS, default="vxlan")
    p_up.add_argument("--runtime", choices=RUNTIMES, default="cni")
    p_up.add_argument("--etcd", choices=ETCD_MODES, default="single")
    p_up.add_argument("--tls", action="store_true", help="etcd with TLS and client certs")
    p_up.add_argument("--etcd-api", choices=ETCD_APIS, default="v3")
    p_up.add_argument(
        "--store",
        choices=STORES,
        default="etcd",
        help="where leases live: etcd, or kube (an API server, agents in --kube-subnet-mgr)",
    )
    p_up.add_argument("--pods", type=int, default=2, help="pods per node (default 2)")
    p_up.add_argument("--name", default=DEFAULT_NAME)
    p_up.add_argument(
        "--ipv6",
        choices=("dual", "only"),
        default=None,
        help="dual-stack overlay (dual) or IPv6 alone (only), on a dual-stack underlay",
    )
    p_up.add_argument("--agent-timeout", type=float, default=40.0, help=argparse.SUPPRESS)
    p_up.add_argument("--no-agent", action="store_true", help=argparse.SUPPRESS)
    p_check = sub.add_parser("check", help="verify the Kubernetes network model's four rules")
    p_check.add_argument("--name")
    p_check.add_argument(
        "--wait",
        type=float,
        default=5.0,
        help="retry failing pairs for this many seconds (default 5)",
    )
    p_status = sub.add_parser("status", help="one row per node")
    p_status.add_argument("--name")
    p_status.add_argument("--all", action="store_true", help="list every lab")
    p_status.add_argument(
        "--svg", metavar="FILE", help="also draw the lab (nodes, pods, tunnels) into FILE"
    )
    p_exec = sub.add_parser("exec", help="run a command in a node (or pod, or 'underlay')")
    p_exec.add_argument("--name")
    p_exec.add_argument("target")
    p_exec.add_argument("cmd", nargs=argparse.REMAINDER)
    p_down = sub.add_parser("down", help="remove everything the lab made (safe to repeat)")
    p_down.add_argument("--name")
    p_down.add_argument("--all", action="store_true", help="remove every lab")
    return parser


def resolve_name(name: str | None) -> str:
    """The lab to act on: ``--name``, else the only lab there is.

    :raises UsageError: no ``--name`` and zero or several labs exist.
    """
    if name:
        return check_name(name)
    names = lab_names()
    if len(names) == 1:
        return names[0]
    if not names:
        raise ConfigError("no lab exists: start one with `loden lab up`")
    raise UsageError(f"several labs exist ({', '.join(names)}): pick one with --name")


def main(args: Sequence[str]) -> int:
    console = Console(file=sys.stdout, highlight=False, emoji=False)
    if not console.is_terminal:
        console = Console(file=sys.stdout, highlight=False, emoji=False, width=160)
    if os.geteuid() != 0:
        sys.stderr.write("loden lab: needs root (network and mount namespaces)\n")
        return 1
    try:
        if args[0] == "demo":
            demo_parser = argparse.ArgumentParser(prog="loden demo")
            demo_parser.add_argument("--name", default="demo", help=argparse.SUPPRESS)
            try:
                demo_ns = demo_parser.parse_args(list(args[1:]))
            except SystemExit as exc:
                return exc.code if isinstance(exc.code, int) else 2
            return demo(console, check_name(demo_ns.name))
        try:
            ns = _parser().parse_args(list(args[1:]))
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 2
        if ns.command == "up":
            return cmd_up(console, ns)
        if ns.command == "down":
            names = lab_names() if ns.all else [resolve_name(ns.name)]
            return max([cmd_down(console, name) for name in names], default=0)
        name = resolve_name(ns.name)
        if ns.command == "check":
            return cmd_check(console, LabState.load(name), wait=ns.wait)
        if ns.command == "status":
            if ns.all:
                for each in lab_names():
                    cmd_status(console, LabState.load(each))
                return 0
            return cmd_status(console, LabState.load(name), svg=ns.svg)
        return cmd_exec(LabState.load(name), ns.target, ns.cmd)
    except UsageError as exc:
        sys.stderr.write(f"loden lab: {exc}\n")
        return 2
    except LodenError as exc:
        sys.stderr.write(f"loden lab: {exc}\n")
        return 1


def cmd_up(console: Console, ns: argparse.Namespace) -> int:
    began = time.monotonic()
    state = create_state(
        ns.name,
        nodes=ns.nodes,
        backend=ns.backend,
        runtime=ns.runtime,
        etcd_mode=ns.etcd,
        tls=ns.tls,
        etcd_api=ns.etcd_api,
        pods=ns.pods,
        with_agent=not ns.no_agent,
        ipv6=getattr(ns, "ipv6", None) or "off",
        store=getattr(ns, "store", "etcd"),
    )
    plan = state.plan
    networks = {
        "off": f"Network {plan.network}, underlay {plan.underlay}",
        "dual": f"Network {plan.network} + IPv6Network {plan.network6}, "
        f"underlay {plan.underlay} + {plan.underlay6}",
        "only": f"IPv6Network {plan.network6}, underlay {plan.underlay} + {plan.underlay6}",
    }[plan.ipv6]
    console.print(f"[bold]loden lab up[/] {plan.name}: {networks}")
    name = state.plan.name
    hint = (
        f"inspect with `loden lab status --name {name}`, remove with `loden lab down --name {name}`"
    )
    try:
        with Reporter(console) as reporter:
            up(state, reporter, agent_timeout=ns.agent_timeout)
    except LodenError as exc:
        state.set_phase("failed")
        sys.stderr.write(f"loden lab: {exc}\nloden lab: `up` stopped; {hint}\n")
        return 1
    except KeyboardInterrupt:
        state.set_phase("failed")
        sys.stderr.write(f"loden lab: interrupted; {hint}\n")
        return 130
    console.print(f"lab {state.plan.name} is up in {time.monotonic() - began:.1f}s")
    for note in state.notes:
        console.print(f"[dim]note: {note}[/]")
    return 0


def cmd_down(console: Console, name: str) -> int:
    began = time.monotonic()
    report = teardown.down(name)
    console.print(
        f"lab {name} removed in {time.monotonic() - began:.1f}s: "
        f"{report.processes} processes, {report.mounts} mounts, "
        f"{report.namespaces} namespaces"
    )
    for item in report.leftovers:
        console.print(f"[red]left behind: {item}[/]")
    return 1 if report.leftovers else 0


def matrix(state: LabState, result: checks.CheckResult, version: int = 4) -> Table:
    """Rows: sources (pods, then nodes); columns: destination pods; cells: RTT in ms."""
    family = "" if state.plan.families == (4,) else f" IPv{version}"
    table = Table(title=f"reachability{family} (ping -c1 -W1, ms)", title_justify="left")
    table.add_column("from \\ to")
    for pod in state.pods:
        table.add_column(f"{pod.name}\n{pod.address(version)}", justify="right")
    cells = {(p.source.name, p.target.name): p for p in result.probes if p.version == version}
    sources = [p.name for p in state.pods] + list(state.nodes)
    for source in sources:
        row: list[str] = []
        for pod in state.pods:
            probe = cells.get((source, pod.name))
            if probe is None:
                row.append("[dim]-[/]")
            elif probe.ok:
                row.append(f"[green]{probe.ms:.2f}[/]" if probe.ms is not None else "[green]ok[/]")
            else:
                row.append("[red]✗[/]")
        table.add_row(source, *row)
    return table


def cmd_check(console: Console, state: LabState, *, wait: float) -> int:
    began = time.monotonic()
    result = checks.run_check(state, wait=wait)
    picture.save_check(
        state.plan.workdir,
        picture.summarise((p.source.node, p.target.node, p.ok, p.ms) for p in result.probes),
    )
    console.print(
        f"[bold]lab {state.plan.name}[/]: the Kubernetes network model "
        f"({time.monotonic() - began:.1f}s)"
    )
    for number, rule in enumerate(result.rules, start=1):
        mark = "[green]✓[/]" if rule.ok else "[red]✗[/]"
        console.print(f"{mark} {number}. {rule.rule}: {rule.details[0]}")
        for detail in rule.details[1:]:
            console.print(f"     [red]{detail}[/]")
    for version in state.plan.families:
        console.print(matrix(state, result, version))
    if not result.ok:
        console.print("[red]check failed[/]")
        return 1
    return 0


def cmd_status(console: Console, state: LabState, svg: str | None = None) -> int:
    rows = statuses.collect(state)
    console.print(statuses.table(state, rows))
    if svg:
        plan = state.plan
        data = picture.render_svg(
            f"lab {plan.name}: {plan.nodes} nodes, {plan.backend}, Network {plan.network}",
            [
                picture.NodeBox(
                    r.node, r.public_ip, r.subnet, r.backend, r.detail, r.healthy, r.health
                )
                for r in rows
            ],  # fmt: skip
            [picture.PodDot(p.name, p.node, p.ip or p.ip6) for p in state.pods],
            picture.load_check(plan.workdir),
            backend=plan.backend,
            underlay=str(plan.underlay),
            store=plan.store,
        )
        Path(svg).write_bytes(data)
        console.print(f"drew the lab into {svg}")
    return 0


def exec_argv(state: LabState, target: str, cmd: Sequence[str]) -> list[str]:
    """The nsenter argv for ``loden lab exec``.

    :raises UsageError: unknown target.
    """
    from loden.lab import netns

    command = list(cmd[1:] if cmd and cmd[0] == "--" else cmd) or [
        os.environ.get("SHELL", "/bin/sh")
    ]
    if target in state.nodes:
        record = state.nodes[target]
        return netns.in_node(record.mntns, record.netns, command)
    for pod in state.pods:
        if pod.name == target:
            return netns.in_net(pod.netns, command)
    if target in ("underlay", "etcd"):
        return netns.in_net(state.plan.underlay_ns, command)
    known = list(state.nodes) + [p.name for p in state.pods] + ["underlay"]
    raise UsageError(
        f"unknown target {target!r} in lab {state.plan.name}: use one of {', '.join(known)}"
    )


def cmd_exec(state: LabState, target: str, cmd: Sequence[str]) -> int:
    argv = exec_argv(state, target, cmd)
    sys.stdout.flush()
    os.execvp(argv[0], argv)


def _loden() -> str:
    found = shutil.which("loden")
    return (
        "loden"
        if found and os.path.realpath(found) == os.path.realpath(loden_executable())
        else loden_executable()
    )


def demo(console: Console, name: str = "demo") -> int:
    """`loden lab up --nodes 3 --backend vxlan --name demo`, check, status, how to explore."""
    if name in lab_names():
        console.print(f"a lab named {name} exists: removing it first")
        cmd_down(console, name)
    ns = argparse.Namespace(
        name=name,
        nodes=3,
        backend="vxlan",
        runtime="cni",
        etcd="single",
        tls=False,
        etcd_api="v3",
        pods=2,
        no_agent=False,
        agent_timeout=40.0,
    )
    cmd_up(console, ns)
    state = LabState.load(name)
    status = cmd_check(console, state, wait=5.0)
    cmd_status(console, state)
    loden = _loden()
    pods = state.pods
    peer = pods[-1].ip if pods else "<pod IP>"
    flags = " ".join(etcd_flags(state.plan))
    console.print(
        "\n[bold]Explore[/] (the lab stays up):\n"
        f"  {loden} lab exec node1 -- ip route\n"
        f"  {loden} lab exec node1 -- cat /run/flannel/subnet.env /opt/kubernetes/cfg/flanneld\n"
        f"  {loden} lab exec node1 -- ip -d link show flannel.1\n"
        f"  {loden} lab exec node1-pod0 -- ping -c3 {peer}\n"
        f"  {loden} lab exec node1 -- {loden_executable()} leases {flags}\n"
        f"  {loden} lab check --name {name}\n"
        f"  {loden} lab status --name {name}\n"
        "[bold]Tear down[/]:\n"
        f"  {loden} lab down --name {name}"
    )
    return status
