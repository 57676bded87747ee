"""The REST handlers of ``/api/v1``: get, list, watch, create, update, patch, delete.

Request attributes (verb, resource, subresource, namespace, name) are worked out first
so authorization sees what RBAC would; then the handler runs against the store with the
real registry rules. Every error leaves as a ``Status`` object.

Semantics kept from kube-apiserver (see the package docstring for the whole list):

* list ``resourceVersion``: unset = current state, paginated with ``limit``/``continue``
  (the continue token pins the list's version; ``410`` once it is compacted); ``0`` =
  current state, ``limit`` ignored (the watch cache); ``N`` with ``limit`` or
  ``resourceVersionMatch=Exact`` = the state *at* ``N``; ``N`` newer than the store waits
  3 s, then ``504`` "Too large resource version".
* watch ``resourceVersion``: unset or ``0`` = synthetic ``ADDED`` for the current state,
  then live; ``N`` = every event after ``N``, then live; ``N`` compacted = HTTP 200 and
  one ``ERROR`` event with a ``410 Expired`` Status (the watch cache's answer);
  ``sendInitialEvents=true`` ends the initial state with a bookmark annotated
  ``k8s.io/initial-events-end``. An object that stops (starts) matching a selector is
  sent as ``DELETED`` (``ADDED``). Bookmarks every ``bookmark_interval`` seconds and just
  before ``timeoutSeconds`` ends the stream.
* Pods are deleted at once (there is no kubelet to finish a graceful deletion).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from loden.kubeapi import patch as patching
from loden.kubeapi.auth import Attributes, Authenticator, Authorizer, User
from loden.kubeapi.http import Request, Response, StreamResponse
from loden.kubeapi.resources import (
    KINDS,
    Kind,
    check_metadata,
    new_metadata,
    require_valid,
)
from loden.kubeapi.selectors import (
    fields_match,
    labels_match,
    parse_field_selector,
    parse_label_selector,
)
from loden.kubeapi.status import (
    ApiError,
    already_exists,
    bad_request,
    conflict,
    expired,
    method_not_allowed,
    not_found,
    not_found_path,
    timeout,
)
from loden.kubeapi.store import Event, Key, Store

JsonObject = dict[str, Any]

PATCH_TYPES = {
    "application/json-patch+json": "json",
    "application/merge-patch+json": "merge",
    "application/strategic-merge-patch+json": "strategic",
}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def json_response(status: int, obj: Any) -> Response:
    return Response(status, dumps(obj) + b"\n")


@dataclass(slots=True)
class Target:
    """What a request under /api/v1 addresses."""

    kind: Kind
    namespace: str
    name: str
    subresource: str
    watch_path: bool  # the legacy /api/v1/watch/... form

    def key(self, name: str | None = None) -> Key:
        return (
            self.kind.resource,
            self.namespace if self.kind.namespaced else "",
            name or self.name,
        )


def parse_target(path: str) -> Target:
    """:raises ApiError: 404 for a path that names no served resource."""
    parts = [p for p in path.split("/") if p][2:]  # drop "api", "v1"
    watch = bool(parts) and parts[0] == "watch"
    if watch:
        parts = parts[1:]
    namespace = ""
    if len(parts) >= 3 and parts[0] == "namespaces" and parts[2] not in ("status", "finalize"):
        namespace, parts = parts[1], parts[2:]
    if not parts or parts[0] not in KINDS or len(parts) > 3:
        raise not_found_path()
    kind = KINDS[parts[0]]
    name = parts[1] if len(parts) > 1 else ""
    sub = parts[2] if len(parts) > 2 else ""
    if sub not in ("", "status") or (namespace and not kind.namespaced):
        raise not_found_path()
    return Target(kind, namespace, name, sub, watch)


def verb_of(request: Request, target: Target) -> str:
    method = request.method
    if method == "GET":
        if target.watch_path or request.arg("watch") in ("true", "1"):
            return "watch"
        return "get" if target.name else "list"
    verbs = {"POST": "create", "PUT": "update", "PATCH": "patch"}
    if method in verbs:
        return verbs[method]
    if method == "DELETE":
        return "delete" if target.name else "deletecollection"
    raise method_not_allowed()


def wants_table(request: Request) -> bool:
    return "as=Table" in request.headers.get("accept", "")


@dataclass
class ApiSettings:
    bookmark_interval: float = 60.0
    version: JsonObject = field(
        default_factory=lambda: {
            "major": "1",
            "minor": "32",
            "gitVersion": "v1.32.0",
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2024-12-11T17:59:15Z",
            "goVersion": "go1.23.3",
            "compiler": "gc",
            "platform": "linux/amd64",
        }
    )


class Api:
    """The /api/v1 resource handlers over one :class:`Store`."""

    def __init__(
        self,
        store: Store,
        authenticator: Authenticator,
        authorizer: Authorizer,
        settings: ApiSettings | None = None,
    ) -> None:
        self.store = store
        self.authn = authenticator
        self.authz = authorizer
        self.settings = settings or ApiSettings()

    # ------------------------------------------------------------ entry

    def authenticate(self, request: Request) -> User:
        return self.authn.authenticate(request.headers.get("authorization"), request.peer_cert)

    async def handle(self, request: Request, user: User) -> Response | StreamResponse:
        target = parse_target(request.path)
        verb = verb_of(request, target)
        attrs = Attributes(
            user=user,
            verb=verb,
            path=request.path,
            resource=target.kind.resource,
            subresource=target.subresource,
            namespace=target.namespace if target.kind.namespaced else "",
            name=target.name,
        )
        self.authz.authorize(attrs)
        if target.subresource and verb not in ("get", "update", "patch"):
            raise method_not_allowed()
        if verb == "get":
            return self.get(request, target)
        if verb == "list":
            return await self.list(request, target)
        if verb == "watch":
            return await self.watch(request, target)
        if verb == "create":
            return self.create(request, target)
        if verb == "update":
            return self.update(request, target)
        if verb == "patch":
            return self.patch(request, target)
        if verb == "delete":
            return self.delete(request, target)
        return self.delete_collection(request, target)

    # ------------------------------------------------------------ presentation

    def external(self, kind: Kind, obj: JsonObject) -> JsonObject:
        """An object as a response carries it (kind and apiVersion first)."""
        return {
            "kind": kind.kind,
            "apiVersion": "v1",
            **{k: v for k, v in obj.items() if k not in ("kind", "apiVersion")},
        }

    def table(
        self, request: Request, kind: Kind, objects: list[JsonObject], list_meta: JsonObject | None
    ) -> JsonObject:
        include = request.arg("includeObject", "Metadata")
        rows = []
        for obj in objects:
            row: JsonObject = {"cells": kind.cells(obj)}
            if include == "Object":
                row["object"] = self.external(kind, obj)
            elif include != "None":
                row["object"] = {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                }
            rows.append(row)
        return {
            "kind": "Table",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": list_meta or {"resourceVersion": str(self.store.rv)},
            "columnDefinitions": kind.columns(),
            "rows": rows,
        }

    # ------------------------------------------------------------ reads

    def _existing(self, target: Target) -> JsonObject:
        obj = self.store.get(target.key())
        if obj is None:
            raise not_found(target.kind.resource, target.name)
        return obj

    def get(self, request: Request, target: Target) -> Response:
        obj = self._existing(target)
        if wants_table(request):
            return json_response(200, self.table(request, target.kind, [obj], None))
        return json_response(200, self.external(target.kind, obj))

    def _selectors(self, request: Request, target: Target) -> tuple[list[Any], list[Any]]:
        fields = parse_field_selector(
            request.arg("fieldSelector"),
            target.kind.field_selectors | {"metadata.name", "metadata.namespace"},
        )
        labels = parse_label_selector(request.arg("labelSelector"))
        if target.name:  # /api/v1/watch/nodes/<name>
            fields.append(
                parse_field_selector(f"metadata.name={target.name}", {"metadata.name"})[0]
            )
        return fields, labels

    @staticmethod
    def _matches(obj: JsonObject, fields: list[Any], labels: list[Any]) -> bool:
        return fields_match(fields, obj) and labels_match(labels, obj)

    async def _wait_for_version(self, rv: int) -> None:
        deadline = time.monotonic() + 3.0
        while self.store.rv < rv:
            if time.monotonic() > deadline:
                raise too_large(rv, self.store.rv)
            await asyncio.sleep(0.05)

    async def list(self, request: Request, target: Target) -> Response:
        kind = target.kind
        namespace = target.namespace if kind.namespaced and target.namespace else None
        fields, labels = self._selectors(request, target)
        rv_arg, match = request.arg("resourceVersion"), request.arg("resourceVersionMatch")
        limit = int(request.arg("limit") or 0) if request.arg("limit").isdigit() else 0
        token = request.arg("continue")
        start: tuple[str, str] | None = None
        if token:
            if rv_arg:
                raise bad_request("specifying resource version is not allowed when using continue")
            at, start = decode_continue(token)
            try:
                objects = self.store.items_at(kind.resource, at, namespace)
            except ApiError as exc:
                raise expired(
                    "The provided continue parameter is too old to display a consistent list "
                    "result. You can start a new list without the continue parameter."
                ) from exc
            list_rv = at
        elif rv_arg and rv_arg != "0" and (match == "Exact" or (limit and not match)):
            at = parse_rv(rv_arg)
            await self._wait_for_version(at)
            try:
                objects = self.store.items_at(kind.resource, at, namespace)
            except ApiError as exc:
                raise expired(
                    f"The resourceVersion for the provided list is too old. ({exc.message})"
                ) from exc
            list_rv = at
        else:
            if rv_arg and rv_arg != "0":
                await self._wait_for_version(parse_rv(rv_arg))
            if rv_arg == "0":
                limit = 0
            objects = self.store.items(kind.resource, namespace)
            list_rv = self.store.rv
        objects = [o for o in objects if self._matches(o, fields, labels)]
        if start is not None:
            objects = [o for o in objects if _sort_key(o) >= start]
        meta: JsonObject = {"resourceVersion": str(list_rv)}
        if limit and len(objects) > limit:
            rest = objects[limit:]
            objects = objects[:limit]
            meta["continue"] = encode_continue(list_rv, _sort_key(rest[0]))
            meta["remainingItemCount"] = len(rest)
        if wants_table(request):
            return json_response(200, self.table(request, kind, objects, meta))
        items = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in objects]
        return json_response(
            200,
            {"kind": f"{kind.kind}List", "apiVersion": "v1", "metadata": meta, "items": items},
        )

    # ------------------------------------------------------------ watch

    async def watch(self, request: Request, target: Target) -> StreamResponse:
        kind = target.kind
        namespace = target.namespace if kind.namespaced and target.namespace else None
        fields, labels = self._selectors(request, target)
        rv_arg = request.arg("resourceVersion")
        initial_events = request.arg("sendInitialEvents") == "true"
        bookmarks = request.arg("allowWatchBookmarks") == "true"
        if initial_events and request.arg("resourceVersionMatch") != "NotOlderThan":
            raise ApiError(
                422,
                "Invalid",
                'ListOptions.meta.k8s.io "" is invalid: resourceVersionMatch: Forbidden: '
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            )
        timeout_arg = request.arg("timeoutSeconds")
        duration = float(timeout_arg) if timeout_arg.isdigit() else random.uniform(1800, 3600)
        table = wants_table(request)

        def visible(obj: JsonObject | None) -> bool:
            if obj is None:
                return False
            if namespace is not None and obj["metadata"].get("namespace") != namespace:
                return False
            return self._matches(obj, fields, labels)

        start = 0 if initial_events or rv_arg in ("", "0") else parse_rv(rv_arg)  # 400 first
        watcher = self.store.subscribe(kind.resource)
        # Subscribed first, then the snapshot: nothing falls between the two.
        snapshot_rv = self.store.rv
        initial: list[JsonObject] = []
        replay: list[Event] = []
        error: ApiError | None = None
        if initial_events or rv_arg in ("", "0"):
            initial = [o for o in self.store.items(kind.resource, namespace) if visible(o)]
        else:
            try:
                if start > self.store.rv:
                    await self._wait_for_version(start)
                    snapshot_rv = self.store.rv
                replay = list(self.store.events_since(start))
                snapshot_rv = max(snapshot_rv, replay[-1].rv if replay else start)
                replay = [e for e in replay if e.rv <= snapshot_rv]
            except ApiError as exc:
                error = exc

        def encode(kind_of_event: str, obj: JsonObject) -> bytes:
            body = self.external(kind, obj)
            if table and kind_of_event not in ("ERROR", "BOOKMARK"):
                body = self.table(
                    request,
                    kind,
                    [obj],
                    {"resourceVersion": obj["metadata"].get("resourceVersion", "")},
                )
            return dumps({"type": kind_of_event, "object": body}) + b"\n"

        def convert(event: Event) -> bytes | None:
            now, before = visible(event.obj), visible(event.prev)
            if event.type == "DELETED":
                return encode("DELETED", event.obj) if before else None
            if now and (before or event.type == "ADDED"):
                return encode("ADDED" if event.type == "ADDED" else "MODIFIED", event.obj)
            if now:
                return encode("ADDED", event.obj)
            if before and event.prev is not None:
                gone = copy.deepcopy(event.prev)
                gone["metadata"]["resourceVersion"] = str(event.rv)
                return encode("DELETED", gone)
            return None

        def bookmark(rv: int, end_of_initial: bool = False) -> bytes:
            meta: JsonObject = {"resourceVersion": str(rv), "creationTimestamp": None}
            if end_of_initial:
                meta["annotations"] = {"k8s.io/initial-events-end": "true"}
            return (
                dumps(
                    {
                        "type": "BOOKMARK",
                        "object": {"kind": kind.kind, "apiVersion": "v1", "metadata": meta},
                    }
                )
                + b"\n"
            )

        store = self.store
        interval = self.settings.bookmark_interval

        async def stream() -> AsyncIterator[bytes]:
            try:
                if error is not None:
                    yield dumps({"type": "ERROR", "object": error.status()}) + b"\n"
                    return
                last_rv = snapshot_rv
                for obj in initial:
                    yield encode("ADDED", obj)
                if initial_events and bookmarks:
                    yield bookmark(snapshot_rv, end_of_initial=True)
                for event in replay:
                    chunk = convert(event)
                    if chunk:
                        yield chunk
                deadline = time.monotonic() + duration

                def next_bookmark_at() -> float:
                    # periodic, and one just before the deadline, as the watch cache does
                    now = time.monotonic()
                    return max(now, min(now + interval, deadline - 1.0))

                next_bookmark = next_bookmark_at()
                while True:
                    now = time.monotonic()
                    if now >= deadline:
                        return
                    wake = min(deadline, next_bookmark) if bookmarks else deadline
                    try:
                        async with asyncio.timeout(max(0.0, wake - now)):
                            item = await watcher.queue.get()
                    except TimeoutError:
                        if bookmarks and time.monotonic() >= next_bookmark:
                            if watcher.queue.empty():  # caught up: the store's version is ours
                                last_rv = max(last_rv, store.rv)
                            yield bookmark(last_rv)
                            next_bookmark = (
                                next_bookmark_at() if next_bookmark < deadline - 1.0 else deadline
                            )
                        continue
                    if item is None:
                        return
                    if item.rv <= last_rv:
                        continue
                    last_rv = item.rv
                    chunk = convert(item)
                    if chunk:
                        yield chunk
            finally:
                store.unsubscribe(watcher)

        return StreamResponse(200, stream(), on_close=lambda: store.unsubscribe(watcher))

    # ------------------------------------------------------------ writes

    def _body(self, request: Request) -> JsonObject:
        try:
            body = json.loads(request.body)
        except ValueError as exc:
            raise bad_request(f"couldn't get version/kind; json parse error: {exc}") from exc
        if not isinstance(body, dict):
            raise bad_request("couldn't get version/kind; json parse error: not an object")
        return body

    def _check_type(self, kind: Kind, body: JsonObject) -> None:
        api_version, got = body.get("apiVersion", "v1"), body.get("kind", kind.kind)
        if api_version != "v1":
            raise bad_request(
                f"the API version in the data ({api_version}) does not match the expected API "
                "version (v1)"
            )
        if got != kind.kind:
            raise bad_request(
                f"the kind in the data ({got}) does not match the expected kind ({kind.kind})"
            )
        body["apiVersion"], body["kind"] = "v1", kind.kind

    def _dry_run(self, request: Request) -> bool:
        values = request.query.get("dryRun", [])
        for value in values:
            if value != "All":
                raise bad_request(f'dryRun: Unsupported value: "{value}": supported values: "All"')
        return bool(values)

    def create(self, request: Request, target: Target) -> Response:
        if target.name:
            raise method_not_allowed()
        body = self._body(request)
        dry_run = self._dry_run(request)
        stored = self.create_object(target.kind, target.namespace, body, dry_run=dry_run)
        return json_response(201, stored if dry_run else self.external(target.kind, stored))

    def create_object(
        self, kind: Kind, namespace: str, body: JsonObject, *, dry_run: bool = False
    ) -> JsonObject:
        """A POST's work: type check, metadata, defaults, validation, then the write.

        :raises ApiError: 400, 404 (namespace), 409 AlreadyExists, 422.
        """
        self._check_type(kind, body)
        meta = body.setdefault("metadata", {})
        check_metadata(body)
        if kind.namespaced:
            given = meta.get("namespace")
            if given and given != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on "
                    "the request"
                )
            if not namespace:
                raise not_found_path()
            if self.store.get(("namespaces", "", namespace)) is None:
                raise not_found("namespaces", namespace)
        new_metadata(kind, body, namespace)
        kind.prepare_create(body)
        kind.normalize(body)
        require_valid(kind, body, None)
        key = (kind.resource, namespace if kind.namespaced else "", body["metadata"]["name"])
        if key in self.store.objects:
            raise already_exists(kind.resource, key[2])
        if dry_run:
            return body
        self.store.commit(key, body)
        stored = self.store.get(key)
        assert stored is not None
        return stored

    def _write(
        self, request: Request, target: Target, new: JsonObject, old: JsonObject
    ) -> Response:
        kind = target.kind
        self._check_type(kind, new)
        meta = new.setdefault("metadata", {})
        check_metadata(new)
        if meta.get("name", target.name) != target.name:
            raise bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL "
                f"({target.name})"
            )
        given_rv = meta.get("resourceVersion")
        if given_rv and given_rv != old["metadata"]["resourceVersion"]:
            raise conflict(kind.resource, target.name)
        if meta.get("uid") and meta["uid"] != old["metadata"]["uid"]:
            raise conflict(
                kind.resource,
                target.name,
                f"Precondition failed: UID in precondition: {meta['uid']}, UID in object meta: "
                f"{old['metadata']['uid']}",
            )
        for fixed in ("name", "uid", "creationTimestamp", "namespace"):
            if fixed in old["metadata"]:
                meta[fixed] = old["metadata"][fixed]
            else:
                meta.pop(fixed, None)
        kind.prepare_update(new, old, target.subresource)
        kind.normalize(new)
        require_valid(kind, new, old)
        if self._dry_run(request):
            return json_response(200, new)
        self.store.commit(target.key(), new)
        stored = self.store.get(target.key())
        assert stored is not None
        return json_response(200, self.external(kind, stored))

    def update(self, request: Request, target: Target) -> Response:
        if not target.name:
            raise method_not_allowed()
        body = self._body(request)
        old = self._existing(target)
        return self._write(request, target, body, old)

    def patch(self, request: Request, target: Target) -> Response:
        if not target.name:
            raise method_not_allowed()
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        flavour = PATCH_TYPES.get(content_type)
        if flavour is None:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types include: "
                f"{', '.join(PATCH_TYPES)}",
            )
        old = self._existing(target)
        document = self.external(target.kind, old)
        patch_body = patching.parse_body(request.body)
        if flavour == "merge":
            if not isinstance(patch_body, dict):
                raise bad_request("error decoding patch: the patch is not a JSON object")
            new = patching.merge_patch(document, patch_body)
        elif flavour == "strategic":
            new = patching.strategic_merge_patch(document, patch_body, target.kind.merge_keys)
        else:
            new = patching.json_patch(document, patch_body)
        return self._write(request, target, new, old)

    def _delete_one(self, kind: Kind, key: Key) -> JsonObject | None:
        obj = self.store.get(key)
        if obj is None:
            return None
        if kind.resource == "namespaces":
            for pod in self.store.items("pods", key[2]):
                self.store.commit(("pods", key[2], pod["metadata"]["name"]), None)
        event = self.store.commit(key, None)
        return event.obj if event else obj

    def delete(self, request: Request, target: Target) -> Response:
        kind = target.kind
        old = self._existing(target)
        if request.body:
            options = self._body(request)
            pre = options.get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != old["metadata"]["uid"]:
                raise conflict(
                    kind.resource,
                    target.name,
                    f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: "
                    f"{old['metadata']['uid']}",
                )
            if (
                pre.get("resourceVersion")
                and pre["resourceVersion"] != old["metadata"]["resourceVersion"]
            ):
                raise conflict(
                    kind.resource,
                    target.name,
                    "Precondition failed: ResourceVersion in precondition: "
                    f"{pre['resourceVersion']}, "
                    f"ResourceVersion in object meta: {old['metadata']['resourceVersion']}",
                )
        if self._dry_run(request):
            return json_response(200, self.external(kind, old))
        gone = self._delete_one(kind, target.key()) or old
        if kind.resource == "nodes":
            return json_response(
                200,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {
                        "name": target.name,
                        "kind": kind.resource,
                        "uid": old["metadata"]["uid"],
                    },
                },
            )
        return json_response(200, self.external(kind, gone))

    def delete_collection(self, request: Request, target: Target) -> Response:
        kind = target.kind
        namespace = target.namespace if kind.namespaced and target.namespace else None
        fields, labels = self._selectors(request, target)
        victims = [
            o
            for o in self.store.items(kind.resource, namespace)
            if self._matches(o, fields, labels)
        ]
        deleted = []
        if not self._dry_run(request):
            for obj in victims:
                meta = obj["metadata"]
                gone = self._delete_one(
                    kind, (kind.resource, meta.get("namespace", ""), meta["name"])
                )
                if gone is not None:
                    gone.pop("kind", None)
                    gone.pop("apiVersion", None)
                    deleted.append(gone)
        return json_response(
            200,
            {
                "kind": f"{kind.kind}List",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(self.store.rv)},
                "items": deleted,
            },
        )


# ------------------------------------------------------------------------------ helpers


def _sort_key(obj: JsonObject) -> tuple[str, str]:
    """The store's order: (namespace, name), as the keys of a list are sorted."""
    meta = obj["metadata"]
    return str(meta.get("namespace", "")), str(meta["name"])


def parse_rv(text: str) -> int:
    """:raises ApiError: 400 for a resourceVersion that is not a number."""
    try:
        value = int(text)
    except ValueError as exc:
        raise bad_request(
            f'resourceVersion: Invalid value: "{text}": strconv.ParseUint: parsing "{text}": '
            "invalid syntax"
        ) from exc
    if value < 0:
        raise bad_request(f'resourceVersion: Invalid value: "{text}"')
    return value


def encode_continue(rv: int, start: tuple[str, str]) -> str:
    raw = dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": list(start)})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_continue(token: str) -> tuple[int, tuple[str, str]]:
    """:raises ApiError: 400 for a token this server did not make."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        namespace, name = data["start"]
        return int(data["rv"]), (str(namespace), str(name))
    except (ValueError, KeyError, TypeError) as exc:
        raise bad_request(f"continue key is not valid: {exc}") from exc


def too_large(wanted: int, current: int) -> ApiError:
    error = timeout(f"Too large resource version: {wanted}, current: {current}")
    assert error.details is not None
    error.details["causes"] = [
        {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}
    ]
    return error
