"""Command-line entry points: ``loden <command>`` and the drop-in ``flanneld``.

This is the only module that reads ``argv`` and the environment and configures
logging. Exit codes of the agent (also shown by ``flanneld --help``):

  0  stopped by SIGTERM/SIGINT (leases, routes and rules stay, as with flannel)
  1  startup failed (store unreachable with bad TLS/auth, missing TLS files, bad
     interface, unknown backend, a subnet file that cannot be written, a port in use,
     data-plane setup error); the log line says what to fix. These local problems
     leave no device, rules or subnet.env behind (tests/chaos/test_chaos_local_input.py)
  2  bad command line or FLANNELD_* value
  3  our lease was taken by another node while we ran; restart to get a new one
  4  the store refused our credentials while we ran (TLS certificate, etcd
     user/role, Kubernetes RBAC); fix them and restart
Everything else that fails while the agent runs (etcd down, a lost compare-and-swap,
an etcd error reply, netlink or iptables failures) is retried with backoff and shown
by /healthz; the agent does not exit for it (agent_loops.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

from loden import __version__, memory
from loden.errors import LodenError, UsageError
from loden.flags import HelpRequested
from loden.settings import AgentSettings, agent_flagset

log = logging.getLogger("loden")

EXIT_CODES_HELP = """
Exit status: 0 stopped by a signal; 1 startup failed (see the log line);
2 bad flag or FLANNELD_* value; 3 our lease was taken by another node;
4 the store refused our credentials while running (fix them and restart).
"""


def log_fields(record: logging.LogRecord, formatter: logging.Formatter) -> dict[str, object]:
    """The fields of one log record, shared by both ``-log-format`` values. ``ts`` is
    Unix seconds (JSON consumers compute with it); text renders it as UTC ISO 8601."""
    fields: dict[str, object] = {
        "ts": round(record.created, 3),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    if record.exc_info:
        fields["exc"] = formatter.formatException(record.exc_info)
    return fields


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        f = log_fields(record, self)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        level = str(f["level"]).upper()
        line = f"{stamp}.{int(record.msecs):03d}Z {level:<7} {f['logger']}: {f['msg']}"
        return line + (f"\n{f['exc']}" if "exc" in f else "")


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(log_fields(record, self))


def setup_logging(verbosity: int = 0, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
    for noisy in ("httpx", "httpcore", "pyroute2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _usage_error(prog: str, message: str) -> int:
    sys.stderr.write(f"{prog}: {message}\n")
    sys.stderr.write(agent_flagset(prog).usage())
    sys.stderr.write(EXIT_CODES_HELP)
    return 2


def agent_main(argv: Sequence[str], prog: str = "flanneld") -> int:
    flagset = agent_flagset(prog)
    if any(a in ("-version", "--version", "-version=true", "--version=true") for a in argv):
        sys.stderr.write(f"v{__version__}\n")
        return 0
    try:
        parsed = flagset.parse(argv, os.environ)
        if parsed.positional:
            raise UsageError(f"unexpected argument {parsed.positional[0]!r}")
        settings = AgentSettings.from_flags(parsed, os.environ)
    except HelpRequested as help_:
        sys.stderr.write(help_.usage + EXIT_CODES_HELP)
        return 0
    except UsageError as exc:
        return _usage_error(prog, str(exc))
    setup_logging(settings.verbosity, settings.log_format)
    log.info(
        "loden %s starting as %s: %s, subnet file %s",
        __version__,
        prog,
        "Kubernetes subnet manager (--kube-subnet-mgr)"
        if settings.kube.enabled
        else f"etcd {','.join(settings.etcd.endpoints)} (api {settings.etcd.api})",
        settings.subnet_file,
    )
    memory.tune_malloc()
    return asyncio.run(_run_agent(settings))


async def _run_agent(settings: AgentSettings) -> int:
    from loden import agent

    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    stopping = False

    def on_signal(signum: int) -> None:
        nonlocal stopping
        stopping = True
        log.info(
            "received %s; shutting down (lease, routes and rules are kept)",
            signal.Signals(signum).name,
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)  # a second signal kills us the default way
        main_task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await agent.run(settings)
    except asyncio.CancelledError:
        if stopping:
            log.info("exiting cleanly")
            return 0
        raise
    except LodenError as exc:
        log.error("%s", exc)
        return 1
    except Exception as exc:  # never a raw traceback: one line, the trace on -v=2
        log.debug("startup failed", exc_info=exc)
        log.error(
            "startup failed: unexpected %s: %s (a Loden bug: please report it with the "
            "traceback that -v=2 logs)",
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        return 1


def flanneld_main() -> int:
    return agent_main(sys.argv[1:], prog=os.path.basename(sys.argv[0]) or "flanneld")


COMMANDS = """usage: loden <command> [args]

commands:
  agent [flanneld flags]   run the node agent (same as `flanneld`)
  config get|set|validate  read, write or check the network config in etcd
  status [-json] [-v]      this node: subnet, lease, peers, agent health, kernel drift
  doctor                   check this node for flannel's known failure modes
  leases [--json]          list subnet leases in etcd (-kube-subnet-mgr: nodes)
  kube manifest|install-conf   the DaemonSet manifest (kube-flannel.yml); CNI conf install
  mk-docker-opts [opts]    turn subnet.env into Docker options (mk-docker-opts.sh)
  cni                      the flannel CNI meta-plugin (also installed as `flannel`)
  systemd render [opts]    render the seed's flanneld/docker unit and env files
  lab up|check|status|exec|down   a multi-node lab cluster on this machine
  demo                     bring up a 3-node lab, check it, show how to explore
  version                  print the version
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(COMMANDS)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "agent":
        return agent_main(rest, prog="loden agent")
    if command == "version":
        sys.stdout.write(f"loden v{__version__}\n")
        return 0
    if command == "mk-docker-opts":
        from loden.tools import mk_docker_opts

        return mk_docker_opts.main(rest)
    if command == "cni":
        from loden.cni import plugin

        return plugin.main()
    if command == "kube":
        from loden.tools import kube

        return kube.main(rest)
    if command == "systemd":
        from loden.tools import systemd

        return systemd.main(rest)
    if command in ("config", "leases"):
        from loden.tools import operator

        setup_logging(0)
        return operator.main(args)
    if command == "status":
        from loden.status import cli as status_cli

        setup_logging(0)
        logging.getLogger().setLevel(logging.ERROR)
        return status_cli.main(rest)
    if command == "doctor":
        from loden.doctor import run as doctor

        setup_logging(0)
        logging.getLogger().setLevel(logging.ERROR)
        return doctor.main(rest)
    if command in ("lab", "demo"):
        from loden.lab import cli as lab_cli

        setup_logging(0)
        return lab_cli.main(args)
    sys.stderr.write(f"loden: unknown command {command!r}\n{COMMANDS}")
    return 2


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
