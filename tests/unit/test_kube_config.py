"""Client configuration variants: in-cluster, kubeconfig (files, inline data, tokens,
current context), --kube-api-url (spec §4.1 step 1)."""

from __future__ import annotations

import base64
import os
import ssl
import time
from pathlib import Path

import pytest
import yaml

from loden.errors import ConfigError
from loden.subnet.kube.config import from_kubeconfig, in_cluster, load
from loden.subnet.kube.manager import KubeEnv
from tests.fixtures.etcd import EtcdPKI, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> EtcdPKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _sa_dir(tmp_path: Path, pki: EtcdPKI, token: str = "tok-1") -> Path:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text(token + "\n")
    (sa / "ca.crt").write_bytes(pki.ca_cert.read_bytes())
    (sa / "namespace").write_text("kube-flannel")
    return sa


ENV = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


def test_in_cluster(tmp_path: Path, pki: EtcdPKI) -> None:
    config = in_cluster(ENV, _sa_dir(tmp_path, pki))
    assert config.server == "https://10.96.0.1:443"
    assert config.tokens.token == "tok-1"
    assert config.namespace == "kube-flannel"
    assert config.context is not None
    assert config.context.verify_mode == ssl.CERT_REQUIRED


def test_in_cluster_ipv6_service_host(tmp_path: Path, pki: EtcdPKI) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}
    assert in_cluster(env, _sa_dir(tmp_path, pki)).server == "https://[fd00::1]:6443"


def test_rotated_token_is_reread(tmp_path: Path, pki: EtcdPKI) -> None:
    sa = _sa_dir(tmp_path, pki)
    config = in_cluster(ENV, sa)
    assert config.tokens.token == "tok-1"
    # The kubelet swaps a symlinked file (new inode); a plain rewrite changes mtime.
    new = sa / "token.new"
    new.write_text("tok-2")
    os.replace(new, sa / "token")
    later = time.time() + 5
    os.utime(sa / "token", (later, later))
    assert config.tokens.token == "tok-2"
    (sa / "token").unlink()  # a vanished file keeps the last good token
    assert config.tokens.token == "tok-2"


@pytest.mark.parametrize(
    ("env", "missing", "message"),
    [
        ({}, None, "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be defined"),
        ({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, None, "must be defined"),
        (ENV, "token", "service-account token"),
        (ENV, "ca.crt", "service-account CA"),
    ],
)
def test_in_cluster_errors(
    tmp_path: Path, pki: EtcdPKI, env: dict[str, str], missing: str | None, message: str
) -> None:
    sa = _sa_dir(tmp_path, pki)
    if missing:
        (sa / missing).unlink()
    with pytest.raises(ConfigError, match=message):
        in_cluster(env, sa)


def _kubeconfig(tmp_path: Path, doc: dict[str, object]) -> str:
    path = tmp_path / "kube" / "config"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _doc(cluster: dict[str, object], user: dict[str, object], **extra: object) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "flannel",
        "contexts": [
            {"name": "other", "context": {"cluster": "nope", "user": "nope"}},
            {"name": "flannel", "context": {"cluster": "c", "user": "u", "namespace": "ns1"}},
        ],
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        **extra,
    }


def test_kubeconfig_client_cert_files_relative_to_the_file(tmp_path: Path, pki: EtcdPKI) -> None:
    kube = tmp_path / "kube"
    kube.mkdir()
    for src, name in (
        (pki.ca_cert, "ca.pem"),
        (pki.client_cert, "c.pem"),
        (pki.client_key, "k.pem"),
    ):
        (kube / name).write_bytes(src.read_bytes())
    path = _kubeconfig(
        tmp_path,
        _doc(
            {"server": "https://127.0.0.1:6443/", "certificate-authority": "ca.pem"},
            {"client-certificate": "c.pem", "client-key": "k.pem"},
        ),
    )
    config = from_kubeconfig(path)
    assert config.server == "https://127.0.0.1:6443"
    assert config.namespace == "ns1"
    assert config.tokens.token == ""
    assert config.context is not None


def test_kubeconfig_inline_data_and_token(tmp_path: Path, pki: EtcdPKI) -> None:
    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    path = _kubeconfig(
        tmp_path,
        _doc(
            {"server": "https://127.0.0.1:6443", "certificate-authority-data": b64(pki.ca_cert)},
            {
                "token": "secret-token",
                "client-certificate-data": b64(pki.client_cert),
                "client-key-data": b64(pki.client_key),
            },
        ),
    )
    config = from_kubeconfig(path)
    assert config.tokens.token == "secret-token"
    assert config.context is not None
    assert not list(Path("/tmp").glob("loden-kube-*"))  # inline keys never linger on disk


def test_kubeconfig_token_file_and_api_url_override(tmp_path: Path, pki: EtcdPKI) -> None:
    (tmp_path / "tokfile").write_text("from-file\n")
    path = _kubeconfig(
        tmp_path,
        _doc(
            {"server": "https://127.0.0.1:6443", "certificate-authority": str(pki.ca_cert)},
            {"tokenFile": str(tmp_path / "tokfile")},
        ),
    )
    config = load(api_url="https://127.0.0.2:7443", kubeconfig_file=path, env={})
    assert config.server == "https://127.0.0.2:7443"
    assert config.tokens.token == "from-file"


def test_kubeconfig_plain_http_has_no_tls(tmp_path: Path) -> None:
    path = _kubeconfig(tmp_path, _doc({"server": "http://127.0.0.1:8080"}, {"token": "t"}))
    assert from_kubeconfig(path).context is None


def test_kubeconfig_insecure_skip_verify(tmp_path: Path) -> None:
    doc = _doc({"server": "https://127.0.0.1:1", "insecure-skip-tls-verify": True}, {})
    config = from_kubeconfig(_kubeconfig(tmp_path, doc))
    assert config.context is not None and config.context.verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("current-context"), "no current-context"),
        (lambda d: d.update({"current-context": "ghost"}), "no context named 'ghost'"),
        (lambda d: d.update({"clusters": []}), "no cluster named 'c'"),
        (lambda d: d.update({"users": []}), "no user named 'u'"),
        (
            lambda d: d["clusters"][0]["cluster"].update({"certificate-authority": "/nope/ca"}),
            "TLS file not found: /nope/ca",
        ),
        (
            lambda d: d["clusters"][0]["cluster"].update({"certificate-authority-data": "!!"}),
            "certificate-authority-data is not base64",
        ),
        (
            lambda d: d["users"][0]["user"].update({"client-certificate": "/etc/hostname"}),
            "client certificate without a client key",
        ),
        (lambda d: d["clusters"][0]["cluster"].pop("server"), "has no server"),
    ],
)
def test_kubeconfig_errors(tmp_path: Path, mutate: object, message: str) -> None:
    doc = _doc({"server": "https://127.0.0.1:6443"}, {"token": "t"})
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=message):
        from_kubeconfig(_kubeconfig(tmp_path, doc))


def test_kubeconfig_unreadable_or_not_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read --kubeconfig-file"):
        from_kubeconfig(str(tmp_path / "missing"))
    (tmp_path / "bad").write_text("a: [b\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        from_kubeconfig(str(tmp_path / "bad"))


def test_load_picks_the_source(tmp_path: Path, pki: EtcdPKI) -> None:
    sa = _sa_dir(tmp_path, pki)
    assert load(api_url="", kubeconfig_file="", env=ENV, sa_dir=sa).source == "in-cluster config"
    only_url = load(api_url="http://127.0.0.1:8080", kubeconfig_file="", env=ENV, sa_dir=sa)
    assert only_url.server == "http://127.0.0.1:8080"
    assert only_url.tokens.token == ""


@pytest.mark.parametrize(
    ("env", "depth", "cont"),
    [
        ({}, 5000, False),
        ({"EVENT_QUEUE_DEPTH": "64"}, 64, False),
        ({"EVENT_QUEUE_DEPTH": "0"}, 5000, False),
        ({"EVENT_QUEUE_DEPTH": "-3"}, 5000, False),
        ({"CONT_WHEN_CACHE_NOT_READY": "true"}, 5000, True),
        ({"CONT_WHEN_CACHE_NOT_READY": "True"}, 5000, False),  # flanneld compares to "true"
    ],
)
def test_kube_env(env: dict[str, str], depth: int, cont: bool) -> None:
    kenv = KubeEnv.from_env(env)
    assert (kenv.event_queue_depth, kenv.cont_when_cache_not_ready) == (depth, cont)


def test_kube_env_bad_queue_depth() -> None:
    with pytest.raises(ConfigError, match="EVENT_QUEUE_DEPTH='1k' is not an integer"):
        KubeEnv.from_env({"EVENT_QUEUE_DEPTH": "1k"})
