"""The lab's emulated cloud for ``--backend aws-vpc`` and ``--backend gce``.

One process in the underlay namespace (``python -m loden.lab.cloud serve``, started by
``loden lab up``, stopped by ``loden lab down`` like etcd) plays the cloud:

* aws-vpc: moto (server mode) holding a VPC whose subnet is the lab's underlay, its route
  table, and one instance per lab node with the node's address; the front door
  (:class:`~loden.lab.cloud_emu.AwsFront`) at ``http://<gateway>:8780`` serves EC2 and
  each node's instance metadata;
* gce: the Compute Engine double (:class:`~loden.lab.cloud_emu.GceDouble`) at the same
  address, one instance ``nodeN`` per lab node;
* the "VPC router": the underlay namespace is every node's default gateway; this process
  applies the cloud's route table to its kernel routes (``<subnet> via <instance IP>``,
  protocol 99) twice a second, as the cloud's router would, so pods on different nodes
  reach each other only through routes the agents wrote into the emulated cloud.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loden.lab.plan import LabPlan
    from loden.lab.state import LabState

log = logging.getLogger(__name__)

CLOUD_BACKENDS = ("aws-vpc", "gce")
CLOUD_PORT = 8780
ROUTE_PROTO = "99"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "lab",
    "AWS_SECRET_ACCESS_KEY": "lab",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def endpoint(plan: LabPlan) -> str:
    return f"http://{plan.gateway.ip}:{CLOUD_PORT}"


def agent_env(plan: LabPlan) -> dict[str, str]:
    """What a node's flanneld needs in its environment to use the emulated cloud."""
    url = endpoint(plan)
    if plan.backend == "aws-vpc":
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": url}
    return {"CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE": f"{url}/compute/v1/"}


def dropin(plan: LabPlan) -> str:
    env = " ".join(f"{k}={v}" for k, v in agent_env(plan).items())
    return f"# loden lab: the emulated {plan.backend} cloud\n[Service]\nEnvironment={env}\n"


def ready_file(plan: LabPlan) -> Path:
    return plan.workdir / "cloud" / "ready.json"


def start(state: LabState, *, timeout: float = 90.0) -> None:
    """Start the cloud process in the underlay namespace and wait until it serves.

    :raises LodenError: it exited or did not become ready within ``timeout``.
    """
    from loden.errors import LodenError
    from loden.lab import netns, proc
    from loden.lab.plan import ENV_MARKER
    from loden.lab.state import ProcRecord

    plan = state.plan
    ready = ready_file(plan)
    ready.unlink(missing_ok=True)
    nodes = [f"{name}={plan.node_address(name).ip}" for name in plan.node_names()]
    argv = netns.in_net(
        plan.underlay_ns,
        [
            sys.executable,
            "-m",
            "loden.lab.cloud",
            "serve",
            f"--backend={plan.backend}",
            f"--underlay={plan.underlay}",
            f"--gateway={plan.gateway.ip}",
            f"--port={CLOUD_PORT}",
            f"--ready={ready}",
            *nodes,
        ],
    )
    log_path = plan.workdir / "cloud" / "cloud.log"
    env = {"PATH": proc.SERVICE_PATH, ENV_MARKER: plan.name, **CREDENTIALS}
    popen = proc.spawn(argv, env=env, log_path=log_path)
    state.record_process(
        ProcRecord(
            "cloud",
            plan.backend,
            popen.pid,
            proc.start_time(popen.pid),
            tuple(argv),
            str(log_path),
        )
    )
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if popen.poll() is not None or time.monotonic() > deadline:
            raise LodenError(
                f"the emulated {plan.backend} cloud did not start; last lines of"
                f" {log_path}:\n{proc.tail(log_path)}"
            )
        time.sleep(0.2)


def cloud_routes(plan: LabPlan) -> dict[str, str]:
    """Destination -> target (ENI or instance) as the cloud holds them now, for status."""
    try:
        doc: dict[str, Any] = json.loads((plan.workdir / "cloud" / "routes.json").read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in doc.items()}


def wait_for_routes(plan: LabPlan, subnets: Iterable[str], *, timeout: float = 60.0) -> None:
    """Block until the cloud's table, and so the lab router, routes every node subnet.

    An agent writes its cloud route in its first reconcile pass, after it said it is
    ready; a ``lab check`` in between would report a data-plane fault that is only a
    route still on its way (seen once in a loaded test run)."""
    from loden.errors import LodenError

    wanted = {ipaddress.ip_interface(s).network for s in subnets if s}
    deadline = time.monotonic() + timeout
    while True:
        have = set()
        for cidr in cloud_routes(plan):
            try:
                have.add(ipaddress.ip_network(cidr, strict=False))
            except ValueError:
                continue
        missing = sorted(str(n) for n in wanted - have)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise LodenError(
                f"the emulated {plan.backend} cloud has no route for {', '.join(missing)}"
                f" after {timeout:.0f}s; `loden lab status --name {plan.name}` shows each"
                " node's cloud route and agent health"
            )
        time.sleep(0.2)


# -- the cloud process -----------------------------------------------------------------


def _apply(routes: dict[str, str]) -> None:
    """Make this namespace's protocol-99 routes exactly ``routes`` (CIDR -> next hop)."""
    shown = subprocess.run(
        ["ip", "route", "show", "proto", ROUTE_PROTO], capture_output=True, text=True, check=False
    ).stdout
    have = {line.split()[0] for line in shown.splitlines() if line.strip()}
    for cidr, via in routes.items():
        subprocess.run(
            ["ip", "route", "replace", cidr, "via", via, "proto", ROUTE_PROTO], check=False
        )
    for cidr in have - set(routes):
        subprocess.run(["ip", "route", "del", cidr, "proto", ROUTE_PROTO], check=False)


def serve(args: argparse.Namespace) -> int:
    from loden.lab.cloud_emu import AwsFront, GceDouble, patch_moto_route_state

    nodes = dict(item.split("=", 1) for item in args.nodes)  # name -> IP
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    ready = Path(args.ready)
    ready.parent.mkdir(parents=True, exist_ok=True)
    routes_file = ready.parent / "routes.json"
    stop = False

    def on_term(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    if args.backend == "aws-vpc":
        import boto3
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer

        patch_moto_route_state()
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        host, port = moto.get_host_and_port()
        moto_url = f"http://{host}:{port}"
        ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_url)
        vpc = ec2.create_vpc(CidrBlock=args.underlay)["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=args.underlay)["Subnet"]["SubnetId"]
        table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
        ec2.associate_route_table(RouteTableId=table, SubnetId=subnet)
        front = AwsFront(moto_url)
        ip_of_eni: dict[str, str] = {}
        for ip in nodes.values():
            inst = ec2.run_instances(
                ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=subnet, PrivateIpAddress=ip
            )["Instances"][0]
            front.instances[ip] = inst["InstanceId"]
            ip_of_eni[inst["NetworkInterfaces"][0]["NetworkInterfaceId"]] = ip
        front.start(args.gateway, port=args.port)
        info = {"endpoint": front.url, "vpc": vpc, "subnet": subnet, "route_table": table}

        def table_routes() -> tuple[dict[str, str], dict[str, str]]:
            found = ec2.describe_route_tables(RouteTableIds=[table])["RouteTables"][0]
            hops: dict[str, str] = {}
            shown: dict[str, str] = {}
            for r in found["Routes"]:
                cidr, eni = r.get("DestinationCidrBlock"), r.get("NetworkInterfaceId")
                if cidr and eni:
                    shown[cidr] = f"{eni} ({r.get('State', '?')})"
                    if eni in ip_of_eni and r.get("State") == "active":
                        hops[cidr] = ip_of_eni[eni]
            return hops, shown

    else:
        double = GceDouble(instances={ip: name for name, ip in nodes.items()})
        double.start(args.gateway, port=args.port)
        info = {"endpoint": double.url, "project": double.project}
        ip_of_link = {double.instance_link(name): ip for name, ip in nodes.items()}

        def table_routes() -> tuple[dict[str, str], dict[str, str]]:
            with double.lock:
                items = list(double.routes.values())
            hops = {
                r["destRange"]: ip_of_link[r["nextHopInstance"]]
                for r in items
                if r.get("nextHopInstance") in ip_of_link
            }
            shown = {
                r["destRange"]: f"{r['name']} -> {r.get('nextHopInstance', '?')}" for r in items
            }
            return hops, shown

    ready.write_text(json.dumps(info))
    sys.stdout.write(f"emulated {args.backend} cloud ready: {json.dumps(info)}\n")
    sys.stdout.flush()
    while not stop:
        try:
            hops, shown = table_routes()
            _apply(hops)
            routes_file.write_text(json.dumps(shown))
        except Exception as exc:  # the lab's router keeps going; the log says why
            sys.stdout.write(f"route table sync failed: {exc}\n")
            sys.stdout.flush()
        time.sleep(0.5)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loden.lab.cloud")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve")
    p.add_argument("--backend", choices=CLOUD_BACKENDS, required=True)
    p.add_argument("--underlay", required=True)
    p.add_argument("--gateway", required=True)
    p.add_argument("--port", type=int, default=CLOUD_PORT)
    p.add_argument("--ready", required=True)
    p.add_argument("nodes", nargs="*", help="name=IP per lab node")
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
