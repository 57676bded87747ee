"""Start the double as a process and drive it: for tests, benchmarks and the lab.

:class:`KubeApiProcess` makes the server's PKI (the project's own :mod:`loden.lab.pki`),
an admin token, writes the token file and starts ``python -m loden.kubeapi`` (inside a
network namespace if asked; then every request of :class:`KubeApiClient` runs in a
thread that entered that namespace). :class:`KubeApiClient` is a small synchronous
client: the object helpers a test needs (nodes with podCIDRs, annotations and labels,
pods, namespaces, service-account tokens with RBAC rules, kubeconfig and in-cluster
files) and the ``/_loden/`` control endpoints (compact, cut watches, go down, rules,
request log).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any, TypeVar

import httpx

from loden.errors import LodenError
from loden.kernel.netns import call_in_netns
from loden.kubeapi.auth import FLANNEL_RULES
from loden.lab import pki, proc
from loden.lab.netns import in_net

JsonObject = dict[str, Any]
T = TypeVar("T")

ADMIN_USER = "kubernetes-admin"
ADMIN_GROUPS = ("system:masters",)
DEFAULT_NODE_ANNOTATIONS = {"node.alpha.kubernetes.io/ttl": "0"}
"""Real kubelets always set an annotation (see spec §4.7: flanneld panics without one)."""


class KubeApiError(LodenError):
    """A request to the double failed; ``status`` is the HTTP code (0: no answer)."""

    def __init__(self, message: str, status: int = 0, body: JsonObject | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body or {}


@dataclass
class KubeApiClient:
    """Synchronous access to a running double (``host:port``, CA file, bearer token)."""

    host: str
    port: int
    ca_file: Path | None
    token: str
    netns: str | None = None
    scheme: str = "https"
    timeout: float = 10.0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def _context(self) -> ssl.SSLContext | bool:
        if self.ca_file is None:
            return False
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=str(self.ca_file))
        return context

    def _in_ns(self, fn: Callable[[], T]) -> T:
        if self.netns is None:
            return fn()
        return call_in_netns(self.netns, fn, timeout=self.timeout + 2)

    def raw(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
        token: str | None = None,
    ) -> httpx.Response:
        """One request; returns the response whatever its status."""
        headers = {"Authorization": f"Bearer {token or self.token}", "Accept": "application/json"}
        content = None
        if body is not None:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = content_type

        def send() -> httpx.Response:
            with httpx.Client(
                verify=self._context(), timeout=self.timeout, trust_env=False
            ) as client:
                return client.request(
                    method, self.url + path, content=content, headers=headers, params=params
                )

        try:
            return self._in_ns(send)
        except httpx.HTTPError as exc:
            raise KubeApiError(f"{method} {path}: {exc}") from exc

    def request(self, method: str, path: str, **kwargs: Any) -> JsonObject:
        """Like :meth:`raw`; :raises KubeApiError: for any status >= 400."""
        response = self.raw(method, path, **kwargs)
        try:
            data = response.json()
        except ValueError:
            data = {"text": response.text}
        if response.status_code >= 400:
            raise KubeApiError(
                f"{method} {path}: {response.status_code} {data.get('message', response.text)}",
                response.status_code,
                data,
            )
        return data if isinstance(data, dict) else {"value": data}

    # ------------------------------------------------------------ objects

    def create_namespace(self, name: str) -> JsonObject:
        return self.request("POST", "/api/v1/namespaces", body={"metadata": {"name": name}})

    def create_node(
        self,
        name: str,
        pod_cidr: str | None = None,
        *,
        pod_cidrs: Sequence[str] = (),
        annotations: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        addresses: Sequence[tuple[str, str]] = (),
        ready: bool = True,
        kubelet_annotation: bool = True,
    ) -> JsonObject:
        """A Node as kubelet registers it and the controller-manager assigns its podCIDR."""
        body = node_body(
            name,
            pod_cidr,
            pod_cidrs=pod_cidrs,
            annotations=annotations,
            labels=labels,
            addresses=addresses,
            ready=ready,
            kubelet_annotation=kubelet_annotation,
        )
        return self.request("POST", "/api/v1/nodes", body=body)

    def create_pod(
        self, namespace: str, name: str, node_name: str, *, host_network: bool = True
    ) -> JsonObject:
        """A scheduled pod (``spec.nodeName`` set), as the DaemonSet controller makes one."""
        body = {
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": "flannel"}},
            "spec": {
                "nodeName": node_name,
                "hostNetwork": host_network,
                "serviceAccountName": "flannel",
                "containers": [{"name": "kube-flannel", "image": "loden/loden:latest"}],
            },
        }
        return self.request("POST", f"/api/v1/namespaces/{namespace}/pods", body=body)

    def get(self, resource: str, name: str, namespace: str = "") -> JsonObject:
        return self.request("GET", _path(resource, name, namespace))

    def list_objects(self, resource: str, namespace: str = "", **params: str) -> JsonObject:
        return self.request("GET", _path(resource, "", namespace), params=params)

    def delete(self, resource: str, name: str, namespace: str = "") -> JsonObject:
        return self.request("DELETE", _path(resource, name, namespace))

    def patch(
        self,
        resource: str,
        name: str,
        body: Any,
        *,
        namespace: str = "",
        subresource: str = "",
        patch_type: str = "strategic",
        token: str | None = None,
    ) -> JsonObject:
        content_type = {
            "strategic": "application/strategic-merge-patch+json",
            "merge": "application/merge-patch+json",
            "json": "application/json-patch+json",
        }[patch_type]
        path = _path(resource, name, namespace) + (f"/{subresource}" if subresource else "")
        return self.request("PATCH", path, body=body, content_type=content_type, token=token)

    def annotate_node(self, name: str, annotations: Mapping[str, str | None]) -> JsonObject:
        return self.patch(
            "nodes", name, {"metadata": {"annotations": dict(annotations)}}, patch_type="merge"
        )

    # ------------------------------------------------------------ control

    def state(self) -> JsonObject:
        return self.request("GET", "/_loden/state")

    def compact(self, resource_version: int | None = None) -> int:
        body = {} if resource_version is None else {"resourceVersion": resource_version}
        return int(self.request("POST", "/_loden/compact", body=body)["compacted"])

    def cut_watches(self, *, abort: bool = False) -> int:
        return int(self.request("POST", "/_loden/cut-watches", body={"abort": abort})["cut"])

    def go_down(self, seconds: float, *, restart: bool = False) -> None:
        """The server refuses connections for ``seconds`` (returns at once); ``restart``:
        it comes back with a fresh watch cache (older versions then get ``410``)."""
        self.request("POST", "/_loden/down", body={"seconds": seconds, "restart": restart})

    def set_rules(self, subject: str, rules: Iterable[Mapping[str, Any]]) -> None:
        """Replace the RBAC rules of ``user:NAME`` or ``group:NAME``."""
        self.request(
            "PUT", "/_loden/rules", body={"subject": subject, "rules": [dict(r) for r in rules]}
        )

    def add_token(self, token: str, user: str, groups: Sequence[str] = ()) -> None:
        self.request(
            "PUT", "/_loden/tokens", body={"token": token, "user": user, "groups": list(groups)}
        )

    def remove_token(self, token: str) -> None:
        self.request("DELETE", "/_loden/tokens", params={"token": token})

    def set_bookmark_interval(self, seconds: float) -> None:
        self.request("PUT", "/_loden/settings", body={"bookmarkInterval": seconds})

    def bulk_create(self, resource: str, items: Sequence[JsonObject], namespace: str = "") -> int:
        """Create many objects in one request (as many POSTs); returns the new version."""
        rv = 0
        for start in range(0, len(items), 500):  # requests stay under the 3 MiB body limit
            body = {
                "resource": resource,
                "namespace": namespace,
                "items": list(items[start : start + 500]),
            }
            rv = int(self.request("POST", "/_loden/bulk", body=body)["resourceVersion"])
        return rv

    def requests_log(self, since: int = 0) -> list[JsonObject]:
        return list(self.request("GET", "/_loden/requests", params={"since": str(since)})["items"])

    def service_account(
        self,
        namespace: str = "kube-flannel",
        name: str = "flannel",
        rules: Iterable[Mapping[str, Any]] = FLANNEL_RULES,
    ) -> str:
        """A token for ``system:serviceaccount:<ns>:<name>`` bound to ``rules``; returns it."""
        token = secrets.token_urlsafe(24)
        user = f"system:serviceaccount:{namespace}:{name}"
        self.add_token(
            token, user, ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"]
        )
        self.set_rules(f"user:{user}", rules)
        return token

    # ------------------------------------------------------------ client files

    def write_kubeconfig(
        self,
        path: Path,
        *,
        token: str | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        embed: bool = False,
        user: str = "admin",
    ) -> Path:
        """A kubeconfig (JSON is valid YAML) for this server with a token or a client cert."""
        cluster: JsonObject = {"server": self.url}
        if self.ca_file is not None:
            if embed:
                import base64

                cluster["certificate-authority-data"] = base64.b64encode(
                    self.ca_file.read_bytes()
                ).decode()
            else:
                cluster["certificate-authority"] = str(self.ca_file)
        credentials: JsonObject = {}
        if client_cert is not None and client_key is not None:
            credentials = {"client-certificate": str(client_cert), "client-key": str(client_key)}
        else:
            credentials = {"token": token or self.token}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "loden", "cluster": cluster}],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": "loden", "context": {"cluster": "loden", "user": user}}],
            "current-context": "loden",
            "preferences": {},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2) + "\n")
        path.chmod(0o600)
        return path

    def write_serviceaccount_dir(
        self, directory: Path, token: str, namespace: str = "kube-flannel"
    ) -> Path:
        """``token``, ``ca.crt`` and ``namespace`` as kubelet mounts them into a pod."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "token").write_text(token)
        (directory / "namespace").write_text(namespace)
        if self.ca_file is not None:
            shutil.copyfile(self.ca_file, directory / "ca.crt")
        return directory


def node_body(
    name: str,
    pod_cidr: str | None = None,
    *,
    pod_cidrs: Sequence[str] = (),
    annotations: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    addresses: Sequence[tuple[str, str]] = (),
    ready: bool = True,
    kubelet_annotation: bool = True,
) -> JsonObject:
    """A Node object as kubelet registers it, with the podCIDR(s) the controller-manager
    assigns (``bulk_create`` takes these)."""
    meta: JsonObject = {
        "name": name,
        "labels": {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            **(labels or {}),
        },
        "annotations": {
            **(DEFAULT_NODE_ANNOTATIONS if kubelet_annotation else {}),
            **(annotations or {}),
        },
    }
    if not meta["annotations"]:
        del meta["annotations"]
    spec: JsonObject = {}
    cidrs = list(pod_cidrs) or ([pod_cidr] if pod_cidr else [])
    if cidrs:
        spec["podCIDR"], spec["podCIDRs"] = cidrs[0], cidrs
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    status: JsonObject = {
        "conditions": [
            {
                "type": "Ready",
                "status": "True" if ready else "False",
                "reason": "KubeletReady" if ready else "KubeletNotReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }
        ],
        "addresses": [{"type": t, "address": a} for t, a in addresses]
        + [{"type": "Hostname", "address": name}],
        "nodeInfo": {
            "kubeletVersion": "v1.32.0",
            "osImage": "Debian GNU/Linux 12 (bookworm)",
            "kernelVersion": os.uname().release,
            "containerRuntimeVersion": "containerd://1.7.24",
            "operatingSystem": "linux",
            "architecture": "amd64",
        },
    }
    return {"metadata": meta, "spec": spec, "status": status}


def _path(resource: str, name: str, namespace: str) -> str:
    base = f"/api/v1/namespaces/{namespace}/{resource}" if namespace else f"/api/v1/{resource}"
    return f"{base}/{name}" if name else base


# ------------------------------------------------------------------------------ process


@dataclass
class KubeApiProcess:
    """``python -m loden.kubeapi`` with its own PKI and admin token, under ``workdir``.

    ``netns``: run inside that network namespace (``host`` must be an address there;
    the port defaults to 6443). Otherwise on ``host`` (loopback) with a free port.
    ``die_with_parent`` adds ``setpriv --pdeathsig KILL`` so a crashed test leaves no
    server behind (the lab, whose server outlives ``loden lab up``, turns it off).
    """

    workdir: Path
    host: str = "127.0.0.1"
    port: int | None = None
    netns: str | None = None
    anonymous: bool = True
    bookmark_interval: float = 60.0
    history_limit: int = 100_000
    die_with_parent: bool = True
    python: str = sys.executable
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    tokens: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    """More static tokens: token -> (user, groups)."""
    rules: dict[str, list[JsonObject]] = field(default_factory=dict)
    """RBAC rules from the start: ``user:NAME``/``group:NAME`` -> PolicyRules."""
    state_file: Path | None = None
    """``--state-file``: objects and versions survive :meth:`stop` + :meth:`start`."""
    insecure: bool = False
    """Plain HTTP where every client is admin (the old insecure port, ``--kube-api-url
    http://...`` without credentials)."""
    popen: subprocess.Popen[bytes] | None = None
    client: KubeApiClient | None = None
    authority: pki.Authority | None = None
    """The CA, in memory only, while this object made the PKI (to issue client certs)."""

    @property
    def pki_dir(self) -> Path:
        return self.workdir / "pki"

    @property
    def log_path(self) -> Path:
        return self.workdir / "kubeapi.log"

    @property
    def ca_file(self) -> Path:
        return self.pki_dir / "ca.pem"

    @property
    def client_cert(self) -> tuple[Path, Path]:
        """A certificate the server accepts for client authentication: the server pair
        itself (user ``etcd``, group ``loden lab``), as the seed's guide uses it."""
        return self.pki_dir / "server.pem", self.pki_dir / "server-key.pem"

    @property
    def admin_cert(self) -> tuple[Path, Path]:
        """kubeadm's ``admin.conf`` identity: CN ``kubernetes-admin``, O ``system:masters``."""
        return self.pki_dir / "admin.pem", self.pki_dir / "admin-key.pem"

    def issue_client_cert(self, user: str, group: str | None = None) -> tuple[Path, Path]:
        """A client certificate for ``user`` (CN) in ``group`` (O), signed by the server's CA.

        :raises KubeApiError: this object did not make the PKI (the CA key is not kept).
        """
        if self.authority is None:
            raise KubeApiError(
                "the CA is not in memory: issue client certificates before a restart"
            )
        cert, key = self.authority.issue(user, usage=pki.CLIENT_ONLY, organization=group)
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in user)
        paths = self.pki_dir / f"client-{stem}.pem", self.pki_dir / f"client-{stem}-key.pem"
        pki.write_cert(paths[0], cert)
        pki.write_key(paths[1], key)
        return paths

    def argv(self) -> list[str]:
        addresses = [ip_address(self.host)] if self.host not in ("127.0.0.1", "localhost") else []
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.ca_file.exists():
            _, self.authority = pki.issue_pki(self.pki_dir, addresses)
            cert, key = self.authority.issue(
                ADMIN_USER, usage=pki.CLIENT_ONLY, organization=ADMIN_GROUPS[0]
            )
            pki.write_cert(self.admin_cert[0], cert)
            pki.write_key(self.admin_cert[1], key)
        tokens = self.workdir / "tokens.csv"
        rows: list[tuple[str, str, tuple[str, ...]]] = [
            (self.admin_token, ADMIN_USER, ADMIN_GROUPS)
        ]
        rows += [(token, user, groups) for token, (user, groups) in self.tokens.items()]
        tokens.write_text(
            "".join(f'{token},{user},{user},"{",".join(groups)}"\n' for token, user, groups in rows)
        )
        tokens.chmod(0o600)
        rules_file = self.workdir / "rules.json"
        rules_file.write_text(json.dumps(self.rules, indent=2) + "\n")
        port = self.port if self.port is not None else (6443 if self.netns else 0)
        argv = [
            self.python,
            "-m",
            "loden.kubeapi",
            f"--bind-address={self.host}",
            f"--secure-port={port}",
            f"--tls-cert-file={self.pki_dir / 'server.pem'}",
            f"--tls-private-key-file={self.pki_dir / 'server-key.pem'}",
            f"--client-ca-file={self.ca_file}",
            f"--token-auth-file={tokens}",
            f"--rules-file={rules_file}",
            f"--anonymous-auth={'true' if self.anonymous else 'false'}",
            f"--bookmark-interval={self.bookmark_interval}",
            f"--history-limit={self.history_limit}",
            f"--ready-file={self.workdir / 'ready'}",
        ]
        if self.insecure:
            argv.append("--insecure")
        if self.state_file is not None:
            argv.append(f"--state-file={self.state_file}")
        if self.netns:
            argv = in_net(self.netns, argv)
        setpriv = shutil.which("setpriv")
        if self.die_with_parent and setpriv:
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        return argv

    @property
    def ready_file(self) -> Path:
        return self.workdir / "ready"

    def start(self, *, timeout: float = 20.0) -> KubeApiClient:
        """Start and wait until ``/readyz`` answers; returns the admin client.

        :raises KubeApiError: the server exited or did not answer within ``timeout``.
        """
        self.ready_file.unlink(missing_ok=True)
        argv = self.argv()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        popen = self.popen
        try:
            return self.connect(timeout=timeout, alive=lambda: popen.poll() is None)
        except KubeApiError:
            self.stop()
            raise

    def connect(self, *, timeout: float, alive: Callable[[], bool]) -> KubeApiClient:
        """Wait for the ready file and ``/readyz``; sets and returns :attr:`client`.

        :raises KubeApiError: ``alive()`` turned false or ``timeout`` passed.
        """
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if not alive() or time.monotonic() > deadline:
                raise KubeApiError(f"the API server double did not start:\n{self.log_tail()}")
            time.sleep(0.05)
        host, _, port = self.ready_file.read_text().strip().rpartition(":")
        self.client = KubeApiClient(
            host,
            int(port),
            None if self.insecure else self.ca_file,
            self.admin_token,
            netns=self.netns,
            scheme="http" if self.insecure else "https",
        )
        while True:
            with contextlib.suppress(KubeApiError):
                if self.client.raw("GET", "/readyz").status_code == 200:
                    return self.client
            if not alive() or time.monotonic() > deadline:
                raise KubeApiError(f"the API server double does not answer:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        return proc.tail(self.log_path, lines) or "(no log)"

    def kill(self) -> None:
        """SIGKILL, no goodbye (a crash); :meth:`start` brings it back."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=5)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)

    def __enter__(self) -> KubeApiClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
