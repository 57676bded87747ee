"""systemd's notify protocol (``Type=notify``): one datagram to ``$NOTIFY_SOCKET``."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str, *, socket_path: str | None = None) -> bool:
    """Send ``state`` (e.g. ``READY=1``); returns False when not under systemd."""
    path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify %s to %s failed: %s", state, path, exc)
        return False
    return True
