"""A sandbox worker's own metrics, served by its main process when asked for.

Off unless TOOLPLANE_WORKER_METRICS_BIND (``host:port``) is set. The counters live in the
worker's main process only: a pool child runs the job and returns a small summary of its
outcome (``job_summary``), and the main process counts it when the pool hands the result
back (``MetricsRequest.on_success``). No counter lives in a pool child's memory, nor in a
file or a mapping that a tool's contained child (forked from a pool child) could reach.

With TOOLPLANE_WORKER_METRICS_TOKEN_FILE set, the endpoint answers only a request with
``Authorization: Bearer <the file's content>``.
"""

from __future__ import annotations

import ast
import contextlib
import hmac
import logging
import socket
import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from toolplane.errors import SettingsError

log = logging.getLogger("toolplane.worker")

__all__ = ["WorkerMetrics", "job_summary", "kill_limit", "parse_bind", "serve_metrics"]

# How a limit that cut a tool off shows in its signed result (sandbox_tasks.executor).
KILLS = (
    ("timeout", "wall time", "time"),
    ("timeout", "CPU time", "cpu"),
    ("too_large", "output", "output"),
    ("too_large", "result is", "output"),
    ("tool_error", "killed (memory", "memory"),
    ("tool_error", "memory limit", "memory"),
)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def kill_limit(code: str, message: str) -> str | None:
    """The limit (time, cpu, output, memory) that an error code and message say cut the
    tool off, or None."""
    for kill_code, prefix, limit in KILLS:
        if code == kill_code and message.startswith(prefix):
            return limit
    return None


def job_summary(result: Any) -> dict[str, Any]:
    """What the main process counts of one job (a ToolResult): outcome, code, limit, time."""
    code = result.error.code if result.error is not None else None
    message = result.error.message if result.error is not None else ""
    if result.kind == "refusal":
        outcome = "refused"
    else:
        outcome = "ok" if result.ok else "tool_error"
    return {
        "outcome": outcome,
        "code": code,
        "limit": kill_limit(code or "", message),
        "seconds": result.duration_ms / 1000 if outcome != "refused" else None,
    }


class WorkerMetrics:
    """One tool's worker counters, in a registry of their own (this process only)."""

    def __init__(self, tool: str) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )

        disable_created_metrics()  # no *_created gauge beside each series (as the control)

        self.tool = tool
        self.registry = CollectorRegistry()
        r = self.registry
        p = "toolplane_worker_"
        self.jobs = Counter(p + "jobs", "Jobs handled", ["tool", "outcome"], registry=r)
        self.refusals = Counter(p + "refusals", "Envelopes refused", ["tool", "code"], registry=r)
        self.kills = Counter(
            p + "sandbox_kills", "Tools cut off by a limit", ["tool", "limit"], registry=r
        )
        self.seconds = Histogram(
            p + "tool_seconds", "The tool's run time", ["tool"], buckets=BUCKETS, registry=r
        )
        Gauge(p + "up", "1 while the worker serves", ["tool"], registry=r).labels(tool).set(1)

    def count(self, summary: Any) -> None:
        """Count one job's summary: as the task returned it, or as the pool hands it back
        to the main process (its repr, which Celery's tracer passes on)."""
        if isinstance(summary, str):
            try:
                summary = ast.literal_eval(summary)  # literals only: never code
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                log.warning("worker.metrics_unreadable summary=%.80r", summary)
                return
        if not isinstance(summary, dict) or summary.get("outcome") not in (
            "ok",
            "tool_error",
            "refused",
        ):
            return
        self.jobs.labels(self.tool, summary["outcome"]).inc()
        if summary["outcome"] == "refused":
            self.refusals.labels(self.tool, str(summary.get("code"))[:40]).inc()
        if summary.get("limit") in ("time", "cpu", "output", "memory"):
            self.kills.labels(self.tool, summary["limit"]).inc()
        if isinstance(summary.get("seconds"), int | float):
            self.seconds.labels(self.tool).observe(summary["seconds"])


def parse_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(f"{bind!r} is not host:port", setting="WORKER_METRICS_BIND")
    return host.strip("[]"), int(port)


def _read_token(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        token = path.read_bytes().strip()
    except OSError as e:
        raise SettingsError(f"{path}: {e.strerror}", setting="WORKER_METRICS_TOKEN_FILE") from e
    if len(token) < 16:
        raise SettingsError(
            f"{path}: a token of at least 16 characters", setting="WORKER_METRICS_TOKEN_FILE"
        )
    return token


MAX_CLIENTS = 16  # requests served at once; a connection beyond is closed at once
CLIENT_TIMEOUT_S = 10.0  # a connection's whole life, however slowly its client sends


class _Quiet(WSGIRequestHandler):
    def handle(self) -> None:
        # A deadline for the whole request (a per-read timeout would let a client that sends
        # a byte now and then keep its slot for ever): the socket is shut down at the end.
        self.connection.settimeout(CLIENT_TIMEOUT_S)
        cut = threading.Timer(CLIENT_TIMEOUT_S, self._cut)
        cut.daemon = True
        cut.start()
        try:
            super().handle()
        finally:
            cut.cancel()

    def _cut(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per request, at most MAX_CLIENTS at once, each cut off after
    CLIENT_TIMEOUT_S: a client that connects and sends nothing, or a byte now and then (any
    local process may), neither stops the endpoint for good nor grows threads."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Server6(_Server):
    address_family = socket.AF_INET6


def serve_metrics(metrics: WorkerMetrics, bind: str, token_file: Path | None) -> WSGIServer:
    """Serve ``metrics`` on ``bind`` from a thread of this (the main) process."""
    from prometheus_client import make_wsgi_app

    host, port = parse_bind(bind)
    token = _read_token(token_file)
    inner = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if token is not None:
            given = environ.get("HTTP_AUTHORIZATION", "").encode()
            if not hmac.compare_digest(given, b"Bearer " + token):
                start_response("401 Unauthorized", [("Content-Type", "text/plain")])
                return [b"the worker's metrics need its bearer token\n"]
        return inner(environ, start_response)

    server_class = _Server6 if ":" in host else _Server  # an IPv6 address, as [::1]:9808
    try:
        server = make_server(host, port, app, server_class=server_class, handler_class=_Quiet)
    except OSError as e:  # in use, not this host's, no such name
        raise SettingsError(
            f"cannot serve on {bind!r}: {e.strerror or e}", setting="WORKER_METRICS_BIND"
        ) from e
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    log.info("worker.metrics bind=%s:%s token=%s", host, server.server_port, token is not None)
    return server
