"""Where leases live: open the right subnet manager for the settings.

``open_subnet_manager`` is the one place that picks the implementation of
:class:`~loden.subnet.base.SubnetManager`: etcd (below) or, with ``--kube-subnet-mgr``,
the Kubernetes subnet manager.

``-etcd-api auto`` (the default) looks for ``<prefix>/config`` through the v3 API
first, then the v2 API, and keeps waiting on both (saying so) until one has it. Users
of the seed document's ``ETCDCTL_API=2 etcdctl set`` flow therefore need no new flag.
"""

from __future__ import annotations

import asyncio
import logging
import os

from loden.errors import StoreAuthError, StoreError
from loden.settings import AgentSettings, EtcdSettings
from loden.subnet.base import SubnetManager
from loden.subnet.etcd_http import EtcdHTTP, tls_context
from loden.subnet.etcd_v2 import EtcdV2Store
from loden.subnet.etcd_v3 import EtcdV3Store
from loden.subnet.manager import EtcdSubnetManager
from loden.subnet.store import LeaseStore

log = logging.getLogger(__name__)


def _http(settings: EtcdSettings, *, basic_auth: bool = False) -> EtcdHTTP:
    tls = any(e.startswith("https://") for e in settings.endpoints)
    context = None
    if tls or settings.tls_client:
        # flannel: client certificates only with both cert and key (compat item 5).
        context = tls_context(
            settings.cafile,
            settings.certfile if settings.tls_client else "",
            settings.keyfile if settings.tls_client else "",
        )
    if not tls and settings.tls_client:
        log.warning(
            "client certificates are configured but the etcd endpoints are "
            "http://: they are not used; switch the endpoints to https://"
        )
    if tls and not settings.tls_client:
        log.warning(
            "no client certificate provided: connecting to etcd without client "
            "authentication (set -etcd-certfile and -etcd-keyfile)"
        )
    # v3 authenticates with a token (EtcdV3Store); v2 with HTTP basic auth.
    auth = (settings.username, settings.password) if basic_auth and settings.username else None
    return EtcdHTTP(settings.endpoints, context=context, auth=auth)


def _v3(settings: EtcdSettings) -> EtcdV3Store:
    return EtcdV3Store(
        _http(settings), settings.prefix, username=settings.username, password=settings.password
    )


def _v2(settings: EtcdSettings) -> EtcdV2Store:
    return EtcdV2Store(_http(settings, basic_auth=True), settings.prefix)


async def _has_config(store: LeaseStore, problems: dict[str, str]) -> bool:
    """Does this API hold the config? Outages and a disabled v2 API count as "no" (the
    reason is kept in ``problems`` for the waiting message); TLS/auth failures
    propagate, since waiting cannot fix them."""
    try:
        found = await store.get_config() is not None
    except StoreAuthError:
        raise
    except StoreError as exc:
        problems[store.api] = str(exc)
        return False
    problems.pop(store.api, None)
    return found


async def open_store(
    settings: EtcdSettings, *, for_write: bool = False, wait: bool = False
) -> LeaseStore:
    """The store for ``settings.api``; with ``auto``, the API that has the config.

    ``wait``: keep polling until one API has the config (the agent); otherwise fall
    back to v3 when neither has it (operator commands: ``config set`` writes v3).
    """
    if settings.api == "v3":
        return _v3(settings)
    if settings.api == "v2":
        return _v2(settings)
    v3, v2 = _v3(settings), _v2(settings)
    attempts = 0
    problems: dict[str, str] = {}
    while True:
        if await _has_config(v3, problems):
            await v2.aclose()
            return v3
        if await _has_config(v2, problems):
            await v3.aclose()
            log.info("using the etcd v2 API: %s/config exists there", settings.prefix)
            return v2
        if not wait:
            await v2.aclose()
            return v3
        if attempts % 10 == 0:
            log.warning(
                "waiting for the network config at %s/config in etcd (looked with "
                "the v3 API and the v2 API); create it with `loden config set` or "
                "`etcdctl put`",
                settings.prefix,
            )
        attempts += 1
        await asyncio.sleep(1.0)


async def open_subnet_manager(settings: AgentSettings) -> SubnetManager:
    """Open the agent's subnet manager (etcd: waits for the config with
    ``-etcd-api=auto``).

    :raises StoreAuthError: TLS/auth rejected (waiting cannot fix it).
    :raises ConfigError: the kube settings or files are unusable.
    """
    if settings.kube.enabled:
        return await _open_kube_subnet_manager(settings)
    store = await open_store(settings.etcd, wait=True)
    log.info("subnet manager: etcd %s API at %s", store.api, ",".join(settings.etcd.endpoints))
    return EtcdSubnetManager(
        store, ttl=settings.lease_ttl_seconds, renew_margin=settings.renew_margin_minutes * 60
    )


async def _open_kube_subnet_manager(settings: AgentSettings) -> SubnetManager:
    """The seam for ``--kube-subnet-mgr``: the Kubernetes subnet manager lives in
    ``loden.subnet.kube`` and is built here (imported lazily: etcd nodes never load the
    Kubernetes client). Its environment (``NODE_NAME``, ``POD_NAME``... spec §1.3) is
    the process's."""
    from loden.subnet.kube import open_kube_manager

    return await open_kube_manager(settings.kube, os.environ)
