"""etcd TLS: which file is missing, unreadable, expired or mismatched, and which server
name the certificate does not cover."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from loden.doctor.base import Context, Finding
from loden.errors import ConfigError
from loden.subnet.etcd_http import tls_context


def _file_problems(flag: str, path: str) -> list[Finding]:
    file = Path(path)
    if not file.is_file():
        return [
            Finding(
                "tls/file",
                f"the etcd TLS file given by -etcd-{flag} does not exist",
                f"-etcd-{flag}={path}: no such file",
                f"fix the path in -etcd-{flag} (or FLANNELD_ETCD_{flag.upper()})",
            )
        ]
    try:
        data = file.read_bytes()
    except OSError as exc:
        return [
            Finding(
                "tls/file",
                f"the etcd TLS file given by -etcd-{flag} cannot be read",
                f"-etcd-{flag}={path}: {exc.strerror}",
                "fix its permissions (the agent runs as root; keep keys 0600)",
            )
        ]
    if flag == "keyfile":
        try:
            serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            return [Finding("tls/file", f"{path} is not a PEM private key", str(exc), "")]
        return []
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        return [
            Finding(
                "tls/file",
                f"{path} (-etcd-{flag}) is not a PEM certificate",
                str(exc),
                "point the flag at the PEM certificate",
            )
        ]
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc < now or cert.not_valid_before_utc > now:
        return [
            Finding(
                "tls/expired",
                f"the certificate in {path} (-etcd-{flag}) is not valid now",
                f"valid {cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d}"
                f", subject {cert.subject.rfc4514_string()}",
                "issue a new certificate from the etcd CA and restart the agent",
            )
        ]
    return []


async def _handshake(context: ssl.SSLContext, endpoint: str) -> str | None:
    parts = urlsplit(endpoint)
    host, port = parts.hostname or "", parts.port or 2379
    try:
        async with asyncio.timeout(3):
            _, writer = await asyncio.open_connection(host, port, ssl=context)
            writer.close()
    except ssl.SSLCertVerificationError as exc:
        return f"{endpoint}: {exc.verify_message}"
    except (ssl.SSLError, OSError, TimeoutError):
        return None  # not a certificate problem (down, refused): the store check says so
    return None


async def check_etcd_tls(ctx: Context) -> list[Finding]:
    etcd = ctx.settings.etcd
    findings: list[Finding] = []
    for flag, path in (("cafile", etcd.cafile), ("certfile", etcd.certfile),
                       ("keyfile", etcd.keyfile)):  # fmt: skip
        if path:
            findings += _file_problems(flag, path)
    https = [e for e in etcd.endpoints if e.startswith("https://")]
    if findings or not https:
        return findings
    try:
        context = tls_context(
            etcd.cafile,
            etcd.certfile if etcd.tls_client else "",
            etcd.keyfile if etcd.tls_client else "",
        )
    except ConfigError as exc:
        return [
            Finding(
                "tls/load",
                "the etcd TLS files do not fit together",
                str(exc),
                "check that -etcd-keyfile is the key of -etcd-certfile",
            )
        ]
    for endpoint in https:
        problem = await _handshake(context, endpoint)
        if problem is None:
            continue
        name = urlsplit(endpoint).hostname
        findings.append(
            Finding(
                "tls/server",
                f"etcd's certificate is not accepted for {name}",
                problem + f" (CA {etcd.cafile or 'system store'})",
                f"use an endpoint name the server certificate lists (its SANs), or reissue "
                f"the certificate with {name} in its SANs; -etcd-cafile must be the CA that "
                "signed it",
            )
        )
    return findings
