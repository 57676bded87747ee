"""Emulated clouds for the aws-vpc and gce backends (tests and ``loden lab``).

* :class:`AwsFront`: the endpoint agents use for EC2 and its instance metadata. It
  serves IMDS (IMDSv2 token and v1), answering each caller with the instance registered
  for its source address as the real IMDS answers each instance with itself, and
  forwards the EC2 API to moto (server mode), recording every call (the emulator's
  call log) and failing chosen ones on purpose (500s, throttling, a denied permission).
  :func:`patch_moto_route_state` adds AWS's ``blackhole`` route state moto lacks.
* :class:`GceDouble`: no usable GCE emulator exists (cloud-backends spec §4.2), so this
  serves the metadata server and the Compute endpoints the backend uses, behaving as the
  real API does: networks/instances get, routes get/list/insert/delete (409
  ``alreadyExists``, 404 ``notFound``), global operations going PENDING -> RUNNING ->
  DONE one step per poll and applying their change at DONE; faults: an HTTP error per
  call kind, operations that never finish or fail.

Both listen on a socket that may be created inside a network namespace (agents in
namespaces reach it) while serving from this process's threads.
"""

from __future__ import annotations

import json
import secrets
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from loden.kernel.netns import call_in_netns

REGION = "us-east-1"
ZONE = "us-east-1a"
GCE_PROJECT = "loden-test"
GCE_ZONE = "us-central1-a"
GCE_NETWORK = "default"


def patch_moto_route_state() -> Any:
    """Give moto's routes AWS's blackhole state; returns the original property."""
    from moto.ec2.models.route_tables import Route

    original = Route.state
    setattr(Route, "state", property(route_state))  # noqa: B010  # mypy: a property
    return original


def route_state(self: Any) -> str:
    """moto's Route.state, with AWS's blackhole for a vanished target."""
    eni = self.interface
    backend = self.route_table.ec2_backend
    if eni is not None:
        if eni.id not in backend.enis:
            return "blackhole"
        instance = getattr(eni, "instance", None)
        if instance is not None and getattr(instance, "state", "") == "terminated":
            return "blackhole"
    if self.instance is not None and getattr(self.instance, "state", "") == "terminated":
        return "blackhole"
    return "active"


@dataclass
class Fault:
    status: int
    code: str
    message: str
    #: How many calls to fail; None: until cleared.
    count: int | None = None


@dataclass
class Call:
    action: str
    params: dict[str, str]
    #: The caller's address (which node made the call).
    client: str = ""


@dataclass
class AwsFront:
    moto_url: str
    instances: dict[str, str] = field(default_factory=dict)  # source IP -> instance id
    default_instance: str | None = None
    imds_v2: bool = True
    calls: list[Call] = field(default_factory=list)
    faults: dict[str, Fault] = field(default_factory=dict)
    imds_requests: list[tuple[str, str, bool]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(
        self, action: str, status: int, code: str, message: str = "", count: int | None = None
    ) -> None:
        """Fail ``action`` (``*``: every action) with an AWS error."""
        with self.lock:
            self.faults[action] = Fault(status, code, message or f"injected {code}", count)

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def actions(self) -> list[str]:
        with self.lock:
            return [c.action for c in self.calls]

    def _fault(self, action: str) -> Fault | None:
        with self.lock:
            for key in (action, "*"):
                fault = self.faults.get(key)
                if fault is None:
                    continue
                if fault.count is not None:
                    fault.count -= 1
                    if fault.count <= 0:
                        del self.faults[key]
                return fault
        return None

    def handler(self) -> type[BaseHTTPRequestHandler]:
        front = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _imds(self, method: str) -> None:
                token_sent = bool(self.headers.get("X-aws-ec2-metadata-token"))
                front.imds_requests.append((method, self.path, token_sent))
                if self.path == "/latest/api/token" and method == "PUT":
                    if not front.imds_v2:
                        self._send(404, b"Not Found")
                    else:
                        self._send(200, b"token-" + secrets.token_hex(8).encode())
                    return
                if method != "GET":
                    self._send(405, b"")
                    return
                instance = front.instances.get(self.client_address[0], front.default_instance)
                values = {
                    "/latest/meta-data/instance-id": instance,
                    "/latest/meta-data/placement/availability-zone": ZONE,
                    "/latest/meta-data/placement/region": REGION,
                }
                value = values.get(self.path)
                if value is None:
                    self._send(404, b"Not Found")
                else:
                    self._send(200, value.encode())

            def _forward(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                params = dict(urllib.parse.parse_qsl(body.decode()))
                action = params.get("Action", "?")
                with front.lock:
                    front.calls.append(Call(action, params, self.client_address[0]))
                fault = front._fault(action)
                if fault is not None:
                    xml = (
                        "<?xml version='1.0' encoding='UTF-8'?><Response><Errors><Error>"
                        f"<Code>{fault.code}</Code><Message>{fault.message}</Message>"
                        "</Error></Errors><RequestID>injected</RequestID></Response>"
                    )
                    self._send(fault.status, xml.encode(), "text/xml")
                    return
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
                }
                req = urllib.request.Request(
                    front.moto_url + self.path, data=body or None, headers=headers, method=method
                )
                try:
                    with urllib.request.urlopen(req, timeout=30) as resp:
                        self._send(resp.status, resp.read(), resp.headers.get("Content-Type", ""))
                except urllib.error.HTTPError as exc:
                    self._send(exc.code, exc.read(), exc.headers.get("Content-Type", ""))

            def do_GET(self) -> None:
                if self.path.startswith("/latest/"):
                    self._imds("GET")
                else:
                    self._forward("GET")

            def do_PUT(self) -> None:
                if self.path.startswith("/latest/"):
                    self._imds("PUT")
                else:
                    self._forward("PUT")

            def do_POST(self) -> None:
                self._forward("POST")

        return Handler

    def start(self, host: str = "127.0.0.1", netns: str | None = None, port: int = 0) -> None:
        def bind() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
            return sock

        # The socket stays in the namespace it was made in; serving threads need not.
        sock = call_in_netns(netns, bind) if netns else bind()
        server = ThreadingHTTPServer((host, 0), self.handler(), bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        server.server_address = sock.getsockname()
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.server = server
        self.url = f"http://{host}:{sock.getsockname()[1]}"

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@dataclass
class GceDouble:
    project: str = GCE_PROJECT
    zone: str = GCE_ZONE
    network: str = GCE_NETWORK
    instances: dict[str, str] = field(default_factory=dict)  # source IP -> instance name
    default_instance: str = "node-0"
    routes: dict[str, dict[str, Any]] = field(default_factory=dict)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    #: The ``x-goog-api-client`` headers Compute requests came with (which client sent them).
    api_clients: set[str] = field(default_factory=set)
    #: "insert"/"delete"/"get"/"list"/"operation"/"*" -> HTTP status to answer with.
    faults: dict[str, int] = field(default_factory=dict)
    ops_never_finish: bool = False
    ops_fail: bool = False
    url: str = ""
    server: ThreadingHTTPServer | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base(self) -> str:
        return f"{self.url}/compute/v1/"

    def link(self, path: str) -> str:
        return f"{self.base}projects/{self.project}/{path}"

    def instance_link(self, name: str) -> str:
        return self.link(f"zones/{self.zone}/instances/{name}")

    def network_link(self) -> str:
        return self.link(f"global/networks/{self.network}")

    def mutations(self) -> list[str]:
        return [kind for kind, _ in self.calls if kind in ("insert", "delete")]

    def _error(self, code: int, reason: str, message: str) -> tuple[int, Any]:
        return code, {
            "error": {
                "code": code,
                "message": message,
                "errors": [{"domain": "global", "reason": reason, "message": message}],
            }
        }

    def _operation(self, kind: str, target: str, apply: Any) -> dict[str, Any]:
        name = f"operation-{len(self.operations) + 1}"
        op = {
            "kind": "compute#operation",
            "name": name,
            "operationType": kind,
            "targetLink": target,
            "status": "PENDING",
            "progress": 0,
            "selfLink": self.link(f"global/operations/{name}"),
            "_apply": apply,
        }
        self.operations[name] = op
        return {k: v for k, v in op.items() if not k.startswith("_")}

    def _advance(self, op: dict[str, Any]) -> None:
        if self.ops_never_finish or op["status"] == "DONE":
            return
        op["status"] = "RUNNING" if op["status"] == "PENDING" else "DONE"
        op["progress"] = 50 if op["status"] == "RUNNING" else 100
        if op["status"] == "DONE":
            if self.ops_fail:
                op["error"] = {"errors": [{"code": "INJECTED", "message": "injected failure"}]}
            else:
                op["_apply"]()

    def handle(self, method: str, path: str, body: Any, client: str) -> tuple[int, Any]:
        path = path.split("?", 1)[0]
        if path.startswith("/computeMetadata/v1/"):
            return self._metadata(path.removeprefix("/computeMetadata/v1/"), client)
        prefix = f"/compute/v1/projects/{self.project}/"
        if not path.startswith(prefix):
            return self._error(404, "notFound", f"The resource '{path}' was not found")
        rest = path.removeprefix(prefix).split("/")
        kind = {
            ("POST", 2): "insert",
            ("DELETE", 3): "delete",
            ("GET", 3): "get",
            ("GET", 2): "list",
        }.get((method, len(rest)), "")
        if rest[:2] == ["global", "operations"]:
            kind = "operation"
        elif rest[:2] == ["global", "networks"]:
            kind = "network"
        elif rest[0] == "zones":
            kind = "instance"
        self.calls.append((kind, path))
        status = self.faults.get(kind) or self.faults.get("*")
        if status:
            reason = "forbidden" if status == 403 else "backendError"
            return self._error(status, reason, f"injected HTTP {status}")
        if kind == "network":
            if rest[2] != self.network:
                return self._error(404, "notFound", f"network {rest[2]} not found")
            return 200, {
                "kind": "compute#network",
                "name": rest[2],
                "selfLink": self.link("/".join(rest)),
            }
        if kind == "instance":
            return 200, {
                "kind": "compute#instance",
                "name": rest[-1],
                "selfLink": self.link("/".join(rest)),
            }
        if kind == "operation":
            op = self.operations.get(rest[2])
            if op is None:
                return self._error(404, "notFound", f"operation {rest[2]} not found")
            self._advance(op)
            return 200, {k: v for k, v in op.items() if not k.startswith("_")}
        if kind == "list":
            return 200, {"kind": "compute#routeList", "items": list(self.routes.values())}
        if kind == "get":
            route = self.routes.get(rest[2])
            if route is None:
                return self._error(
                    404,
                    "notFound",
                    f"The resource 'projects/{self.project}/global/routes/{rest[2]}' was not found",
                )
            return 200, route
        if kind == "insert":
            name = body["name"]
            if name in self.routes:
                return self._error(409, "alreadyExists", f"The resource '{name}' already exists")
            route = {
                **body,
                "kind": "compute#route",
                "selfLink": self.link(f"global/routes/{name}"),
            }
            return 200, self._operation(
                "insert", route["selfLink"], lambda: self.routes.__setitem__(name, route)
            )
        if kind == "delete":
            name = rest[2]
            if name not in self.routes:
                return self._error(404, "notFound", f"The resource '{name}' was not found")
            return 200, self._operation(
                "delete", self.link(f"global/routes/{name}"), lambda: self.routes.pop(name, None)
            )
        return self._error(400, "invalid", f"unsupported {method} {path}")

    def _metadata(self, path: str, client: str) -> tuple[int, Any]:
        instance = self.instances.get(client, self.default_instance)
        values = {
            "project/project-id": self.project,
            "instance/hostname": f"{instance}.c.{self.project}.internal",
            "instance/zone": f"projects/123/zones/{self.zone}",
            "instance/network-interfaces/0/network": f"projects/123/networks/{self.network}",
            "instance/service-accounts/default/token": json.dumps(
                {"access_token": "fake", "expires_in": 3600, "token_type": "Bearer"}
            ),
        }
        if path not in values:
            return 404, "Not Found"
        return 200, values[path]

    def start(self, host: str = "127.0.0.1", netns: str | None = None, port: int = 0) -> None:
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _do(self, method: str) -> None:
                if (
                    self.path.startswith("/computeMetadata/")
                    and self.headers.get("Metadata-Flavor") != "Google"
                ):
                    status, doc = 403, "Missing Metadata-Flavor:Google header."
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    raw = self.rfile.read(length) if length else b""
                    body = json.loads(raw) if raw else None
                    with double.lock:
                        if self.path.startswith("/compute/"):
                            double.api_clients.add(self.headers.get("x-goog-api-client", ""))
                        status, doc = double.handle(method, self.path, body, self.client_address[0])
                data = doc.encode() if isinstance(doc, str) else json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Metadata-Flavor", "Google")
                ctype = "text/plain" if isinstance(doc, str) else "application/json"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._do("GET")

            def do_POST(self) -> None:
                self._do("POST")

            def do_DELETE(self) -> None:
                self._do("DELETE")

        def bind() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(64)
            return sock

        sock = call_in_netns(netns, bind) if netns else bind()
        server = ThreadingHTTPServer((host, 0), Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.server = server
        self.url = f"http://{host}:{sock.getsockname()[1]}"

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
