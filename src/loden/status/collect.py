"""Gather one node's status: the agent's ``/status``, subnet.env, the store, the kernel.

Every source is optional: a stopped agent, an unreachable etcd or a missing subnet.env
is itself part of the answer, never a crash. The result is a plain JSON-able dict (the
``loden status --json`` contract); :mod:`loden.status.cli` renders it as text, and
``loden doctor`` reuses the pieces.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network
from typing import Any

import httpx

from loden.errors import LodenError, NetworkConfigError, ParseError
from loden.kernel.netlink import Netlink
from loden.model.config import NetworkConfig
from loden.model.lease import Lease
from loden.model.subnet_env import parse_env_text
from loden.settings import AgentSettings
from loden.status.agent_view import lease_json, peers_json
from loden.status.expected import kernel_diff
from loden.status.rules import rules_diff
from loden.subnet import open_store
from loden.subnet.manager import EtcdSubnetManager

STORE_TIMEOUT = 5.0
AGENT_TIMEOUT = 2.0


def status_url(settings: AgentSettings, override: str = "") -> str | None:
    """Where the agent serves ``/status`` (None: its health server is disabled)."""
    if override:
        return override
    if not settings.healthz_port:
        return None
    host = settings.healthz_ip
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.healthz_port}/status"


async def agent_status(url: str | None) -> tuple[dict[str, Any] | None, str]:
    """The agent's document, or None and why it could not be had."""
    if url is None:
        return None, (
            "the agent's health server is disabled (-healthz-port 0): start the agent with "
            "-healthz-port=PORT (and give `loden status` the same flag) to see its view"
        )
    try:
        async with httpx.AsyncClient(timeout=AGENT_TIMEOUT, trust_env=False) as client:
            reply = await client.get(url)
    except httpx.HTTPError as exc:
        return None, f"no answer from {url} ({type(exc).__name__}: {exc or 'refused'})"
    if reply.status_code != 200:
        return None, f"{url} answered {reply.status_code}: is this a Loden agent?"
    try:
        doc = reply.json()
    except ValueError:
        return None, f"{url} did not answer JSON: is this a Loden agent?"
    return (doc if isinstance(doc, dict) else None), ""


def read_subnet_env(settings: AgentSettings) -> dict[str, Any]:
    path = settings.subnet_file
    out: dict[str, Any] = {"path": str(path)}
    try:
        stat = path.stat()
        text = path.read_text()
    except FileNotFoundError:
        out["error"] = "missing"
        return out
    except OSError as exc:
        out["error"] = f"unreadable: {exc.strerror}"
        return out
    out["age_seconds"] = round(time.time() - stat.st_mtime)
    try:
        out["values"] = parse_env_text(text)
    except ParseError as exc:
        out["error"] = f"malformed: {exc}"
    return out


def env_subnet(env: dict[str, Any]) -> IPv4Network | None:
    value = (env.get("values") or {}).get("FLANNEL_SUBNET")
    try:
        return IPv4Interface(value).network if value else None
    except ValueError:
        return None


@dataclass
class StoreView:
    ok: bool = False
    api: str = ""
    error: str = ""
    config: NetworkConfig | None = None
    leases: list[Lease] = field(default_factory=list)


async def read_store(settings: AgentSettings) -> StoreView:
    if settings.kube.enabled:
        return await _read_kube(settings)
    view = StoreView()
    try:
        async with asyncio.timeout(STORE_TIMEOUT):
            store = await open_store(settings.etcd)
            try:
                view.api = store.api
                manager = EtcdSubnetManager(store)
                try:
                    view.config = await manager.get_network_config()
                except (NetworkConfigError, LodenError) as exc:
                    view.error = f"network config: {exc}"
                view.leases = await manager.list_leases(with_ttl=True)
                view.ok = True
            finally:
                await store.aclose()
    except TimeoutError:
        endpoints = ",".join(settings.etcd.endpoints)
        view.error = f"no answer within {STORE_TIMEOUT:.0f}s from {endpoints}"
    except LodenError as exc:
        view.error = str(exc)
    return view


async def _read_kube(settings: AgentSettings) -> StoreView:
    """``-kube-subnet-mgr``: the nodes' podCIDRs and annotations are the leases."""
    from loden.subnet import open_subnet_manager

    view = StoreView(api="kube")
    try:
        async with asyncio.timeout(STORE_TIMEOUT):
            manager = await open_subnet_manager(settings)
            try:
                view.config = await manager.get_network_config()
                view.leases = await manager.list_leases()
                view.ok = True
            finally:
                await manager.aclose()
    except TimeoutError:
        view.error = f"the Kubernetes API did not answer within {STORE_TIMEOUT:.0f}s"
    except LodenError as exc:
        view.error = str(exc)
    return view


async def collect(settings: AgentSettings, url_override: str = "") -> dict[str, Any]:
    """The whole report (see the module docstring)."""
    url = status_url(settings, url_override)
    (agent, agent_error), store, env = await asyncio.gather(
        agent_status(url), read_store(settings), asyncio.to_thread(read_subnet_env, settings)
    )
    report: dict[str, Any] = {
        "agent": {"up": agent is not None, "url": url, "error": agent_error, "status": agent},
        "subnet_env": env,
        "store": {
            "reachable": store.ok,
            "api": store.api,
            "error": store.error,
            "endpoints": list(settings.etcd.endpoints),
        },
    }
    config = store.config
    if config is None and agent is not None:
        raw = (agent.get("config") or {}).get("raw")
        if raw:
            config = NetworkConfig.parse(raw, validate=False)
    subnet = env_subnet(env)
    own: Lease | None = None
    if agent is not None and isinstance(agent.get("lease"), dict):
        subnet = IPv4Network(agent["lease"]["subnet"])
    for lease in store.leases:
        if subnet is not None and lease.subnet == subnet:
            own = lease
    peers = [lease for lease in store.leases if own is None or lease.key != own.key]
    report["config"] = (
        {"network": str(config.network), "backend_type": config.backend_type, "raw": config.raw}
        if config is not None
        else None
    )
    if own is not None:
        report["lease"] = lease_json(own)
    elif agent is not None:
        report["lease"] = agent.get("lease")
    else:
        report["lease"] = None
    # The store's view carries each peer's TTL; the agent's is the fallback.
    if store.ok or agent is None or "peers" not in agent:
        report["peers"] = peers_json({p.key: p for p in peers})
    else:
        report["peers"] = agent["peers"]
    report["kernel"] = await _kernel(settings, config, own, peers, env)
    return report


async def _kernel(
    settings: AgentSettings,
    config: NetworkConfig | None,
    own: Lease | None,
    peers: list[Lease],
    env: dict[str, Any],
) -> dict[str, Any]:
    if config is None or own is None:
        return {
            "checked": False,
            "why": "needs the network config and this node's lease from the store",
        }
    out: dict[str, Any] = {"checked": True}
    try:
        async with await Netlink.open() as nl:
            diff = await kernel_diff(nl, config, own, peers)
            device = await nl.link(diff.device) if diff.device else None
    except LodenError as exc:
        return {"checked": False, "why": f"cannot read the kernel: {exc}"}
    out.update(
        backend=diff.backend,
        device=diff.device,
        device_mac=device.mac if device else None,
        device_mtu=device.mtu if device else None,
        problem=diff.problem,
        expected=diff.expected,
        missing=list(diff.missing),
        extra=list(diff.extra),
        skipped=list(diff.skipped),
    )
    ipmasq = (env.get("values") or {}).get("FLANNEL_IPMASQ") == "true" or settings.rules.ip_masq
    if config.network is not None and not config.enable_nftables:
        rules = await rules_diff(
            config.network,
            own.subnet,
            ip_masq=ipmasq,
            forward=settings.rules.forward_rules,
            random_fully=not settings.rules.fully_random_disable,
        )
        out["rules"] = [
            {"chain": r.chain, "table": r.table, "ok": r.ok, "summary": r.summary,
             "missing": list(r.missing)}
            for r in rules
        ]  # fmt: skip
    return out
