"""The few Kubernetes API calls flanneld makes, over httpx (spec §4.7).

``GET`` a node or a pod, a paged list of nodes, a watch of nodes (bookmarks, resumption
from a ``resourceVersion``, ``410 Gone`` as :class:`WatchCompacted`) and a
strategic-merge ``PATCH`` of ``nodes/<name>/status``. Hand-written rather than
lightkube: lightkube 1.0.1 brings a second HTTP stack (httpx2, httpcore2, h2,
msgspec, truststore) costing ~9 MB of RSS and 0.12 s of import on top of the httpx
Loden already uses, and the agent must stay light. httpx exceptions and API statuses
are mapped to :mod:`loden.errors` here and nowhere else.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from loden.errors import (
    StoreAuthError,
    StoreError,
    StoreForbidden,
    StoreNotFound,
    StoreUnavailable,
    WatchCompacted,
)
from loden.subnet.kube.config import ClientConfig

log = logging.getLogger(__name__)

STRATEGIC_MERGE = "application/strategic-merge-patch+json"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One line of a watch stream: ``ADDED``/``MODIFIED``/``DELETED``/``BOOKMARK``."""

    type: str
    object: dict[str, Any]

    @property
    def resource_version(self) -> str:
        meta = self.object.get("metadata")
        return str(meta.get("resourceVersion", "")) if isinstance(meta, dict) else ""


@dataclass(frozen=True, slots=True)
class NodeList:
    items: list[dict[str, Any]]
    resource_version: str


def _status_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip()
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return response.text[:200].strip()


class KubeClient:
    """An API server connection with the credentials of a :class:`ClientConfig`."""

    def __init__(self, config: ClientConfig, *, timeout: float = 10.0) -> None:
        self.config = config
        self.timeout = timeout
        self._client = httpx.AsyncClient(
            base_url=config.server,
            verify=config.context if config.context is not None else True,
            trust_env=False,
            timeout=httpx.Timeout(timeout),
            auth=config.basic_auth,
            headers={"Accept": "application/json", "User-Agent": "loden (flanneld)"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        token = self.config.tokens.token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def _fail(self, what: str, exc: Exception) -> StoreError:
        if isinstance(exc, httpx.ConnectError) and "CERTIFICATE" in str(exc).upper():
            return StoreAuthError(
                f"TLS verification of the API server {self.config.server} failed ({exc}); "
                f"check the CA of the {self.config.source}"
            )
        return StoreUnavailable(
            f"Kubernetes API {self.config.server} did not answer {what}: "
            f"{type(exc).__name__}: {exc or 'no detail'}"
        )

    def _check(self, response: httpx.Response, verb: str, resource: str, name: str = "") -> None:
        """Map an error status to :mod:`loden.errors` (names verb and resource)."""
        code = response.status_code
        if code < 400:
            return
        message = _status_message(response)
        target = f"{resource} {name!r}" if name else resource
        if code == 401:
            raise StoreAuthError(
                f"the Kubernetes API rejected our credentials (401) for {verb} {target}: "
                f"{message}; check the token or client certificate of the {self.config.source}"
            )
        if code == 403:
            raise StoreForbidden(
                f"the Kubernetes API forbids {verb} on {resource} (403: {message}); grant the "
                f'verb "{verb}" on resource "{resource}" to the agent\'s service account in its '
                "ClusterRole (`loden kube manifest` shows the rules flannel needs)",
                verb=verb,
                resource=resource,
            )
        if code == 404:
            raise StoreNotFound(f"{target} not found (404: {message})")
        if code == 410:
            raise WatchCompacted(f"resourceVersion too old (410 Gone: {message})")
        if code == 429 or code >= 500:
            raise StoreUnavailable(f"Kubernetes API answered {code} to {verb} {target}: {message}")
        raise StoreError(f"Kubernetes API answered {code} to {verb} {target}: {message}")

    async def _request(
        self,
        method: str,
        path: str,
        *,
        verb: str,
        resource: str,
        name: str = "",
        params: dict[str, str] | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        for attempt in (1, 2):
            try:
                response = await self._client.request(
                    method, path, params=params, content=content, headers=self._headers(headers)
                )
            except httpx.HTTPError as exc:
                raise self._fail(f"{verb} {resource}", exc) from exc
            if response.status_code == 401 and attempt == 1 and self.config.tokens.path:
                continue  # a rotated token: ``token`` re-reads the file on the retry
            self._check(response, verb, resource, name)
            try:
                return response.json()
            except ValueError as exc:
                raise StoreUnavailable(
                    f"Kubernetes API sent a non-JSON answer to {verb} {resource}"
                ) from exc
        raise AssertionError("unreachable")

    async def get_node(self, name: str) -> dict[str, Any]:
        body: dict[str, Any] = await self._request(
            "GET", f"/api/v1/nodes/{quote(name, safe='')}", verb="get", resource="nodes", name=name
        )
        return body

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        body: dict[str, Any] = await self._request(
            "GET",
            f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}",
            verb="get",
            resource="pods",
            name=f"{namespace}/{name}",
        )
        return body

    async def version(self) -> dict[str, Any]:
        body: dict[str, Any] = await self._request(
            "GET", "/version", verb="get", resource="/version"
        )
        return body

    async def list_nodes(
        self, *, resource_version: str | None = None, limit: int = 500
    ) -> NodeList:
        """All nodes, page by page (``continue``); ``resource_version="0"``: any cached
        state is fine (what client-go's first list asks for)."""
        items: list[dict[str, Any]] = []
        params: dict[str, str] = {"limit": str(limit)}
        if resource_version is not None:
            params["resourceVersion"] = resource_version
        while True:
            body = await self._request(
                "GET", "/api/v1/nodes", verb="list", resource="nodes", params=params
            )
            items.extend(x for x in body.get("items") or () if isinstance(x, dict))
            meta = body.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                return NodeList(items, str(meta.get("resourceVersion", "")))
            params = {"limit": str(limit), "continue": token}

    async def watch_nodes(
        self, resource_version: str, timeout_seconds: int
    ) -> AsyncIterator[WatchEvent]:
        """Stream node events after ``resource_version`` until the server ends the watch.

        :raises WatchCompacted: the version is gone (``410`` status or ``ERROR`` event).
        :raises StoreUnavailable: the stream broke (resume from the last version seen).
        """
        params = {
            "allowWatchBookmarks": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_seconds),
            "watch": "true",
        }
        timeout = httpx.Timeout(self.timeout, read=timeout_seconds + 30.0)
        try:
            async with self._client.stream(
                "GET", "/api/v1/nodes", params=params, headers=self._headers(), timeout=timeout
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    self._check(response, "watch", "nodes")
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    try:
                        item = json.loads(line)
                    except ValueError as exc:
                        raise StoreUnavailable(f"garbled watch line: {line[:120]!r}") from exc
                    if not isinstance(item, dict) or not isinstance(item.get("object"), dict):
                        raise StoreUnavailable(f"unexpected watch line: {line[:120]!r}")
                    event = WatchEvent(str(item.get("type", "")), item["object"])
                    if event.type == "ERROR":
                        code = event.object.get("code")
                        message = event.object.get("message", "")
                        if code == 410:
                            raise WatchCompacted(f"watch expired (410: {message})")
                        raise StoreUnavailable(f"watch error {code}: {message}")
                    yield event
        except httpx.HTTPError as exc:
            raise self._fail("watch nodes", exc) from exc

    async def patch_node_status(self, name: str, body: bytes) -> dict[str, Any]:
        """Strategic-merge ``PATCH nodes/<name>/status`` (annotations and conditions)."""
        result: dict[str, Any] = await self._request(
            "PATCH",
            f"/api/v1/nodes/{quote(name, safe='')}/status",
            verb="patch",
            resource="nodes/status",
            name=name,
            content=body,
            headers={"Content-Type": STRATEGIC_MERGE},
        )
        return result
