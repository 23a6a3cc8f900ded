"""Serving the API with uvicorn: bind address, TLS and, optionally, client certificates."""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass

import uvicorn

from control.api.app import build_app
from control.errors import UsageError
from control.ops.runtime import ControlPlane
from toolplane.settings import Settings

__all__ = [
    "ApiServer",
    "api_ready",
    "api_url",
    "parse_bind",
    "serve",
    "serve_in_thread",
    "uvicorn_config",
]


def parse_bind(bind: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) of TOOLPLANE_API_BIND."""
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit():
        raise UsageError(f"{bind!r} is not host:port", field="TOOLPLANE_API_BIND")
    if not 0 <= int(port) <= 65535:
        raise UsageError(f"port {port} is not 0-65535", field="TOOLPLANE_API_BIND")
    return host.strip("[]"), int(port)


def api_ready(settings: Settings) -> bool:
    """The control's API answers /readyz with 200 (its TLS certificate is not checked here:
    this only asks whether the process serves)."""
    import urllib.error
    import urllib.request

    context = ssl._create_unverified_context()  # noqa: S323 - a local liveness probe
    try:
        with urllib.request.urlopen(  # noqa: S310 - our own http(s) URL
            api_url(settings) + "/readyz", timeout=2, context=context
        ) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def api_url(settings: Settings) -> str:
    host, port = parse_bind(settings.api_bind)
    scheme = "https" if settings.api_cert else "http"
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104 - shown, not bound
    shown = f"[{shown}]" if ":" in shown else shown
    return f"{scheme}://{shown}:{port}"


FACTORY = "control.api.factory:create_app"  # how each of several API processes builds it


def uvicorn_config(
    plane: ControlPlane, *, log_level: str = "info", workers: int = 1
) -> uvicorn.Config:
    settings = plane.settings
    host, port = parse_bind(settings.api_bind)
    tls: dict[str, object] = {}
    if settings.api_cert or settings.api_key:
        if not (settings.api_cert and settings.api_key):
            raise UsageError(
                "TOOLPLANE_API_CERT and TOOLPLANE_API_KEY go together", field="TOOLPLANE_API_CERT"
            )
        tls = {"ssl_certfile": str(settings.api_cert), "ssl_keyfile": str(settings.api_key)}
        if settings.api_client_ca:
            tls |= {"ssl_ca_certs": str(settings.api_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    elif settings.api_client_ca:
        raise UsageError(
            "client certificates need TLS: set TOOLPLANE_API_CERT and TOOLPLANE_API_KEY",
            field="TOOLPLANE_API_CLIENT_CA",
        )
    return uvicorn.Config(
        build_app(plane) if workers == 1 else FACTORY,  # each process builds its own
        factory=workers > 1,
        workers=workers,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        # json: uvicorn's lines go through the root logger's handler (toolplane.logfields)
        **({"log_config": None} if settings.log_format == "json" else {}),
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=5,
        limit_concurrency=settings.api_max_connections,  # past it: 503, never a pile-up
        **tls,  # type: ignore[arg-type]
    )


@dataclass
class ApiServer:
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_in_thread(plane: ControlPlane, *, log_level: str = "info") -> ApiServer:
    """Serve the API from a thread of this process (the control process serves it beside
    the results ingest); uvicorn installs no signal handlers off the main thread."""
    server = uvicorn.Server(uvicorn_config(plane, log_level=log_level))
    thread = threading.Thread(target=server.run, name="api", daemon=True)
    thread.start()
    return ApiServer(server, thread)


def serve(plane: ControlPlane, *, processes: int = 1, log_level: str = "info") -> None:
    """Serve the API from this process or, with ``processes`` > 1, from that many
    processes sharing the one socket bound here (uvicorn's supervisor starts them, and
    starts again one that dies). The port is bound once: a second server on it is
    refused, never sharing its connections."""
    if processes <= 1:
        uvicorn.Server(uvicorn_config(plane, log_level=log_level)).run()
        return
    from uvicorn.supervisors import Multiprocess

    config = uvicorn_config(plane, log_level=log_level, workers=processes)
    Multiprocess(config, sockets=[config.bind_socket()]).run()
