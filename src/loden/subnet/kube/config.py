"""How to reach the API server: in-cluster, ``--kubeconfig-file``, ``--kube-api-url``.

client-go's ``BuildConfigFromFlags`` (what flanneld calls): both flags empty ⇒ the
in-cluster config (``KUBERNETES_SERVICE_HOST/PORT`` and the service-account files); a
kubeconfig's current context otherwise, with ``--kube-api-url`` replacing its server.

TLS is an explicit :class:`ssl.SSLContext` built from these inputs only; the HTTP client
is created with ``trust_env=False`` since these machines export
``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``. The bearer token of a service account is
re-read when its file changes (the kubelet rotates projected tokens hourly).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from pathlib import Path
from typing import Any

from loden.errors import ConfigError

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class TokenSource:
    """A bearer token, fixed or from a file that is re-read when it changes."""

    def __init__(self, token: str = "", path: Path | None = None) -> None:
        self._token = token
        self.path = path
        self._stamp: tuple[int, int] | None = None
        if path is not None:
            self.reload()

    def reload(self) -> None:
        """Re-read the token file if it changed since the last read.

        :raises ConfigError: the file cannot be read.
        """
        if self.path is None:
            return
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_ino)
            if stamp != self._stamp:
                self._token = self.path.read_text().strip()
                if self._stamp is not None:
                    log.info("re-read the rotated service-account token %s", self.path)
                self._stamp = stamp
        except OSError as exc:
            raise ConfigError(
                f"cannot read the Kubernetes token file {self.path}: {exc.strerror or exc}"
            ) from exc

    @property
    def token(self) -> str:
        if self.path is not None:
            with contextlib.suppress(ConfigError):  # keep the last good token
                self.reload()
        return self._token


@dataclass(slots=True)
class ClientConfig:
    """Where the API server is and how to authenticate to it."""

    server: str
    context: ssl.SSLContext | None
    tokens: TokenSource = field(default_factory=TokenSource)
    namespace: str = ""
    #: Where the config came from, for messages ("in-cluster", "kubeconfig <path>", ...).
    source: str = ""
    basic_auth: tuple[str, str] | None = None


def _context(
    *,
    ca_file: str = "",
    ca_data: bytes = b"",
    cert_file: str = "",
    key_file: str = "",
    cert_data: bytes = b"",
    key_data: bytes = b"",
    insecure: bool = False,
    what: str,
) -> ssl.SSLContext:
    """A client context from exactly these inputs (never SSL_CERT_FILE and friends).

    :raises ConfigError: a file is missing or does not load (names it and ``what``).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for kind, path in (("CA", ca_file), ("client certificate", cert_file), ("key", key_file)):
        # Checked by name first: ssl's own FileNotFoundError does not say which file.
        if path and not os.path.isfile(path):
            raise ConfigError(f"{what}: TLS file not found: {path} (the {kind}); fix the path")
    try:
        if insecure:
            log.warning(
                "%s: insecure-skip-tls-verify is set, the API server's certificate is not checked",
                what,
            )
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif ca_file:
            context.load_verify_locations(cafile=ca_file)
        elif ca_data:
            context.load_verify_locations(cadata=ca_data.decode("ascii", "replace"))
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if cert_file or cert_data:
            if not (key_file or key_data):
                raise ConfigError(f"{what}: a client certificate without a client key")
            _load_chain(context, cert_file, key_file, cert_data, key_data)
    except FileNotFoundError as exc:
        raise ConfigError(f"{what}: TLS file not found: {exc.filename}; fix the path") from exc
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"{what}: cannot load the TLS certificates or keys: {exc}") from exc
    return context


def _load_chain(
    context: ssl.SSLContext, cert_file: str, key_file: str, cert_data: bytes, key_data: bytes
) -> None:
    """``load_cert_chain`` only reads files: inline data goes through private temporary
    files (0600, removed at once)."""
    with contextlib.ExitStack() as stack:
        paths: list[str] = []
        for path, data in ((cert_file, cert_data), (key_file, key_data)):
            if path:
                paths.append(path)
                continue
            fd, tmp = tempfile.mkstemp(prefix="loden-kube-")
            stack.callback(os.unlink, tmp)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            paths.append(tmp)
        context.load_cert_chain(certfile=paths[0], keyfile=paths[1])


def in_cluster(env: Mapping[str, str], sa_dir: Path = SERVICE_ACCOUNT_DIR) -> ClientConfig:
    """client-go's ``InClusterConfig``.

    :raises ConfigError: not in a pod (no service env), or the token/CA files are missing.
    """
    host = env.get("KUBERNETES_SERVICE_HOST", "")
    port = env.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise ConfigError(
            "unable to load in-cluster configuration, KUBERNETES_SERVICE_HOST and "
            "KUBERNETES_SERVICE_PORT must be defined: outside a pod, pass "
            "--kubeconfig-file or --kube-api-url"
        )
    with contextlib.suppress(ValueError):
        IPv6Address(host)
        host = f"[{host}]"
    token_path = sa_dir / "token"
    if not token_path.is_file():
        raise ConfigError(
            f"in-cluster config: the service-account token {token_path} is missing "
            "(is automountServiceAccountToken disabled for the pod?)"
        )
    ca = sa_dir / "ca.crt"
    if not ca.is_file():
        raise ConfigError(f"in-cluster config: the service-account CA {ca} is missing")
    namespace = ""
    with contextlib.suppress(OSError):
        namespace = (sa_dir / "namespace").read_text().strip()
    return ClientConfig(
        server=f"https://{host}:{port}",
        context=_context(ca_file=str(ca), what="in-cluster config"),
        tokens=TokenSource(path=token_path),
        namespace=namespace,
        source="in-cluster config",
    )


def _b64(value: Any, where: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(f"{where} is not base64: {exc}") from exc


def _named(entries: Any, name: str, kind: str, path: str) -> dict[str, Any]:
    for entry in entries or ():
        if isinstance(entry, dict) and entry.get("name") == name:
            body = entry.get(kind)
            return body if isinstance(body, dict) else {}
    raise ConfigError(f"kubeconfig {path}: no {kind} named {name!r}")


def from_kubeconfig(path: str, api_url: str = "") -> ClientConfig:
    """The current context of a kubeconfig file (``--kube-api-url`` replaces its server).

    :raises ConfigError: unreadable, not YAML, no current context, or a bad field.
    """
    import yaml  # only kubeconfig users pay for the YAML parser

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(
            f"cannot read --kubeconfig-file {path}: {exc.strerror or exc}; fix the path"
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"--kubeconfig-file {path} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"--kubeconfig-file {path} is not a kubeconfig (no mapping)")
    current = doc.get("current-context") or ""
    if not current:
        raise ConfigError(
            f"kubeconfig {path} has no current-context; set one with "
            "`kubectl config use-context NAME`"
        )
    ctx = _named(doc.get("contexts"), current, "context", path)
    cluster = _named(doc.get("clusters"), str(ctx.get("cluster", "")), "cluster", path)
    user: dict[str, Any] = {}
    if ctx.get("user"):
        user = _named(doc.get("users"), str(ctx["user"]), "user", path)
    base = Path(path).parent

    def local(value: Any) -> str:
        if not value:
            return ""
        p = Path(str(value))
        return str(p if p.is_absolute() else base / p)

    server = api_url or str(cluster.get("server") or "")
    if not server:
        raise ConfigError(f"kubeconfig {path}: cluster of context {current!r} has no server")
    what = f"kubeconfig {path} (context {current!r})"
    context = None
    if server.startswith("https://"):

        def data(body: dict[str, Any], key: str) -> bytes:
            return _b64(body[key], f"{what} {key}") if body.get(key) else b""

        context = _context(
            ca_file=local(cluster.get("certificate-authority")),
            ca_data=data(cluster, "certificate-authority-data"),
            cert_file=local(user.get("client-certificate")),
            key_file=local(user.get("client-key")),
            cert_data=data(user, "client-certificate-data"),
            key_data=data(user, "client-key-data"),
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
            what=what,
        )
    tokens = TokenSource(token=str(user.get("token") or ""))
    if user.get("tokenFile") and not user.get("token"):
        tokens = TokenSource(path=Path(local(user["tokenFile"])))
    basic = None
    if user.get("username"):
        basic = (str(user["username"]), str(user.get("password") or ""))
    return ClientConfig(
        server=server.rstrip("/"),
        context=context,
        tokens=tokens,
        namespace=str(ctx.get("namespace") or ""),
        source=what,
        basic_auth=basic,
    )


def load(
    *,
    api_url: str,
    kubeconfig_file: str,
    env: Mapping[str, str],
    sa_dir: Path = SERVICE_ACCOUNT_DIR,
) -> ClientConfig:
    """``BuildConfigFromFlags(api_url, kubeconfig_file)``.

    :raises ConfigError: the chosen source is incomplete or unreadable.
    """
    if kubeconfig_file:
        return from_kubeconfig(kubeconfig_file, api_url)
    if api_url:
        # client-go warns and uses the URL with no credentials; so do we, but say so.
        log.warning(
            "--kube-api-url without --kubeconfig-file: no credentials are sent; pass a "
            "kubeconfig with a token or client certificate unless the API allows anonymous"
        )
        context = _context(what="--kube-api-url") if api_url.startswith("https://") else None
        return ClientConfig(server=api_url.rstrip("/"), context=context, source=api_url)
    return in_cluster(env, sa_dir)
