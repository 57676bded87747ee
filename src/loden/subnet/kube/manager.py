"""The Kubernetes subnet manager (``--kube-subnet-mgr``, spec §4).

The node's podCIDR *is* the lease; this node's backend data goes into its annotations
(a strategic-merge patch of ``nodes/<name>/status``, as Go flanneld does); peers come
from a list+watch of all nodes. Differences from flanneld, all on the safe side:

* a node that cannot become a lease is skipped with one warning, the others stay;
* a node whose podCIDR or annotations change is re-announced (flanneld ignored podCIDR
  changes and, dual-stack, changes of one family only);
* every 5 minutes the peer set is handed to the agent again as a snapshot from the
  local cache (no API traffic), so the reconciler sees it level-triggered;
* ``renew_lease`` re-checks our own annotations and repairs them if someone removed them
  (flanneld wrote them once at startup: a node re-created without them stayed invisible).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

from loden.errors import (
    ConfigError,
    LeaseRevoked,
    NetworkConfigError,
    StoreAuthError,
    StoreError,
    StoreNotFound,
    StoreUnavailable,
    WatchCompacted,
)
from loden.model.config import NetworkConfig
from loden.model.lease import EventKind, Lease, LeaseAttrs, LeaseEvent
from loden.model.net import NO_IPV4
from loden.model.subnet_env import PreviousSubnets
from loden.settings import KubeSettings
from loden.subnet.base import PublicIPOverride, WatchResult
from loden.subnet.kube import config as kubeconfig
from loden.subnet.kube.annotations import (
    AnnotationKeys,
    annotations_patch,
    desired_annotations,
    network_unavailable_patch,
)
from loden.subnet.kube.client import KubeClient, WatchEvent
from loden.subnet.kube.nodes import NodeInfo, NodeSkipped, node_to_lease, pod_cidrs

log = logging.getLogger(__name__)

DEFAULT_EVENT_QUEUE_DEPTH = 5000
CACHE_SYNC_TIMEOUT = 600.0
#: Backends whose lease may carry an IPv6 subnet (flanneld forces the others to IPv4).
DUAL_STACK_BACKENDS = frozenset({"vxlan", "host-gw", "wireguard"})


@dataclass(frozen=True, slots=True)
class KubeEnv:
    """The environment variables of kube mode (spec §1.3)."""

    node_name: str = ""
    pod_name: str = ""
    pod_namespace: str = ""
    event_queue_depth: int = DEFAULT_EVENT_QUEUE_DEPTH
    cont_when_cache_not_ready: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> KubeEnv:
        """:raises ConfigError: ``EVENT_QUEUE_DEPTH`` is not an integer."""
        depth_text = env.get("EVENT_QUEUE_DEPTH", "")
        depth = DEFAULT_EVENT_QUEUE_DEPTH
        if depth_text:
            try:
                depth = int(depth_text)
            except ValueError:
                raise ConfigError(
                    f"EVENT_QUEUE_DEPTH={depth_text!r} is not an integer; unset it or give "
                    f"the node-event queue size (default {DEFAULT_EVENT_QUEUE_DEPTH})"
                ) from None
            if depth <= 0:
                depth = DEFAULT_EVENT_QUEUE_DEPTH
        return cls(
            node_name=env.get("NODE_NAME", ""),
            pod_name=env.get("POD_NAME", ""),
            pod_namespace=env.get("POD_NAMESPACE", ""),
            event_queue_depth=depth,
            cont_when_cache_not_ready=env.get("CONT_WHEN_CACHE_NOT_READY", "") == "true",
        )


def read_net_conf(path: str) -> NetworkConfig:
    """``--net-config-path``, read once and parsed like flanneld (no validation).

    :raises ConfigError: unreadable or not a network config.
    """
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"failed to read net conf: {path}: {exc.strerror or exc}; mount the ConfigMap "
            "(kube-flannel-cfg) there or pass --net-config-path"
        ) from exc
    try:
        return NetworkConfig.parse(text, validate=False)
    except NetworkConfigError as exc:
        raise ConfigError(f"error parsing subnet config: {path}: {exc}") from exc


class KubeSubnetManager:
    """:class:`loden.subnet.base.SubnetManager` over the Kubernetes API."""

    def __init__(
        self,
        client: KubeClient,
        keys: AnnotationKeys,
        node_name: str,
        config: NetworkConfig,
        *,
        set_network_unavailable: bool = True,
        queue_depth: int = DEFAULT_EVENT_QUEUE_DEPTH,
        resync_seconds: float = 300.0,
        retry_seconds: float = 3.0,
        acquire_timeout: float = 30.0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.node_name = node_name
        self.config = config
        self.set_network_unavailable = set_network_unavailable
        self.queue_depth = queue_depth
        self.resync_seconds = resync_seconds
        self.retry_seconds = retry_seconds
        self.acquire_timeout = acquire_timeout
        self.ipv4 = config.enable_ipv4
        self.ipv6 = config.enable_ipv6 and config.backend_type in DUAL_STACK_BACKENDS
        #: name -> the node's lease (None: the node is not a usable peer).
        self._cache: dict[str, Lease | None] = {}
        self._rv = ""
        self._synced = False
        self._watch_ok: bool | None = None
        self._restarts = 0
        self._warned: set[str] = set()

    # -- protocol basics ---------------------------------------------------------------

    @property
    def name(self) -> str:
        return "kube"

    @property
    def watch_restarts(self) -> int:
        return self._restarts

    async def aclose(self) -> None:
        await self.client.aclose()

    async def get_network_config(self, *, max_age: float = 0.0) -> NetworkConfig:
        return self.config

    async def probe(self) -> None:
        """Cheap: while the node watch is connected it is the proof; otherwise one
        ``GET /version`` (5,000 agents probing every 2 s must not load the API)."""
        if self._watch_ok:
            return
        try:
            await self.client.version()
        except StoreUnavailable:
            raise
        except StoreError:
            pass  # it answered (e.g. 403 on /version): it is up

    # -- startup -----------------------------------------------------------------------

    async def initial_sync(self, timeout: float, *, cont_when_not_ready: bool) -> None:
        """Fill the node cache (flanneld waits up to 10 min for its informer).

        :raises StoreError: not synced in ``timeout`` (unless ``cont_when_not_ready``).
        :raises StoreAuthError: credentials or RBAC rejected (waiting cannot fix it).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        attempts = 0
        while True:
            try:
                await self._relist(resource_version="0")
                return
            except StoreAuthError:
                raise
            except StoreError as exc:
                if loop.time() >= deadline:
                    if cont_when_not_ready:
                        log.warning(
                            "the node list did not sync within %.0fs (%s); continuing since "
                            "CONT_WHEN_CACHE_NOT_READY=true (peers appear once it answers)",
                            timeout,
                            exc,
                        )
                        return
                    raise StoreError(
                        f"the node list from the Kubernetes API did not sync within "
                        f"{timeout:.0f}s (last error: {exc}); check that the API server is "
                        "reachable, or set CONT_WHEN_CACHE_NOT_READY=true to start anyway"
                    ) from exc
                if attempts % 10 == 0:
                    log.warning("waiting for the node list to sync: %s (retrying every 1s)", exc)
                attempts += 1
            await asyncio.sleep(1.0)

    async def public_ip_override(self) -> PublicIPOverride:
        """``<p>node-public-ip(v6)`` annotations override ``--public-ip(v6)`` (spec §4.1
        step 5).

        :raises ConfigError: an annotation is not an address of its family.
        """
        obj = await self._retrying("get", lambda: self.client.get_node(self.node_name))
        node = NodeInfo.from_object(obj, self.keys)
        found: dict[str, IPv4Address | IPv6Address] = {}
        for family, key, kind in (
            ("IPv4", self.keys.node_public_ip, IPv4Address),
            ("IPv6", self.keys.node_public_ipv6, IPv6Address),
        ):
            text = node.annotations.get(key, "")
            if not text:
                continue
            try:
                found[family] = kind(text)
            except ValueError:
                raise ConfigError(
                    f'node "{self.node_name}": annotation {key}={text!r} is not an {family} '
                    "address; fix or remove it"
                ) from None
            log.info("public %s %s from node annotation %s", family, found[family], key)
        v4, v6 = found.get("IPv4"), found.get("IPv6")
        return PublicIPOverride(
            ipv4=v4 if isinstance(v4, IPv4Address) else None,
            ipv6=v6 if isinstance(v6, IPv6Address) else None,
        )

    # -- the own lease -----------------------------------------------------------------

    async def _retrying(self, what: str, call: Any) -> Any:
        """flanneld retries node reads and patches every 3 s for 30 s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.acquire_timeout
        while True:
            try:
                return await call()
            except (StoreUnavailable, StoreNotFound) as exc:
                if loop.time() >= deadline:
                    raise StoreError(
                        f"timeout contacting kube-api, failed to {what} node "
                        f'"{self.node_name}": {exc}'
                    ) from exc
                log.info("%s node %s: %s (retrying)", what, self.node_name, exc)
            await asyncio.sleep(self.retry_seconds)

    def _lease_for(self, node: NodeInfo, attrs: LeaseAttrs) -> Lease:
        try:
            v4, v6 = pod_cidrs(node)
        except NodeSkipped as exc:
            raise ConfigError(str(exc)) from None
        dual = self.config.backend_type in DUAL_STACK_BACKENDS
        if not self.ipv4 and self.config.enable_ipv6:
            return self._v6_only_lease(node, attrs, v6, dual)
        if v4 is None or not self.ipv4:
            raise ConfigError(
                f'node "{node.name}" has no IPv4 podCIDR ({node.pod_cidrs or node.pod_cidr}); '
                "IPv6-only clusters are not supported by this Loden version"
            )
        network = self.config.network
        if network is None or not v4.subnet_of(network):
            raise ConfigError(
                f'subnet "{network or ""}" specified in the flannel net config doesn\'t contain '
                f'"{v4}" PodCIDR of the "{node.name}" node: make Network in net-conf.json '
                "(ConfigMap kube-flannel-cfg) match kube-controller-manager --cluster-cidr "
                "(kubeadm --pod-network-cidr)"
            )
        subnet6 = None
        if self.config.enable_ipv6 and dual:
            net6 = self.config.ipv6_network
            if v6 is None:
                raise ConfigError(
                    f'node "{node.name}" has no IPv6 podCIDR but EnableIPv6 is true: assign '
                    "dual-stack podCIDRs (--cluster-cidr with both families) or disable IPv6"
                )
            if net6 is None or not v6.subnet_of(net6):
                raise ConfigError(
                    f'subnet "{net6 or ""}" specified in the flannel net config doesn\'t '
                    f'contain "{v6}" PodCIDR of the "{node.name}" node: make IPv6Network in '
                    "net-conf.json match the cluster's IPv6 --cluster-cidr"
                )
            subnet6 = v6
        if not dual:
            attrs = dataclasses.replace(attrs, public_ipv6=None, backend_v6_data=None)
        return Lease(subnet=v4, attrs=attrs, ipv6_subnet=subnet6, reserved=True)

    def _v6_only_lease(
        self, node: NodeInfo, attrs: LeaseAttrs, v6: IPv6Network | None, dual: bool
    ) -> Lease:
        """IPv6-only (``EnableIPv4: false``, flannel v0.18+): the node's IPv6 podCIDR is
        the lease; its IPv4 part is empty (``0.0.0.0/0``), as over etcd."""
        if not dual:
            raise ConfigError(
                f"IPv6-only is not supported with Backend.Type {self.config.backend_type!r}: "
                f"use {', '.join(sorted(DUAL_STACK_BACKENDS))}, or enable IPv4"
            )
        net6 = self.config.ipv6_network
        if v6 is None:
            raise ConfigError(
                f'node "{node.name}" has no IPv6 podCIDR ({node.pod_cidrs or node.pod_cidr}) '
                "but the config is IPv6-only: assign IPv6 podCIDRs (--cluster-cidr) or enable "
                "IPv4"
            )
        if net6 is None or not v6.subnet_of(net6):
            raise ConfigError(
                f'subnet "{net6 or ""}" specified in the flannel net config doesn\'t '
                f'contain "{v6}" PodCIDR of the "{node.name}" node: make IPv6Network in '
                "net-conf.json match the cluster's IPv6 --cluster-cidr"
            )
        return Lease(subnet=NO_IPV4, attrs=attrs, ipv6_subnet=v6, reserved=True)

    async def _ensure_annotations(self, attrs: LeaseAttrs) -> NodeInfo:
        node = NodeInfo.from_object(
            await self._retrying("get", lambda: self.client.get_node(self.node_name)), self.keys
        )
        changed = desired_annotations(self.keys, node.annotations, attrs)
        if changed:
            body = annotations_patch(changed)
            await self._retrying(
                "patch", lambda: self.client.patch_node_status(self.node_name, body)
            )
            log.info(
                "annotated node %s: %s",
                self.node_name,
                ", ".join(f"{k.removeprefix(self.keys.prefix)}={v}" for k, v in changed.items()),
            )
        return node

    async def acquire_lease(self, attrs: LeaseAttrs, previous: PreviousSubnets) -> Lease:
        """Our podCIDR(s) as the lease; our attrs published as node annotations.

        :raises ConfigError: no podCIDR assigned, or outside ``Network`` (says what to do).
        :raises StoreForbidden: RBAC lacks ``patch`` on ``nodes/status`` (or ``get``).
        :raises StoreError: the node was not readable or patchable within 30 s.
        """
        node = NodeInfo.from_object(
            await self._retrying("get", lambda: self.client.get_node(self.node_name)), self.keys
        )
        lease = self._lease_for(node, attrs)
        await self._ensure_annotations(lease.attrs)
        if self._synced:
            # The cache predates our patch: without this the first snapshot would lack
            # our own node (the watch brings the real object right after).
            self._cache[self.node_name] = lease
        log.info("lease: node %s podCIDR %s", self.node_name, lease.key)
        return lease

    async def complete_lease(self, lease: Lease) -> None:
        """``--set-node-network-unavailable``: ``NetworkUnavailable=False``, reason
        ``FlannelIsUp`` (spec §4.5), once the data plane is up."""
        if not self.set_network_unavailable:
            return
        body = network_unavailable_patch()
        await self._retrying("patch", lambda: self.client.patch_node_status(self.node_name, body))
        log.info("node %s: condition NetworkUnavailable=False (FlannelIsUp)", self.node_name)

    async def renew_lease(self, lease: Lease) -> Lease:
        """Nothing expires in kube mode: re-check our annotations (repair them if they
        were removed) and that our podCIDR is unchanged.

        :raises LeaseRevoked: the node's podCIDR changed under us.
        """
        try:
            node = await self._ensure_annotations(lease.attrs)
        except StoreError as exc:
            if isinstance(exc, StoreAuthError):
                raise
            raise StoreUnavailable(str(exc)) from exc
        try:
            current = self._lease_for(node, lease.attrs)
        except ConfigError as exc:
            raise LeaseRevoked(f"node {self.node_name}: {exc}") from None
        if not current.same_subnets(lease):
            raise LeaseRevoked(
                f"node {self.node_name}'s podCIDR changed from {lease.key} to {current.key}"
            )
        return lease

    def renew_delay(self, lease: Lease) -> float:
        return 600.0

    # -- peers -------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        if len(self._warned) > 10000:
            self._warned.clear()
        self._warned.add(key)
        log.warning("%s", message)

    def _lease_of(self, obj: Mapping[str, Any]) -> tuple[str, Lease | None]:
        try:
            node = NodeInfo.from_object(obj, self.keys)
        except NodeSkipped as exc:
            self._warn_once(str(exc), f"skipping a node: {exc}")
            return "", None
        if node.annotations.get(self.keys.managed) != "true":
            return node.name, None  # not flannel's (yet): silently, as flanneld
        try:
            return node.name, node_to_lease(node, self.keys, ipv4=self.ipv4, ipv6=self.ipv6)
        except NodeSkipped as exc:
            self._warn_once(f"{node.name}\0{exc}", f"skipping {exc} (other peers are unaffected)")
            return node.name, None

    async def _relist(self, resource_version: str | None = None) -> None:
        listing = await self.client.list_nodes(resource_version=resource_version)
        cache: dict[str, Lease | None] = {}
        for obj in listing.items:
            name, lease = self._lease_of(obj)
            if name:
                cache[name] = lease
        self._cache = cache
        self._rv = listing.resource_version
        self._synced = True

    def _snapshot(self) -> WatchResult:
        return WatchResult(snapshot=tuple(x for x in self._cache.values() if x is not None))

    def _apply_event(self, event: WatchEvent) -> list[LeaseEvent]:
        if event.resource_version:
            self._rv = event.resource_version
        if event.type == "BOOKMARK":
            return []
        name, lease = self._lease_of(event.object)
        if not name:
            return []
        old = self._cache.get(name)
        out: list[LeaseEvent] = []
        if event.type == "DELETED":
            self._cache.pop(name, None)
            if old is not None:
                out.append(LeaseEvent(EventKind.REMOVED, old))
            return out
        self._cache[name] = lease
        if old is not None and (lease is None or old.key != lease.key):
            out.append(LeaseEvent(EventKind.REMOVED, old))
        if lease is not None and lease != old:
            out.append(LeaseEvent(EventKind.ADDED, lease))
        return out

    async def _reader(self, queue: asyncio.Queue[WatchResult]) -> None:
        """List once if needed, then watch forever: resume from the last resourceVersion
        after a dropped stream, relist after 410 Gone, a cache snapshot every
        ``resync_seconds``."""
        loop = asyncio.get_running_loop()
        backoff = 0.1
        relist = not self._synced
        outage_since: float | None = None
        next_resync = loop.time() + self.resync_seconds
        while True:
            try:
                if relist:
                    await self._relist(None if self._rv else "0")
                    relist = False
                    await queue.put(self._snapshot())
                # Jittered like client-go (5-10 min), so a cluster's watches never expire
                # in lockstep (flanneld v0.20.2's all did, spec §4.7).
                timeout = random.randint(300, 599)
                async for event in self.client.watch_nodes(self._rv, timeout):
                    if not self._watch_ok:
                        self._watch_ok = True
                    if outage_since is not None:
                        log.warning("node watch resumed after %.0fs", loop.time() - outage_since)
                        outage_since = None
                    backoff = 0.1
                    changes = self._apply_event(event)
                    if changes:
                        await queue.put(WatchResult(events=tuple(changes)))
                    if loop.time() >= next_resync:
                        next_resync = loop.time() + self.resync_seconds
                        await queue.put(self._snapshot())
                self._watch_ok = True
            except WatchCompacted as exc:
                log.info("node watch expired (%s): relisting", exc)
                self._restarts += 1
                relist = True
            except StoreAuthError as exc:
                self._watch_ok = False
                self._restarts += 1
                log.error("node watch: %s (retrying in 30s)", exc)
                await asyncio.sleep(30.0)
            except StoreError as exc:
                self._watch_ok = False
                self._restarts += 1
                if outage_since is None:
                    outage_since = loop.time()
                    log.warning(
                        "node watch interrupted: %s; resuming from resourceVersion %s with "
                        "backoff up to 5s (routes stay as they are meanwhile)",
                        exc,
                        self._rv or "(none)",
                    )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            if loop.time() >= next_resync:
                next_resync = loop.time() + self.resync_seconds
                if self._synced:
                    await queue.put(self._snapshot())

    async def watch_leases(
        self, held: Mapping[str, Lease] | None = None
    ) -> AsyncIterator[WatchResult]:
        """A snapshot from the node cache first, then events; several results waiting
        are merged (a snapshot supersedes everything queued before it). ``held`` is not
        needed: a snapshot is made of the cache's leases, never of new copies."""
        queue: asyncio.Queue[WatchResult] = asyncio.Queue(self.queue_depth)
        if self._synced:
            queue.put_nowait(self._snapshot())
        reader = asyncio.create_task(self._reader(queue), name="kube-node-watch")
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    reader.result()  # re-raises what stopped the reader
                    raise StoreError("the node watch stopped")
                results = [getter.result()]
                while not queue.empty():
                    results.append(queue.get_nowait())
                yield _merge(results)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def list_leases(self) -> list[Lease]:
        """Every node's lease: from the node cache once it synced (what an informer's
        lister gives; a second list of 5,000 nodes at startup cost seconds), else a list."""
        if not self._synced:
            await self._relist()
        return [x for x in self._cache.values() if x is not None]

    async def list_nodes(self) -> list[NodeInfo]:
        """Every node with the flannel annotations (``loden leases`` in kube mode)."""
        listing = await self.client.list_nodes()
        return [NodeInfo.from_object(obj, self.keys) for obj in listing.items]


def _merge(results: list[WatchResult]) -> WatchResult:
    last = max((i for i, r in enumerate(results) if r.snapshot is not None), default=-1)
    if last < 0:
        return WatchResult(events=tuple(e for r in results for e in r.events))
    if last == len(results) - 1:
        return results[last]
    # A snapshot followed by events: fold the events into the snapshot.
    leases = {lease.key: lease for lease in results[last].snapshot or ()}
    for result in results[last + 1 :]:
        for event in result.events:
            if event.kind is EventKind.ADDED:
                leases[event.lease.key] = event.lease
            else:
                leases.pop(event.lease.key, None)
    return WatchResult(snapshot=tuple(leases.values()))


async def node_name_of(client: KubeClient, env: KubeEnv) -> str:
    """``NODE_NAME``, else the ``spec.nodeName`` of pod ``POD_NAMESPACE/POD_NAME``.

    :raises ConfigError: neither is set, or the pod has no node name.
    """
    if env.node_name:
        return env.node_name
    if not env.pod_name or not env.pod_namespace:
        raise ConfigError(
            "env variables POD_NAME and POD_NAMESPACE must be set (or NODE_NAME): the "
            "DaemonSet passes them with the downward API (`loden kube manifest`)"
        )
    where = f"{env.pod_namespace}/{env.pod_name}"
    try:
        pod = await client.get_pod(env.pod_namespace, env.pod_name)
    except StoreAuthError:
        raise
    except StoreError as exc:
        raise StoreError(f"error retrieving pod spec for '{where}': {exc}") from exc
    spec = pod.get("spec")
    name = spec.get("nodeName") if isinstance(spec, dict) else None
    if not isinstance(name, str) or not name:
        raise ConfigError(f"node name not present in pod spec '{where}'")
    return name


async def open_kube_manager(
    settings: KubeSettings,
    env: Mapping[str, str],
    *,
    sa_dir: Path = kubeconfig.SERVICE_ACCOUNT_DIR,
    sync_timeout: float = CACHE_SYNC_TIMEOUT,
) -> KubeSubnetManager:
    """Startup exactly as flanneld's (spec §4.1): client config, node name, net-conf,
    the node cache, the stored public IPs.

    :raises ConfigError: a bad prefix, env, net-conf or kube config (exit 1).
    :raises StoreError: the API did not answer in time, or refused us.
    """
    keys = AnnotationKeys.for_flag(settings.annotation_prefix)
    kenv = KubeEnv.from_env(env)
    client = KubeClient(
        kubeconfig.load(
            api_url=settings.api_url,
            kubeconfig_file=settings.kubeconfig_file,
            env=env,
            sa_dir=sa_dir,
        )
    )
    try:
        node_name = await node_name_of(client, kenv)
        config = read_net_conf(settings.net_config_path)
        manager = KubeSubnetManager(
            client,
            keys,
            node_name,
            config,
            set_network_unavailable=settings.set_node_network_unavailable,
            queue_depth=kenv.event_queue_depth,
        )
        if config.backend_type != "alloc":
            await manager.initial_sync(
                sync_timeout, cont_when_not_ready=kenv.cont_when_cache_not_ready
            )
    except BaseException:
        await client.aclose()
        raise
    log.info(
        "kube subnet manager: node %s, API %s (%s), %d nodes listed",
        node_name,
        client.config.server,
        client.config.source,
        len(manager._cache),
    )
    return manager
