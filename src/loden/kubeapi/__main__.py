"""``python -m loden.kubeapi``: run the API server double in the foreground.

Flags are named after kube-apiserver's where one exists (``--bind-address``,
``--secure-port``, ``--tls-cert-file``, ``--tls-private-key-file``, ``--client-ca-file``,
``--token-auth-file`` in the same CSV format, ``--anonymous-auth``). ``--rules-file`` holds
``{"user:NAME" | "group:NAME": [PolicyRule, ...]}``. ``--ready-file`` gets ``host:port``
once the server listens (useful with ``--secure-port 0``). SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import signal
import sys
from pathlib import Path

from loden.files import replace_file
from loden.kubeapi.api import ApiSettings
from loden.kubeapi.auth import Authenticator, Authorizer, User
from loden.kubeapi.server import KubeApiServer, TlsConfig
from loden.kubeapi.store import Store

log = logging.getLogger("loden.kubeapi")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loden.kubeapi", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--bind-address", default="127.0.0.1")
    parser.add_argument("--secure-port", type=int, default=6443)
    parser.add_argument("--tls-cert-file", type=Path)
    parser.add_argument("--tls-private-key-file", type=Path)
    parser.add_argument("--client-ca-file", type=Path)
    parser.add_argument(
        "--token-auth-file", type=Path, help='CSV: token,user,uid[,"group1,group2"]'
    )
    parser.add_argument("--anonymous-auth", choices=("true", "false"), default="true")
    parser.add_argument("--rules-file", type=Path)
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP, every client is admin (the old insecure port)",
    )
    parser.add_argument("--bookmark-interval", type=float, default=60.0)
    parser.add_argument("--history-limit", type=int, default=100_000)
    parser.add_argument("--ready-file", type=Path)
    parser.add_argument(
        "--state-file", type=Path, help="keep objects and versions here across restarts"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def read_tokens(path: Path) -> dict[str, User]:
    """kube-apiserver's static token file: ``token,user,uid[,"group1,group2"]`` per line."""
    tokens: dict[str, User] = {}
    with path.open(newline="") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) < 3:
                raise SystemExit(f"{path}:{number}: need at least token,user,uid")
            groups = (
                tuple(g.strip() for g in row[3].split(",") if g.strip()) if len(row) > 3 else ()
            )
            tokens[row[0].strip()] = User(
                row[1].strip(), (*groups, "system:authenticated"), row[2].strip()
            )
    return tokens


def build(args: argparse.Namespace) -> KubeApiServer:
    tls = None
    if not args.insecure:
        if not (args.tls_cert_file and args.tls_private_key_file):
            raise SystemExit(
                "--tls-cert-file and --tls-private-key-file are required (or --insecure)"
            )
        tls = TlsConfig(args.tls_cert_file, args.tls_private_key_file, args.client_ca_file)
    authn = Authenticator(
        tokens=read_tokens(args.token_auth_file) if args.token_auth_file else {},
        anonymous=args.anonymous_auth == "true",
    )
    authz = Authorizer()
    if args.rules_file:
        for subject, rules in json.loads(args.rules_file.read_text()).items():
            authz.set_rules(subject, rules)
    server = KubeApiServer(
        host=args.bind_address,
        port=args.secure_port,
        tls=tls,
        authenticator=authn,
        authorizer=authz,
        settings=ApiSettings(bookmark_interval=args.bookmark_interval),
        store=Store(history_limit=args.history_limit),
        state_file=args.state_file,
    )
    if args.insecure:
        server.insecure_user = User("system:admin", ("system:masters", "system:authenticated"))
    return server


async def serve(args: argparse.Namespace) -> None:
    server = build(args)
    await server.start()
    log.info("serving on %s:%s", server.host, server.port)
    if args.ready_file:
        replace_file(args.ready_file, f"{server.host}:{server.port}\n".encode())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
