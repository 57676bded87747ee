"""Asyncio client for the etcd v2 keys API (``/v2/keys/...``), built on ``httpx``.

flannel <= v0.17 kept its config and leases here (compat spec section 3.9). Endpoint
failover, TLS and the "never re-send an ambiguous write" rule come from
:class:`loden.subnet.etcd_client.EndpointPool`, so both API versions fail over alike.
Credentials go as HTTP basic auth (the v2 API has no tokens).

Wire facts (etcd 3.4.23 with ``--enable-v2=true``; without it ``/v2/keys`` is a plain-text
404, reported here as "v2 API not enabled"):

* errors are ``{"errorCode", "message", "cause", "index"}``: 100 key not found (HTTP 404),
  101 compare failed and 105 key exists (412), 401 "index cleared" (400), 110 auth (401),
  300/301 raft trouble (5xx).
* ``X-Etcd-Index`` is the store index when the request was *accepted*; for a watch it is
  sent before the event, so resume a watch from ``node.modified_index + 1``.
* a long-poll watch flushes its headers at once and the body when an event arrives;
  etcd keeps the last 1000 events, older ``waitIndex`` values get 401 "index cleared".
* TTL expiry reaches watchers as action ``expire`` (node without value, prev_node with it).

Decision: a missing key raises :class:`KeyNotFound` (a :class:`StoreError`), never
``None``, so ``None`` stays free to mean "the watch timed out without an event".
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from loden.errors import LeaseConflict, StoreAuthError, StoreError, WatchCompacted
from loden.subnet.etcd_client import AttemptFailed, EndpointPool

Json = dict[str, Any]


class KeyNotFound(StoreError):
    """etcd v2 errorCode 100: the key (or directory) does not exist."""


@dataclass(frozen=True, slots=True)
class V2Node:
    """One v2 node. ``value`` is None for directories and for deleted/expired nodes."""

    key: str
    value: str | None = None
    dir: bool = False
    ttl: int | None = None
    expiration: datetime | None = None
    modified_index: int = 0
    created_index: int = 0
    nodes: tuple[V2Node, ...] = ()


@dataclass(frozen=True, slots=True)
class V2Response:
    """A v2 answer: ``action`` is get/set/create/update/compareAndSwap/delete/
    compareAndDelete/expire; ``etcd_index`` is the ``X-Etcd-Index`` header."""

    action: str
    node: V2Node
    prev_node: V2Node | None
    etcd_index: int


def _node(d: Json) -> V2Node:
    exp = d.get("expiration")
    return V2Node(
        key=str(d.get("key", "/")),
        value=d.get("value"),
        dir=bool(d.get("dir", False)),
        ttl=int(d["ttl"]) if "ttl" in d else None,
        expiration=datetime.fromisoformat(exp) if exp else None,
        modified_index=int(d.get("modifiedIndex", 0)),
        created_index=int(d.get("createdIndex", 0)),
        nodes=tuple(_node(n) for n in d.get("nodes", [])),
    )


def _path(key: str) -> str:
    key = key if key.startswith("/") else "/" + key
    return "/v2/keys" + urllib.parse.quote(key, safe="/")


def _bool(flag: bool) -> str:
    return "true" if flag else "false"


def _decode(resp: httpx.Response, where: str) -> V2Response:
    """Turn one HTTP answer into a :class:`V2Response` or the matching exception."""
    try:
        data = json.loads(resp.content)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        if resp.status_code >= 500:
            raise AttemptFailed(f"HTTP {resp.status_code}", maybe_applied=True)
        if resp.status_code == 404:
            raise StoreError(
                f"etcd v2 API not enabled at {where}; start etcd with --enable-v2=true"
            )
        raise StoreError(f"etcd v2 {where}: HTTP {resp.status_code} without JSON")
    if "errorCode" in data:
        code, msg = int(data["errorCode"]), str(data.get("message", ""))
        text = f"etcd v2 {where}: {msg} ({data.get('cause', '')}, errorCode {code})"
        if code == 100:
            raise KeyNotFound(text)
        if code in (101, 105):
            raise LeaseConflict(text)
        if code == 401:
            raise WatchCompacted(f"{text}; re-read and watch from the new index")
        if code == 110 or resp.status_code in (401, 403):
            raise StoreAuthError(f"{text}; check the etcd username and password")
        if code in (300, 301) or resp.status_code >= 500:
            # 301 "during leader election" is refused before proposing; 300 may time out late.
            raise AttemptFailed(f"{msg} ({data.get('cause', '')})", maybe_applied=code == 300)
        raise StoreError(text)
    if resp.status_code >= 500:
        raise AttemptFailed(f"HTTP {resp.status_code}", maybe_applied=True)
    prev = data.get("prevNode")
    return V2Response(
        action=str(data.get("action", "")),
        node=_node(data.get("node", {})),
        prev_node=_node(prev) if isinstance(prev, dict) else None,
        etcd_index=int(resp.headers.get("X-Etcd-Index", "0")),
    )


class EtcdV2Client:
    """etcd v2 keys API client with failover, TLS and basic auth.

    Every method raises :class:`StoreUnavailable` when no endpoint answers within
    ``call_timeout``, :class:`StoreAuthError` for TLS/credential failures, and the
    key-specific errors documented per method.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        username: str | None = None,
        password: str | None = None,
        call_timeout: float = 10.0,
        connect_timeout: float = 3.0,
        request_timeout: float = 3.0,
    ) -> None:
        auth = httpx.BasicAuth(username, password or "") if username else None
        self._pool = EndpointPool(
            endpoints,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            call_timeout=call_timeout,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            auth=auth,
        )

    @property
    def endpoint(self) -> str:
        return self._pool.current

    async def __aenter__(self) -> EtcdV2Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def _request(
        self,
        method: str,
        key: str,
        *,
        params: dict[str, str],
        form: dict[str, str] | None = None,
        idempotent: bool,
    ) -> V2Response:
        path = _path(key)

        async def attempt(url: str, remaining: float) -> V2Response:
            resp = await self._pool.client.request(
                method,
                url + path,
                params=params,
                data=form,
                timeout=self._pool.timeout(remaining),
            )
            return _decode(resp, f"{method} {key} on {url}")

        return await self._pool.call(f"v2 {method} {key}", attempt, idempotent=idempotent)

    async def get(self, key: str, *, recursive: bool = False, quorum: bool = False) -> V2Response:
        """Read a key or directory (``recursive`` fills nested ``nodes``).

        :raises KeyNotFound: the key does not exist.
        """
        params = {"recursive": _bool(recursive), "quorum": _bool(quorum)}
        return await self._request("GET", key, params=params, idempotent=True)

    async def set(
        self,
        key: str,
        value: str,
        *,
        ttl: int | None = None,
        prev_exist: bool | None = None,
        prev_value: str | None = None,
        prev_index: int | None = None,
    ) -> V2Response:
        """Write a key. ``ttl=None`` stores it without TTL (clearing an old one).

        With any ``prev_*`` condition the write is a compare-and-swap and is never re-sent
        after an ambiguous failure. ``prev_index=0`` means "no condition" (as in flannel).

        :raises LeaseConflict: the condition failed (errorCode 101 or 105).
        :raises KeyNotFound: ``prev_exist=True`` (or ``prev_value``/``prev_index``) on a
            missing key.
        """
        params: dict[str, str] = {}
        if prev_exist is not None:
            params["prevExist"] = _bool(prev_exist)
        if prev_value is not None:
            params["prevValue"] = prev_value
        if prev_index:
            params["prevIndex"] = str(prev_index)
        form = {"value": value}
        if ttl is not None:
            form["ttl"] = str(ttl)
        return await self._request("PUT", key, params=params, form=form, idempotent=not params)

    async def create(self, key: str, value: str, *, ttl: int | None = None) -> V2Response:
        """Create a key that must not exist (``prevExist=false``).

        :raises LeaseConflict: the key exists (errorCode 105).
        """
        return await self.set(key, value, ttl=ttl, prev_exist=False)

    async def delete(
        self,
        key: str,
        *,
        prev_value: str | None = None,
        prev_index: int | None = None,
        recursive: bool = False,
        dir: bool = False,
    ) -> V2Response:
        """Delete a key (or a directory with ``dir``/``recursive``).

        :raises KeyNotFound: the key does not exist.
        :raises LeaseConflict: ``prev_value``/``prev_index`` did not match (errorCode 101).
        """
        params = {"recursive": _bool(recursive), "dir": _bool(dir)}
        if prev_value is not None:
            params["prevValue"] = prev_value
        if prev_index:
            params["prevIndex"] = str(prev_index)
        conditional = prev_value is not None or bool(prev_index)
        return await self._request("DELETE", key, params=params, idempotent=not conditional)

    async def watch(
        self,
        key: str,
        *,
        recursive: bool = False,
        wait_index: int | None = None,
        timeout: float = 60.0,
    ) -> V2Response | None:
        """Long-poll for the next event at/under ``key``, from ``wait_index`` if given.

        Returns None when ``timeout`` seconds pass without an event (poll again with the
        same ``wait_index``). Endpoints fail over only while connecting.

        :raises WatchCompacted: ``wait_index`` is older than etcd's 1000-event history
            (errorCode 401): re-read the tree and watch from its ``etcd_index + 1``.
        """
        params = {"wait": "true", "recursive": _bool(recursive)}
        if wait_index:
            params["waitIndex"] = str(wait_index)
        path = _path(key)

        async def attempt(url: str, remaining: float) -> V2Response | None:
            connect = min(self._pool.connect_timeout, max(remaining, 0.05))
            try:
                resp = await self._pool.client.get(
                    url + path, params=params, timeout=httpx.Timeout(timeout, connect=connect)
                )
            except httpx.ReadTimeout:
                return None
            return _decode(resp, f"watch {key} on {url}")

        return await self._pool.call(
            f"v2 watch {key}",
            attempt,
            idempotent=True,
            attempt_timeout=timeout + self._pool.connect_timeout + 1.0,
        )
