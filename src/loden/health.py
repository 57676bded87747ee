"""Health, readiness and metrics on ``--healthz-ip:--healthz-port``.

flannel's ``/healthz`` always answered 200 (a reviewer asked what it checks: nothing,
user pain point 19). Loden's answers 200 ``flanneld is running`` only while the store
answered recently, our lease is not past its expiry and the data plane reconciles
without errors; otherwise 503 with the failing checks, one per line. ``/readyz`` keeps
flannel's meaning (200 once subnet.env is written). ``/metrics`` is Prometheus text.
``/status`` is Loden's: a JSON document for ``loden status`` (lease, peers, last
reconcile, health problems; see :mod:`loden.status.agent_view`).
The server is a few lines over asyncio streams: three fixed GET paths do not justify a
web framework, and prometheus-client renders the metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from loden.errors import ConfigError

log = logging.getLogger(__name__)


class Metrics:
    """The agent's Prometheus metrics, in their own registry (no global state)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        ProcessCollector(registry=r)
        self.peers = Gauge("loden_peers", "Remote leases programmed in the data plane", registry=r)
        self.peers_skipped = Gauge(
            "loden_peers_skipped",
            "Remote leases the data plane cannot program (bad lease data, no path; see the log)",
            registry=r,
        )
        self.lease_ttl = Gauge(
            "loden_lease_ttl_seconds",
            "Seconds until our own lease expires (-1: reservation)",
            registry=r,
        )
        self.store_up = Gauge(
            "loden_store_up", "1 if the subnet store answered recently", registry=r
        )
        self.ready = Gauge("loden_ready", "1 once subnet.env is written", registry=r)
        self.reconcile_seconds = Histogram(
            "loden_reconcile_duration_seconds",
            "Duration of data-plane reconcile passes",
            registry=r,
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.reconcile_errors = Counter(
            "loden_reconcile_errors_total", "Reconcile passes that reported errors", registry=r
        )
        self.reconcile_changes = Counter(
            "loden_reconcile_changes_total",
            "Kernel entries added or removed by reconciles",
            registry=r,
        )
        self.kernel_repairs = Counter(
            "loden_kernel_repairs_total",
            "Owned kernel entries rewritten after a change notification (drift repaired)",
            registry=r,
        )
        self.kernel_resyncs = Counter(
            "loden_kernel_resyncs_total",
            "Full reconciles run because notifications were lost or a device changed",
            registry=r,
        )
        self.watch_restarts = Gauge("loden_watch_restarts", "Lease watch restarts", registry=r)
        self.lease_events = Counter(
            "loden_lease_events_total", "Peer lease events applied", ["kind"], registry=r
        )
        self.loop_errors = Counter(
            "loden_loop_errors_total",
            "Agent loop failures that were retried with backoff",
            ["loop"],
            registry=r,
        )
        self.identity_conflicts = Gauge(
            "loden_identity_conflicts",
            "Peer leases that advertise this node's own VTEP MAC or WireGuard key"
            " (never programmed; see /healthz and the log)",
            registry=r,
        )
        self.rules_repairs = Counter(
            "loden_rules_repairs_total",
            "Traffic-rule resyncs that had to rewrite rules",
            registry=r,
        )


@dataclass(slots=True)
class HealthState:
    store_grace_seconds: float = 6.0
    #: The subnet manager's name (``etcd-v3``, ``kube``...), for the /healthz lines.
    store: str = "etcd"
    ready: bool = False
    store_last_ok: float = 0.0
    lease_expiration: float | None = None
    reconcile_failures: int = 0
    reconcile_last_error: str = ""
    #: Agent loops failing right now: loop name -> (consecutive failures, last error).
    loop_failures: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: After how many consecutive failures a loop makes /healthz answer 503.
    loop_failures_unhealthy: int = 3
    #: Peers that claim this node's identity (VTEP MAC, WireGuard key), one line each.
    identity_conflicts: tuple[str, ...] = ()
    #: Wall-clock time, cause and errors of the last reconcile/apply (for ``/status``).
    reconcile_last_at: float = 0.0
    reconcile_last_why: str = ""
    reconcile_last_errors: tuple[str, ...] = ()
    #: What the agent knows beyond health (set once the data plane runs): ``/status``.
    describe: Callable[[], dict[str, object]] | None = None
    clock: Callable[[], float] = field(default=time.monotonic)
    wall: Callable[[], float] = field(default=time.time)

    def note_reconcile(self, why: str, errors: Sequence[str]) -> None:
        self.reconcile_last_at = self.wall()
        self.reconcile_last_why = why
        self.reconcile_last_errors = tuple(errors[:10])

    def status(self) -> dict[str, object]:
        """The ``/status`` document: health first, then what the agent describes."""
        doc: dict[str, object] = {
            "problems": self.problems(),
            "ready": self.ready,
            "store_last_ok_seconds_ago": round(self.clock() - self.store_last_ok, 1),
            "reconcile": {
                "last_at": self.reconcile_last_at or None,
                "why": self.reconcile_last_why,
                "errors": list(self.reconcile_last_errors),
                "failures_in_a_row": self.reconcile_failures,
            },
        }
        if self.describe is not None:
            doc.update(self.describe())
        return doc

    def problems(self) -> list[str]:
        out: list[str] = []
        if self.clock() - self.store_last_ok > self.store_grace_seconds:
            out.append(
                f"subnet store ({self.store}) has not answered for "
                f"{self.clock() - self.store_last_ok:.0f}s"
            )
        if self.lease_expiration is not None and self.lease_expiration < self.wall():
            out.append("our subnet lease has expired")
        if self.reconcile_failures >= 3:
            out.append(f"data plane reconcile failing: {self.reconcile_last_error}")
        for name, (count, error) in sorted(self.loop_failures.items()):
            if count >= self.loop_failures_unhealthy:
                out.append(f"{name} loop failing ({count} attempts in a row): {error}")
        out += self.identity_conflicts[:10]
        return out


class HealthServer:
    def __init__(self, state: HealthState, metrics: Metrics) -> None:
        self.state = state
        self.metrics = metrics

    def respond(self, path: str) -> tuple[int, str, bytes]:
        if path == "/healthz":
            problems = self.state.problems()
            if problems:
                return 503, "text/plain", ("\n".join(problems) + "\n").encode()
            return 200, "text/plain", b"flanneld is running"
        if path == "/readyz":
            if self.state.ready:
                return 200, "text/plain", b"flanneld is ready"
            return 503, "text/plain", b"flanneld is not ready yet"
        if path == "/status":
            body = json.dumps(self.state.status(), indent=1, sort_keys=True).encode()
            return 200, "application/json", body
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", generate_latest(self.metrics.registry)
        return 404, "text/plain; charset=utf-8", b"404 page not found\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readline()
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
            parts = request.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            status, ctype, body = self.respond(path)
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass  # ValueError: a line longer than the stream limit (64 KiB); just close
        finally:
            writer.close()

    async def serve(self, host: str, port: int) -> asyncio.Server:
        """Start listening; the caller owns the returned server (close it on exit)."""
        try:
            server = await asyncio.start_server(self._handle, host, port)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve /healthz on {host}:{port}: {exc.strerror or exc}; pick another "
                "-healthz-port or -healthz-ip, or stop what holds it"
            ) from exc
        log.info(
            "health server listening on %s:%d (/healthz, /readyz, /metrics, /status)", host, port
        )
        return server
