"""aws-vpc backend (cloud-backends spec §2): the VPC route table carries each node's subnet.

Compatible with flannel v0.11-v0.19: the lease carries only ``PublicIP``; identity comes
from the instance metadata service; the ENI holding the ``--iface`` address is found with
``DescribeInstances`` and its source/destination check turned off; ``<own subnet> ->
<own ENI>`` is written in every configured (or auto-detected) route table; blackhole
routes inside ``Network`` are removed. Better than flannel:

* a correct route is left alone (flannel v0.11 deletes and recreates it at every start);
  a foreign route on our subnet is replaced atomically (``ReplaceRoute``) and logged;
* routes whose lease is gone are removed by any peer (see :mod:`loden.backend.cloud` for
  when), but only routes Loden can prove it made: EC2 routes carry no tags, so each
  route Loden writes is recorded as a tag on its route table, ``loden.io/route/<cidr>``
  = ``<Network>``; another cluster's routes (other tag value, or none) are never touched;
* every cloud call runs in the agent's reconcile pass (see :mod:`loden.backend.cloud`):
  failures are retried with backoff and reported by ``/healthz``, never fatal;
* IMDSv2 (token) with IMDSv1 fallback; a denied call names the IAM action and resource.

boto3 is imported only here, only when this backend is created (other backends' RSS
does not grow). Endpoints: botocore honours ``AWS_ENDPOINT_URL_EC2``/``AWS_ENDPOINT_URL``;
the metadata address is ``--cloud-metadata-endpoint``, else
``AWS_EC2_METADATA_SERVICE_ENDPOINT``, else ``http://169.254.169.254``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import httpx

from loden.backend.base import BackendContext, Network, ReconcileReport
from loden.backend.cloud import CloudRouteNetwork, Stale
from loden.errors import BackendError, CloudError, CloudPermissionError
from loden.model.backend_options import AwsVpcOptions
from loden.model.lease import Lease, LeaseAttrs

log = logging.getLogger(__name__)

DEFAULT_IMDS = "http://169.254.169.254"
#: Route-table tag recording a route Loden wrote: key prefix + CIDR, value = Network.
TAG_PREFIX = "loden.io/route/"
#: What the node's IAM role needs (ModifyNetworkInterfaceAttribute is optional).
NEEDED_ACTIONS = (
    "ec2:DescribeInstances, ec2:DescribeRouteTables, ec2:CreateRoute, ec2:ReplaceRoute,"
    " ec2:DeleteRoute, ec2:CreateTags, ec2:DeleteTags (optional:"
    " ec2:ModifyNetworkInterfaceAttribute)"
)
_DENIED = {"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "AuthFailure"}


def route_tag(cidr: IPv4Network | str) -> str:
    return f"{TAG_PREFIX}{cidr}"


def metadata_endpoint(configured: str | None) -> str:
    url = configured or os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or DEFAULT_IMDS
    return url.rstrip("/")


class Imds:
    """EC2 instance metadata: IMDSv2 (session token) first, IMDSv1 when no token is served."""

    def __init__(self, base: str, *, timeout: float = 5.0, attempts: int = 3) -> None:
        self.base = base
        self.timeout = timeout
        self.attempts = attempts
        self._token: str | None = None
        self.version = 0

    async def _fetch_token(self, client: httpx.AsyncClient) -> None:
        try:
            resp = await client.put(
                f"{self.base}/latest/api/token",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
            )
        except httpx.HTTPError:
            resp = None
        if resp is not None and resp.status_code == 200 and resp.text:
            self._token, self.version = resp.text, 2
        else:  # 403/404/405: no IMDSv2 here (or disabled): plain GETs, as flannel
            self._token, self.version = None, 1

    async def get(self, path: str) -> str:
        """``GET /latest/meta-data/<path>``.

        :raises CloudError: unreachable after retries, or a non-200 answer.
        """
        url = f"{self.base}/latest/meta-data/{path}"
        error = ""
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            for attempt in range(self.attempts):
                if self.version == 0:
                    await self._fetch_token(client)
                headers = {"X-aws-ec2-metadata-token": self._token} if self._token else {}
                try:
                    resp = await client.get(url, headers=headers)
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                else:
                    if resp.status_code == 200 and resp.text:
                        return resp.text.strip()
                    if resp.status_code == 401:  # token expired: take a new one
                        self.version = 0
                    error = f"HTTP {resp.status_code}"
                await asyncio.sleep(0.2 * 2**attempt)
        raise CloudError(
            f"EC2 instance metadata {url} failed: {error}; is this an EC2 instance with the"
            " metadata service enabled (or is --cloud-metadata-endpoint right)?"
        )


@dataclass(frozen=True, slots=True)
class Identity:
    instance_id: str
    region: str
    eni: str
    subnet_id: str
    vpc_id: str
    tables: tuple[str, ...]


class Ec2:
    """The EC2 calls the backend makes: boto3 (blocking) in a worker thread."""

    def __init__(self, region: str, metadata: str) -> None:
        try:
            import boto3
            import botocore.config
            import botocore.session
        except ImportError as exc:  # pragma: no cover - packaging
            raise BackendError(
                "the aws-vpc backend needs boto3: pip install 'loden[cloud]'"
            ) from exc
        core = botocore.session.get_session()
        # The instance role's credentials come from the same metadata service.
        core.set_config_variable("ec2_metadata_service_endpoint", metadata)
        config = botocore.config.Config(
            retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=15
        )
        self.client: Any = boto3.session.Session(botocore_session=core).client(
            "ec2", region_name=region, config=config
        )

    async def call(self, operation: str, resource: str, **params: Any) -> dict[str, Any]:
        """Call ``operation`` (boto3 snake_case method) about ``resource``.

        :raises CloudPermissionError: denied: names ``ec2:<Action>`` and the resource.
        :raises CloudError: any other failure (after botocore's own retries).
        """
        from botocore.exceptions import BotoCoreError, ClientError

        action = "".join(part.title() for part in operation.split("_"))
        try:
            result: dict[str, Any] = await asyncio.to_thread(
                getattr(self.client, operation), **params
            )
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code, message = err.get("Code", "?"), err.get("Message", "")
            if code in _DENIED:
                raise CloudPermissionError(
                    f"EC2 denied ec2:{action} on {resource} ({code}: {message}): allow"
                    f" ec2:{action} on {resource} in the node's IAM policy (the aws-vpc"
                    f" backend needs {NEEDED_ACTIONS})",
                    action=f"ec2:{action}",
                    resource=resource,
                ) from exc
            error = CloudError(f"EC2 {action} on {resource} failed: {code}: {message}")
            error.code = code  # type: ignore[attr-defined]
            raise error from exc
        except BotoCoreError as exc:
            raise CloudError(f"EC2 {action} on {resource} failed: {exc}") from exc
        return result


def _code(exc: CloudError) -> str:
    return str(getattr(exc, "code", ""))


class AwsVpcBackend:
    backend_type = "aws-vpc"

    def __init__(self, ctx: BackendContext) -> None:
        if ctx.ext.ext_addr is None or ctx.ext.iface_addr is None:
            raise BackendError("aws-vpc needs an IPv4 address on the external interface")
        options = ctx.options
        assert isinstance(options, AwsVpcOptions)
        self.ctx = ctx
        self.options = options
        self.metadata = metadata_endpoint(ctx.settings.cloud_metadata_endpoint)

    async def lease_attrs(self, others: Sequence[Lease] = ()) -> LeaseAttrs:
        assert self.ctx.ext.ext_addr is not None
        # Exactly flannel's: PublicIP only, no BackendType, no BackendData.
        return LeaseAttrs(public_ip=self.ctx.ext.ext_addr)

    async def activate(self, lease: Lease) -> Network:
        routes = AwsVpcRoutes(self, lease)
        return CloudRouteNetwork(lease, self.ctx.ext.mtu, routes.run, "aws-vpc")


class AwsVpcRoutes:
    """One pass: identity (once), source/dest check (once), then every table."""

    def __init__(self, backend: AwsVpcBackend, lease: Lease) -> None:
        self.backend = backend
        self.lease = lease
        network = backend.ctx.config.network
        assert network is not None
        self.network: IPv4Network = network
        self.iface_addr: IPv4Address = backend.ctx.ext.iface_addr  # type: ignore[assignment]
        self.imds = Imds(backend.metadata)
        self.ec2: Ec2 | None = None
        self.identity: Identity | None = None
        self.src_dst_done = False

    async def _identify(self) -> tuple[Ec2, Identity]:
        if self.ec2 is not None and self.identity is not None:
            return self.ec2, self.identity
        zone = await self.imds.get("placement/availability-zone")
        region = zone[:-1] if zone[-1:].isalpha() else zone
        instance_id = await self.imds.get("instance-id")
        # Importing boto3 and building its client takes ~1 s of CPU: not on the loop.
        ec2 = self.ec2
        if ec2 is None:
            ec2 = await asyncio.to_thread(Ec2, region, self.backend.metadata)
        self.ec2 = ec2
        found = await ec2.call(
            "describe_instances", f"instance {instance_id}", InstanceIds=[instance_id]
        )
        eni = subnet_id = vpc_id = ""
        for reservation in found.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                for iface in instance.get("NetworkInterfaces", []):
                    ips = [p.get("PrivateIpAddress") for p in iface.get("PrivateIpAddresses", [])]
                    if str(self.iface_addr) in ips and not eni:
                        eni = iface["NetworkInterfaceId"]
                        subnet_id, vpc_id = iface.get("SubnetId", ""), iface.get("VpcId", "")
        if not eni:
            raise CloudError(
                f"unable to find ENI that matches the {self.iface_addr} IP address: instance"
                f" {instance_id} has no network interface with that private IP; pick the"
                " interface with --iface"
            )
        tables = self.backend.options.route_table_ids
        if tables is None:
            tables = (await self._detect_table(ec2, subnet_id, vpc_id),)
        self.identity = Identity(instance_id, region, eni, subnet_id, vpc_id, tables)
        log.info(
            "aws-vpc: instance %s (IMDSv%d), ENI %s in %s, route tables %s",
            instance_id,
            self.imds.version,
            eni,
            vpc_id,
            ", ".join(tables) or "(none)",
        )
        return ec2, self.identity

    async def _detect_table(self, ec2: Ec2, subnet_id: str, vpc_id: str) -> str:
        found = await ec2.call(
            "describe_route_tables",
            f"subnet {subnet_id}",
            Filters=[{"Name": "association.subnet-id", "Values": [subnet_id]}],
        )
        for table in found.get("RouteTables", []):
            log.info("Found route table %s.", table["RouteTableId"])
            return str(table["RouteTableId"])
        found = await ec2.call(
            "describe_route_tables",
            f"vpc {vpc_id}",
            Filters=[
                {"Name": "association.main", "Values": ["true"]},
                {"Name": "vpc-id", "Values": [vpc_id]},
            ],
        )
        for table in found.get("RouteTables", []):
            log.info("Found route table %s.", table["RouteTableId"])
            return str(table["RouteTableId"])
        raise CloudError(
            f"main route table not found (subnet {subnet_id} has no route table and VPC"
            f" {vpc_id} no main table): set Backend.RouteTableID"
        )

    async def run(self, stale: Stale) -> ReconcileReport:
        ec2, ident = await self._identify()
        if not self.src_dst_done:
            try:
                await ec2.call(
                    "modify_network_interface_attribute",
                    f"network interface {ident.eni}",
                    NetworkInterfaceId=ident.eni,
                    SourceDestCheck={"Value": False},
                )
            except CloudError as exc:  # flannel: a warning; pods' packets may be dropped
                log.warning("failed to disable SourceDestCheck on %s: %s.", ident.eni, exc)
            self.src_dst_done = True
        report = ReconcileReport()
        for rtb in ident.tables:
            report += await self._table(ec2, ident, rtb, stale)
        return report

    async def _table(self, ec2: Ec2, ident: Identity, rtb: str, stale: Stale) -> ReconcileReport:
        what = f"route table {rtb}"
        found = await ec2.call("describe_route_tables", what, RouteTableIds=[rtb])
        tables = found.get("RouteTables", [])
        if not tables:
            raise CloudError(f"{what} does not exist: check Backend.RouteTableID")
        table = tables[0]
        tags = {t["Key"]: t["Value"] for t in table.get("Tags", [])}
        ours = str(self.network)
        own = str(self.lease.subnet)
        added = removed = 0
        route = next(
            (r for r in table.get("Routes", []) if r.get("DestinationCidrBlock") == own), None
        )
        target = {"RouteTableId": rtb, "DestinationCidrBlock": own}
        if route is None:
            await ec2.call("create_route", what, NetworkInterfaceId=ident.eni, **target)
            log.info("Route added to table %s: %s - %s.", rtb, own, ident.eni)
            added += 1
        elif route.get("NetworkInterfaceId") != ident.eni or route.get("State") != "active":
            via = (
                route.get("NetworkInterfaceId")
                or route.get("InstanceId")
                or route.get("GatewayId")
                or route.get("NatGatewayId")
                or "?"
            )
            log.warning(
                "aws-vpc: %s had a route for our subnet %s via %s (%s); replacing it with %s",
                what,
                own,
                via,
                route.get("State", "?"),
                ident.eni,
            )
            await ec2.call("replace_route", what, NetworkInterfaceId=ident.eni, **target)
            added += 1
        if tags.get(route_tag(own)) != ours:
            await ec2.call(
                "create_tags",
                what,
                Resources=[rtb],
                Tags=[{"Key": route_tag(own), "Value": ours}],
            )
        for other in table.get("Routes", []):
            cidr = other.get("DestinationCidrBlock")
            if not cidr or cidr == own:
                continue
            try:
                net = IPv4Network(cidr)
            except ValueError:
                continue
            if not net.subnet_of(self.network):
                continue
            owned = tags.get(route_tag(cidr)) == ours
            blackhole = other.get("State") == "blackhole"
            if not (blackhole or (owned and stale(net))):
                continue
            log.info(
                "aws-vpc: removing %s route %s from %s",
                "blackhole" if blackhole else "stale (its lease is gone)",
                cidr,
                rtb,
            )
            try:
                await ec2.call("delete_route", what, RouteTableId=rtb, DestinationCidrBlock=cidr)
            except CloudError as exc:
                if _code(exc) != "InvalidRoute.NotFound":
                    raise
            if owned:
                await ec2.call(
                    "delete_tags", what, Resources=[rtb], Tags=[{"Key": route_tag(cidr)}]
                )
            removed += 1
        return ReconcileReport(added=added, removed=removed)


def create(ctx: BackendContext) -> AwsVpcBackend:
    return AwsVpcBackend(ctx)
