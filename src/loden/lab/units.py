"""A tiny systemd for the lab: start a ``Type=notify`` service from its unit file.

There is no systemd on the test machines (PID 1 is something else), so the lab does
what systemd would do with the files ``loden systemd render`` wrote into a node:

1. read ``/usr/lib/systemd/system/<unit>`` and its drop-ins ``<unit>.d/*.conf`` (in
   name order; an empty ``ExecStart=`` / ``ExecStartPost=`` resets the list, as in
   systemd) from the node's private file tree;
2. build the environment: systemd's default ``PATH``, then each ``EnvironmentFile=``
   (:func:`loden.tools.systemd_files.unit_environment`), plus ``NOTIFY_SOCKET``;
3. start ``ExecStart`` (:func:`loden.tools.systemd_files.exec_argv`: ``$VAR`` split into
   words, quotes removed) inside the node's mount and network namespaces;
4. wait for ``READY=1`` on the notify socket, accepted only from the main pid
   (``NotifyAccess=main``, the default), for at most ``timeout`` seconds; if the
   process exits first or the time runs out, stop it and fail with its log's tail;
5. run each ``ExecStartPost`` (with ``$MAINPID`` set), waiting for each one.

``Restart=`` is not implemented: a lab whose agent dies shows it in ``lab status``.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from loden.errors import LodenError
from loden.files import replace_file
from loden.lab import netns, proc
from loden.lab.plan import ENV_MARKER
from loden.lab.state import LabState, NodeRecord, ProcRecord
from loden.tools.systemd import UNIT_DIR
from loden.tools.systemd_files import exec_argv, parse_unit, under_root, unit_environment

log = logging.getLogger(__name__)

BASE_ENV = {"PATH": proc.SERVICE_PATH, "LANG": "C.UTF-8"}


@dataclass(frozen=True, slots=True)
class Started:
    """A service that reported READY=1."""

    pid: int
    log_path: Path
    ready_after: float


def load_unit(root: Path, unit: str) -> str:
    """The unit's text followed by its drop-ins, as systemd merges them.

    :raises LodenError: the unit file does not exist in the node.
    """
    path = under_root(root, f"{UNIT_DIR}/{unit}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise LodenError(f"{UNIT_DIR}/{unit} does not exist in the node ({path})") from exc
    dropins = under_root(root, f"{UNIT_DIR}/{unit}.d")
    if dropins.is_dir():
        for conf in sorted(dropins.glob("*.conf")):
            text += "\n" + conf.read_text(encoding="utf-8")
    return text


def exec_lines(text: str, key: str) -> list[str]:
    """The effective ``key=`` command lines: an empty assignment clears earlier ones."""
    lines: list[str] = []
    for name, value in parse_unit(text).get("Service", []):
        if name == key:
            lines = [] if not value else [*lines, value]
    return lines


def write_dropin(root: Path, unit: str, name: str, text: str) -> Path:
    """Write ``<unit>.d/<name>.conf`` into the node's unit directory."""
    path = under_root(root, f"{UNIT_DIR}/{unit}.d/{name}.conf")
    replace_file(path, text.encode("utf-8"))
    return path


class NotifySocket:
    """The ``NOTIFY_SOCKET`` a Type=notify service reports to (a unix datagram socket)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)

    def receive(self, wait: float) -> tuple[int, list[str]] | None:
        """(sender pid, ``KEY=VALUE`` lines) of one datagram, or None after ``wait`` s."""
        readable, _, _ = select.select([self.sock], [], [], wait)
        if not readable:
            return None
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = 0
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        return pid, data.decode(errors="replace").splitlines()


def start_service(
    state: LabState,
    node: NodeRecord,
    unit: str,
    *,
    role: str,
    timeout: float = 40.0,
) -> Started:
    """Start ``unit`` in ``node`` like ``systemctl start`` (see the module docstring).

    :raises LodenError: no READY=1 in time, the service exited, or an ExecStartPost
        command failed; the message has the log's last lines.
    """
    plan = state.plan
    root = plan.node_root(node.name)
    text = load_unit(root, unit)
    env = unit_environment(text, root=root, base_env=BASE_ENV)
    starts = exec_lines(text, "ExecStart")
    if not starts:
        raise LodenError(f"{unit} in {node.name} has no ExecStart=")
    argv = exec_argv(starts[0], env)
    node_dir = plan.node_dir(node.name)
    log_path = node_dir / f"{unit}.log"
    notify = NotifySocket(node_dir / f"{unit}.notify")
    env = {**env, "NOTIFY_SOCKET": str(notify.path), ENV_MARKER: plan.name}
    began = time.monotonic()
    try:
        popen = proc.spawn(netns.in_node(node.mntns, node.netns, argv), env=env, log_path=log_path)
        state.record_process(
            ProcRecord(
                role, node.name, popen.pid, proc.start_time(popen.pid), tuple(argv), str(log_path)
            )
        )
        log.debug("%s: started %s as pid %d: %s", node.name, unit, popen.pid, argv)
        deadline = began + timeout
        while True:
            message = notify.receive(min(0.2, max(0.0, deadline - time.monotonic())))
            if message is not None:
                sender, lines = message
                if sender == popen.pid and "READY=1" in lines:
                    break
                if sender != popen.pid:
                    log.debug("%s: ignoring notification from pid %d", unit, sender)
            if popen.poll() is not None:
                raise LodenError(
                    f"{unit} on {node.name} exited with status {popen.returncode} before "
                    f"READY=1; last lines of {log_path}:\n{proc.tail(log_path)}"
                )
            if time.monotonic() > deadline:
                proc.stop_all([popen.pid], grace=2.0)
                popen.poll()
                raise LodenError(
                    f"{unit} on {node.name} sent no READY=1 within {timeout:.0f}s (stopped "
                    f"it); last lines of {log_path}:\n{proc.tail(log_path)}"
                )
    finally:
        notify.close()
    ready_after = time.monotonic() - began
    post_env = {**env, "MAINPID": str(popen.pid)}
    post_env.pop("NOTIFY_SOCKET", None)
    for line in exec_lines(text, "ExecStartPost"):
        post = exec_argv(line, {**post_env})
        done = proc.run(
            netns.in_node(node.mntns, node.netns, post), env=post_env, check=False, timeout=30
        )
        if done.returncode != 0:
            output = (done.stderr or done.stdout).decode(errors="replace").strip()
            raise LodenError(
                f"ExecStartPost of {unit} on {node.name} ({' '.join(post)}) exited "
                f"{done.returncode}: {output[-400:] or 'no output'}"
            )
    return Started(popen.pid, log_path, ready_after)
