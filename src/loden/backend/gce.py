"""gce backend (cloud-backends spec §3): a Compute Engine route per node subnet.

Compatible with flannel v0.11-v0.19: identity from the metadata server (``Metadata-Flavor:
Google``), the network and instance self-links from ``networks.get``/``instances.get``,
the route ``flannel-<a-b-c-d-len>`` with ``nextHopInstance`` and priority 1000, every
operation polled to completion; the lease carries only ``PublicIP``. Better than flannel:

* every call runs in the agent's reconcile pass (:mod:`loden.backend.cloud`): failures,
  including an operation that never finishes, are retried with backoff and reported by
  ``/healthz`` instead of exiting with the lease left behind;
* routes of subnets whose lease is gone are removed (see :mod:`loden.backend.cloud` for
  when), but only routes Loden can prove are this cluster's: a ``flannel-`` name, this
  node's network, and a destination inside ``Network`` (so two clusters in one project
  never delete each other's routes);
* a 403 names the IAM permission and the resource.

Compute API calls go through google-api-python-client with the discovery document it
ships (no network), synchronous and so run in a thread, imported only when this backend
first calls Compute; the metadata server is read with httpx. Endpoints: the metadata
server is ``--cloud-metadata-endpoint``, else ``http://$GCE_METADATA_HOST``, else
``http://169.254.169.254``; the Compute API base is ``CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE``
(gcloud's variable), else ``https://www.googleapis.com/compute/v1/``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

import httpx

from loden.backend.base import BackendContext, Network, ReconcileReport
from loden.backend.cloud import CloudRouteNetwork, Stale
from loden.errors import BackendError, CloudError, CloudPermissionError
from loden.model.lease import Lease, LeaseAttrs

log = logging.getLogger(__name__)

DEFAULT_COMPUTE = "https://www.googleapis.com/compute/v1/"
PRIORITY = 1000
#: Operation polling: at most this many polls, ``POLL_INTERVAL`` apart (flannel: 100 x 1 s).
POLL_LIMIT = 100
POLL_INTERVAL = 1.0


def route_name(subnet: IPv4Network) -> str:
    """flannel's name: ``10.40.5.0/24`` -> ``flannel-10-40-5-0-24``."""
    return "flannel-" + str(subnet).replace(".", "-").replace("/", "-")


def metadata_base(configured: str | None) -> str:
    if configured:
        return configured.rstrip("/")
    host = os.environ.get("GCE_METADATA_HOST")
    return f"http://{host}" if host else "http://169.254.169.254"


def compute_base() -> str:
    base = os.environ.get("CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE") or DEFAULT_COMPUTE
    return base if base.endswith("/") else base + "/"


@dataclass(frozen=True, slots=True)
class Identity:
    project: str
    zone: str
    instance: str
    network_link: str
    instance_link: str


def _build_service(compute: str, token: str) -> tuple[Any, Any]:
    """The Compute v1 client from the discovery document google-api-python-client ships
    (no network), against ``compute``; imported here so no other agent loads it."""
    try:
        import google.oauth2.credentials
        import google_auth_httplib2
        import httplib2
        from googleapiclient import discovery
    except ImportError as exc:  # pragma: no cover - packaging
        raise BackendError(
            "the gce backend needs google-api-python-client: pip install 'loden[cloud]'"
        ) from exc

    from googleapiclient.discovery_cache import get_static_doc

    credentials = google.oauth2.credentials.Credentials(token=token)  # type: ignore[no-untyped-call]
    http = google_auth_httplib2.AuthorizedHttp(credentials, http=httplib2.Http(timeout=15))
    shipped = get_static_doc("compute", "v1")
    if shipped is None:  # pragma: no cover - packaging
        raise BackendError("google-api-python-client ships no compute v1 discovery document")
    service = discovery.build_from_document(
        _only_used(json.loads(shipped)),
        http=http,
        client_options={"api_endpoint": compute},
    )
    return credentials, service


#: The Compute resources the backend calls; the client keeps its discovery document
#: resident, and trimmed to these it costs ~1 MB instead of ~12 MB per agent.
_RESOURCES = ("networks", "instances", "routes", "globalOperations")


def _only_used(doc: dict[str, Any]) -> dict[str, Any]:
    """The shipped discovery document with only ``_RESOURCES`` and the schemas they
    reference (the client renders every method's request/response schema)."""
    resources = {name: doc["resources"][name] for name in _RESOURCES}
    schemas: dict[str, Any] = doc["schemas"]
    keep: set[str] = set()
    todo = [resources]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref not in keep and ref in schemas:
                keep.add(ref)
                todo.append(schemas[ref])
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    return {**doc, "resources": resources, "schemas": {k: schemas[k] for k in keep}}


def _list_routes(project: str, page_token: str | None, service: Any) -> Any:
    return service.routes().list(project=project, pageToken=page_token)


class GceApi:
    """Metadata server (httpx) + Compute v1 (google-api-python-client, in a thread, since
    it is synchronous), authorised by the metadata server's token."""

    def __init__(self, metadata: str, compute: str) -> None:
        self.metadata = metadata
        self.compute = compute
        self._token = ""
        self._token_until = 0.0
        self._credentials: Any = None
        self._service: Any = None
        self.client = httpx.AsyncClient(timeout=15.0)

    async def meta(self, path: str) -> str:
        url = f"{self.metadata}/computeMetadata/v1/{path}"
        try:
            resp = await self.client.get(url, headers={"Metadata-Flavor": "Google"})
        except httpx.HTTPError as exc:
            raise CloudError(
                f"GCE metadata {url} failed: {exc}; is this a Compute Engine instance"
                " (or is --cloud-metadata-endpoint right)?"
            ) from exc
        if resp.status_code != 200:  # flannel took any body as the value
            raise CloudError(f"GCE metadata {url} answered HTTP {resp.status_code}")
        return resp.text.strip()

    async def _service_with_token(self) -> Any:
        if time.monotonic() >= self._token_until:
            doc = await self.meta("instance/service-accounts/default/token")
            try:
                token = json.loads(doc)
                self._token = str(token["access_token"])
                ttl = float(token.get("expires_in", 300))
            except (ValueError, KeyError, TypeError) as exc:
                raise CloudError(f"GCE metadata token is not a token document: {exc}") from exc
            self._token_until = time.monotonic() + max(ttl - 60, 10)
        if self._service is None:
            self._credentials, self._service = await asyncio.to_thread(
                _build_service, self.compute, self._token
            )
        # Passes run one at a time (CloudRouteNetwork's lock): no request is in flight.
        self._credentials.token = self._token
        return self._service

    async def call(
        self,
        permission: str,
        resource: str,
        request: Callable[[Any], Any],
        allow: tuple[int, ...] = (),
    ) -> tuple[int, dict[str, Any]]:
        """Execute ``request(service)`` on ``resource`` (``projects/...``); returns
        (200, JSON), or (status, {}) for a status in ``allow`` (404, 409).

        :raises CloudPermissionError: 403, naming the IAM permission.
        :raises CloudError: transport error or any other HTTP error.
        """
        service = await self._service_with_token()
        import httplib2  # loaded with the service
        from googleapiclient.errors import HttpError

        try:
            doc: dict[str, Any] = await asyncio.to_thread(request(service).execute) or {}
        except HttpError as exc:
            status = int(exc.resp.status)
            if status in allow:
                return status, {}
            message = str(exc.reason)
            if status == 403:
                raise CloudPermissionError(
                    f"Compute Engine denied {permission} on {resource} ({message}): grant the"
                    f" node's service account {permission} (roles/compute.networkAdmin has it)"
                    " and the compute-rw scope",
                    action=permission,
                    resource=resource,
                ) from exc
            raise CloudError(f"Compute {permission} {resource}: HTTP {status}: {message}") from exc
        except (httplib2.HttpLib2Error, OSError) as exc:  # the transport failed
            raise CloudError(f"Compute {permission} {resource} failed: {exc!r}") from exc
        return 200, doc

    async def list_routes(self, project: str) -> list[dict[str, Any]]:
        """Every route of the project, following ``nextPageToken`` (pages of 500)."""
        items: list[dict[str, Any]] = []
        page: dict[str, Any] = {}
        while True:
            request = functools.partial(_list_routes, project, page.get("nextPageToken"))
            _, page = await self.call(
                "compute.routes.list", f"projects/{project}/global/routes", request
            )
            items.extend(page.get("items", []))
            if not page.get("nextPageToken"):
                return items

    async def wait(self, project: str, op: dict[str, Any], what: str) -> None:
        """Poll a global operation until DONE.

        :raises CloudError: the operation failed, or did not finish in time.
        """
        name = str(op.get("name", ""))
        status = op.get("status", "")
        for polls in range(POLL_LIMIT):
            if polls:
                await asyncio.sleep(POLL_INTERVAL)
            _, op = await self.call(
                "compute.globalOperations.get",
                f"projects/{project}/global/operations/{name}",
                lambda s: s.globalOperations().get(project=project, operation=name),
            )
            if op.get("error"):
                raise CloudError(f"{what}: operation {name} failed: {op['error']}")
            status = op.get("status", "")
            if status == "DONE":
                return
            if polls and polls % 5 == 0:
                log.info("%s operation status: %s waiting for completion...", what, status)
        raise CloudError(
            f"{what}: operation {name} still {status or 'unknown'} after {POLL_LIMIT} polls"
            f" ({POLL_LIMIT * POLL_INTERVAL:.0f}s); the next pass checks the route again"
        )


class GceBackend:
    backend_type = "gce"

    def __init__(self, ctx: BackendContext) -> None:
        if ctx.ext.ext_addr is None:
            raise BackendError("gce needs an IPv4 address on the external interface")
        self.ctx = ctx
        self.metadata = metadata_base(ctx.settings.cloud_metadata_endpoint)

    async def lease_attrs(self, others: Sequence[Lease] = ()) -> LeaseAttrs:
        assert self.ctx.ext.ext_addr is not None
        return LeaseAttrs(public_ip=self.ctx.ext.ext_addr)

    async def activate(self, lease: Lease) -> Network:
        routes = GceRoutes(self, lease)
        return CloudRouteNetwork(lease, self.ctx.ext.mtu, routes.run, "gce")


class GceRoutes:
    def __init__(self, backend: GceBackend, lease: Lease) -> None:
        self.lease = lease
        network = backend.ctx.config.network
        assert network is not None
        self.network: IPv4Network = network
        self.api = GceApi(backend.metadata, compute_base())
        self.identity: Identity | None = None

    async def _identify(self) -> Identity:
        if self.identity is not None:
            return self.identity
        api = self.api
        net = (await api.meta("instance/network-interfaces/0/network")).rsplit("/", 1)[-1]
        project = (await api.meta("project/project-id")).rsplit("/", 1)[-1]
        instance = (await api.meta("instance/hostname")).split(".", 1)[0]
        zone = (await api.meta("instance/zone")).rsplit("/", 1)[-1]
        status, found = await api.call(
            "compute.networks.get",
            f"projects/{project}/global/networks/{net}",
            lambda s: s.networks().get(project=project, network=net),
            allow=(404,),
        )
        if status == 404:
            raise CloudError(f"network {net} not found in project {project}")
        network_link = str(found["selfLink"])
        status, found = await api.call(
            "compute.instances.get",
            f"projects/{project}/zones/{zone}/instances/{instance}",
            lambda s: s.instances().get(project=project, zone=zone, instance=instance),
            allow=(404,),
        )
        if status == 404:
            raise CloudError(f"instance {instance} not found in {project}/{zone}")
        self.identity = Identity(project, zone, instance, network_link, str(found["selfLink"]))
        log.info("gce: instance %s in %s, network %s", instance, zone, network_link)
        return self.identity

    async def run(self, stale: Stale) -> ReconcileReport:
        ident = await self._identify()
        api, project = self.api, ident.project
        own = self.lease.subnet
        name = route_name(own)
        added = removed = 0
        status, route = await api.call(
            "compute.routes.get",
            f"projects/{project}/global/routes/{name}",
            lambda s: s.routes().get(project=project, route=name),
            allow=(404,),
        )
        if status == 200 and route.get("nextHopInstance") == ident.instance_link:
            pass  # flannel: "Exact pre-existing route found"; left alone
        else:
            if status == 200:
                log.warning(
                    "gce: route %s pointed at %s, not this instance; replacing it",
                    name,
                    route.get("nextHopInstance") or route.get("nextHopIp") or "?",
                )
                status, op = await self._delete(project, name)
                if status != 404:  # gone meanwhile: nothing to wait for
                    await api.wait(project, op, "delete")
            body = {
                "destRange": str(own),
                "name": name,
                "network": ident.network_link,
                "nextHopInstance": ident.instance_link,
                "priority": PRIORITY,
            }
            log.info("Inserting route for subnet: %s", own)
            status, op = await api.call(
                "compute.routes.create",
                f"projects/{project}/global/routes",
                lambda s: s.routes().insert(project=project, body=body),
                allow=(409,),
            )
            if status == 409:  # an earlier pass's insert finished after all: check next pass
                raise CloudError(f"route {name} appeared while inserting it; checking again")
            await api.wait(project, op, "insert")
            added += 1
        for item in await api.list_routes(project):
            if not self._ours(item, ident) or item.get("name") == name:
                continue
            dest = IPv4Network(item["destRange"])
            if not stale(dest):
                continue
            log.info("gce: removing route %s (%s): its lease is gone", item["name"], dest)
            status, op = await self._delete(project, str(item["name"]))
            if status != 404:
                await api.wait(project, op, "delete")
            removed += 1
        return ReconcileReport(added=added, removed=removed)

    async def _delete(self, project: str, name: str) -> tuple[int, dict[str, Any]]:
        return await self.api.call(
            "compute.routes.delete",
            f"projects/{project}/global/routes/{name}",
            lambda s: s.routes().delete(project=project, route=name),
            allow=(404,),
        )

    def _ours(self, item: dict[str, Any], ident: Identity) -> bool:
        """A route this cluster made: flannel's name for its destination, our network,
        a destination inside Network."""
        try:
            dest = IPv4Network(item.get("destRange", ""))
        except ValueError:
            return False
        return (
            item.get("name") == route_name(dest)
            and item.get("network") == ident.network_link
            and dest.subnet_of(self.network)
        )


def create(ctx: BackendContext) -> GceBackend:
    return GceBackend(ctx)
