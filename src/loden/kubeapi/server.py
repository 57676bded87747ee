"""The server: TLS, routing, discovery, the request log and the ``/_loden/`` control endpoints.

Control endpoints (``system:masters`` only; a real server has none of them, and no
client ever asks for them) let a test or the lab act on the server from outside its
process, since it usually runs inside a network namespace:

* ``GET /_loden/state`` - current version, compacted version, watch count;
* ``POST /_loden/compact`` ``{"resourceVersion": N}`` (default: now) - later watches and
  exact reads from before ``N`` get ``410``;
* ``POST /_loden/cut-watches`` ``{"abort": true|false}`` - every watch stream ends (a
  clean end of the chunked body, or a torn connection);
* ``POST /_loden/down`` ``{"seconds": S, "restart": false}`` - stop listening and drop
  every connection for ``S`` seconds, then serve again with the same objects and versions
  (they go on from where they were, as etcd keeps them). ``restart``: the server comes
  back with a new watch cache, as a restarted kube-apiserver does: it starts at the
  current version, so a watch from an older version gets ``410``;
* ``PUT /_loden/rules`` ``{"subject": "user:NAME"|"group:NAME", "rules": [PolicyRule]}``;
* ``PUT /_loden/tokens`` ``{"token": T, "user": NAME, "groups": [...]}`` and
  ``DELETE /_loden/tokens?token=T``;
* ``PUT /_loden/settings`` ``{"bookmarkInterval": S}``;
* ``POST /_loden/bulk`` ``{"resource": R, "namespace": NS, "items": [obj, ...]}`` - create
  many objects in one request, each exactly as a POST would (benchmarks with thousands
  of nodes); answers the resulting resourceVersion;
* ``GET /_loden/requests?since=N`` - the request log (method, path, query, content type,
  user, status, body of writes), so tests can check what a client sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loden.kubeapi import persist
from loden.kubeapi.api import Api, ApiSettings, json_response
from loden.kubeapi.auth import ADMIN_GROUP, Attributes, Authenticator, Authorizer, User
from loden.kubeapi.http import HttpServer, Request, Response, StreamResponse
from loden.kubeapi.resources import INITIAL_NAMESPACES, KINDS, new_metadata
from loden.kubeapi.status import ApiError, bad_request, forbidden, not_found_path
from loden.kubeapi.store import Store

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]


@dataclass
class TlsConfig:
    cert: Path
    key: Path
    client_ca: Path | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.cert), str(self.key))
        if self.client_ca is not None:
            context.load_verify_locations(cafile=str(self.client_ca))
            context.verify_mode = ssl.CERT_OPTIONAL
        context.set_alpn_protocols(["http/1.1"])
        return context


@dataclass
class LoggedRequest:
    seq: int
    time: float
    method: str
    path: str
    query: str
    content_type: str
    accept: str
    user: str
    status: int = 0
    body: str = ""

    def as_json(self) -> JsonObject:
        return {
            "seq": self.seq,
            "time": self.time,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "contentType": self.content_type,
            "accept": self.accept,
            "user": self.user,
            "status": self.status,
            "body": self.body,
        }


@dataclass
class KubeApiServer:
    """One API server double. ``await start()``; ``await stop()``."""

    host: str = "127.0.0.1"
    port: int = 0
    tls: TlsConfig | None = None
    authenticator: Authenticator = field(default_factory=Authenticator)
    authorizer: Authorizer = field(default_factory=Authorizer)
    settings: ApiSettings = field(default_factory=ApiSettings)
    store: Store = field(default_factory=Store)
    log_limit: int = 20_000
    state_file: Path | None = None

    def __post_init__(self) -> None:
        self.api = Api(self.store, self.authenticator, self.authorizer, self.settings)
        self.http = HttpServer(
            self.handle, self.host, self.port, self.tls.context() if self.tls else None
        )
        self.requests: deque[LoggedRequest] = deque(maxlen=self.log_limit)
        self._seq = 0
        self._down_task: asyncio.Task[None] | None = None
        self.insecure_user: User | None = None  # plain-http "insecure port": everyone is admin
        self.saver: persist.Saver | None = None
        if self.state_file is not None and persist.load(self.store, self.state_file):
            log.info(
                "state from %s: %d objects, resourceVersion %d",
                self.state_file,
                len(self.store.objects),
                self.store.rv,
            )
        else:
            for name in INITIAL_NAMESPACES:
                self.create_object("namespaces", {"metadata": {"name": name}})

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.state_file is not None:
            self.saver = persist.Saver(self.store, self.state_file)
            self.store.on_commit = self.saver.schedule
            self.saver.flush()
        await self.http.start()
        self.port = self.http.port

    async def stop(self) -> None:
        if self._down_task is not None:
            self._down_task.cancel()
        await self.http.stop_listening()
        self.store.close_watchers()
        self.http.abort_all()
        if self.saver is not None:
            self.saver.flush()

    async def go_down(self, seconds: float, *, restart: bool = False) -> None:
        """Refuse connections for ``seconds``, then serve again with the same objects
        (``restart``: and an empty event history, the new watch cache)."""
        await self.http.stop_listening()
        self.store.close_watchers()
        self.http.abort_all()
        await asyncio.sleep(seconds)
        if restart:
            self.store.compact()
        for _ in range(100):
            try:
                await self.http.start()
                return
            except OSError:  # the old socket may linger a moment
                await asyncio.sleep(0.1)
        log.error("could not listen again on %s:%s", self.host, self.port)

    # ------------------------------------------------------------ direct access (tests, control)

    def create_object(self, resource: str, obj: JsonObject, namespace: str = "") -> JsonObject:
        """Create without HTTP (bootstrap); the same defaults as a POST."""
        kind = KINDS[resource]
        body = json.loads(json.dumps(obj))
        body.setdefault("apiVersion", "v1")
        body.setdefault("kind", kind.kind)
        body.setdefault("metadata", {})
        new_metadata(kind, body, namespace)
        kind.prepare_create(body)
        kind.normalize(body)
        key = (resource, namespace if kind.namespaced else "", body["metadata"]["name"])
        self.store.commit(key, body)
        stored = self.store.get(key)
        assert stored is not None
        return stored

    # ------------------------------------------------------------ routing

    async def handle(self, request: Request) -> Response | StreamResponse:
        self._seq += 1
        entry = LoggedRequest(
            self._seq,
            time.time(),
            request.method,
            request.path,
            request.raw_query,
            request.headers.get("content-type", ""),
            request.headers.get("accept", ""),
            "",
            body=request.body[:65536].decode("utf-8", "replace")
            if request.method in ("POST", "PUT", "PATCH")
            else "",
        )
        self.requests.append(entry)
        try:
            user = self.insecure_user or self.api.authenticate(request)
            entry.user = user.name
            response = await self._route(request, user)
        except ApiError as exc:
            response = json_response(exc.code, exc.status())
        entry.status = response.status
        if response.status >= 400:  # what a failing test or lab wants to see in the log
            log.info(
                "%s %s %s?%s user=%s",
                response.status,
                request.method,
                request.path,
                entry.query,
                entry.user,
            )
        return response

    async def _route(self, request: Request, user: User) -> Response | StreamResponse:
        path = request.path.rstrip("/") or "/"
        if path.startswith("/api/v1/"):
            return await self.api.handle(request, user)
        if path.startswith("/_loden/"):
            if not user.in_group(ADMIN_GROUP):
                raise forbidden(
                    "", "", f'User "{user.name}" cannot {request.method.lower()} path "{path}"'
                )
            try:
                return await self.control(request, path)
            except (ValueError, TypeError, KeyError) as exc:  # a malformed control body
                raise bad_request(f"{path}: {exc!r}") from exc
        verb = {
            "GET": "get",
            "HEAD": "head",
            "POST": "post",
            "PUT": "put",
            "PATCH": "patch",
            "DELETE": "delete",
        }.get(request.method, request.method.lower())
        self.authorizer.authorize(Attributes(user=user, verb=verb, path=path))
        if request.method != "GET":
            raise ApiError(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        if path in ("/healthz", "/livez", "/readyz"):
            return Response(200, b"ok", content_type="text/plain; charset=utf-8")
        if path == "/version":
            return json_response(200, self.settings.version)
        if path == "/api":
            address = f"{self.host}:{self.port}"
            return json_response(
                200,
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": address}
                    ],
                },
            )
        if path == "/api/v1":
            resources = [entry for kind in KINDS.values() for entry in kind.discovery()]
            return json_response(
                200, {"kind": "APIResourceList", "groupVersion": "v1", "resources": resources}
            )
        if path == "/apis":
            return json_response(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
        raise not_found_path()

    # ------------------------------------------------------------ control

    async def control(self, request: Request, path: str) -> Response:
        body: JsonObject = {}
        if request.body:
            try:
                body = json.loads(request.body)
            except ValueError as exc:
                raise bad_request(f"control body is not JSON: {exc}") from exc
        action = path.removeprefix("/_loden/")
        if action == "state" and request.method == "GET":
            return json_response(200, self.state())
        if action == "compact" and request.method == "POST":
            rv = body.get("resourceVersion")
            compacted = self.store.compact(int(rv) if rv is not None else None)
            return json_response(200, {"compacted": compacted, "resourceVersion": self.store.rv})
        if action == "cut-watches" and request.method == "POST":
            if body.get("abort"):
                count = self.http.abort_all(streams_only=True)
            else:
                count = self.store.close_watchers()
            return json_response(200, {"cut": count})
        if action == "down" and request.method == "POST":
            seconds = float(body.get("seconds", 1.0))
            restart = bool(body.get("restart", False))
            self._down_task = asyncio.create_task(self._later_down(seconds, restart))
            return json_response(200, {"down": seconds})
        if action == "rules" and request.method == "PUT":
            try:
                self.authorizer.set_rules(str(body.get("subject", "")), list(body.get("rules", [])))
            except ValueError as exc:
                raise bad_request(str(exc)) from exc
            return json_response(200, {"subject": body["subject"]})
        if action == "tokens" and request.method == "PUT":
            token = str(body.get("token", ""))
            if not token or not body.get("user"):
                raise bad_request("a token and a user are required")
            groups = tuple(body.get("groups") or ()) + ("system:authenticated",)
            self.authenticator.tokens[token] = User(str(body["user"]), groups)
            return json_response(200, {"user": body["user"]})
        if action == "tokens" and request.method == "DELETE":
            self.authenticator.tokens.pop(request.arg("token"), None)
            return json_response(200, {})
        if action == "settings" and request.method == "PUT":
            if "bookmarkInterval" in body:
                self.settings.bookmark_interval = float(body["bookmarkInterval"])
            return json_response(200, {"bookmarkInterval": self.settings.bookmark_interval})
        if action == "bulk" and request.method == "POST":
            kind = KINDS.get(str(body.get("resource", "")))
            if kind is None:
                raise bad_request(f"bulk: unknown resource {body.get('resource')!r}")
            namespace = str(body.get("namespace", ""))
            for item in body.get("items", []):
                self.api.create_object(kind, namespace, item)
            return json_response(200, {"resourceVersion": self.store.rv})
        if action == "requests" and request.method == "GET":
            since = int(request.arg("since") or 0)
            return json_response(
                200, {"items": [r.as_json() for r in self.requests if r.seq > since]}
            )
        raise not_found_path()

    async def _later_down(self, seconds: float, restart: bool) -> None:
        await asyncio.sleep(0.05)  # let the control response leave first
        await self.go_down(seconds, restart=restart)

    def state(self) -> JsonObject:
        return {
            "resourceVersion": self.store.rv,
            "compacted": self.store.compacted,
            "watchers": len(self.store.watchers),
            "objects": len(self.store.objects),
            "listening": self.http.listening,
        }


__all__ = ["KubeApiServer", "LoggedRequest", "TlsConfig"]
